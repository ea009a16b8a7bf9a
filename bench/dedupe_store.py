"""What one tracked request_id costs in the dedupe table's store (RocksDB via rocksdict,
with the options of tables/dedupe.py) against a plain in-memory dict, in the same run.

    .venv/bin/python bench/dedupe_store.py [COUNT]
"""

from __future__ import annotations

import gc
import random
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

from rocksdict import Options, Rdict


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def keys(count: int) -> list[bytes]:
    """Random ids (uuid4-like): no compression benefit from sequential patterns."""
    rng = random.Random(42)
    return [f"gen-{uuid.UUID(int=rng.getrandbits(128)).hex}".encode() for _ in range(count)]


def measure_rocksdb(ids: list[bytes], path: Path) -> tuple[float, float, float]:
    options = Options()
    options.create_if_missing(True)
    options.set_write_buffer_size(8 * 1024 * 1024)
    options.set_max_write_buffer_number(2)
    db = Rdict(str(path), options)
    before = rss_kib()
    started = time.perf_counter()
    value = b"1795169472123"
    for key in ids:
        db[key] = value
    db.flush()
    seconds = time.perf_counter() - started
    rss = (rss_kib() - before) * 1024 / len(ids)
    db.close()
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return disk / len(ids), rss, len(ids) / seconds


def measure_dict(ids: list[bytes]) -> float:
    gc.collect()
    before = rss_kib()
    table = {bytes(key): 1795169472123 + i for i, key in enumerate(ids)}  # own copies
    per_id = (rss_kib() - before) * 1024 / len(table)
    del table
    return per_id


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    ids = keys(count)
    with tempfile.TemporaryDirectory() as tmp:
        disk, rss, rate = measure_rocksdb(ids, Path(tmp) / "dedupe.db")
    in_memory = measure_dict(ids)
    print(f"{count} request ids of {len(ids[0])} bytes")
    print(f"rocksdb: {disk:.1f} B/id on disk, {rss:.1f} B/id RSS growth, {rate:,.0f} puts/s")
    print(f"dict:    {in_memory:.1f} B/id RSS (key copy + int value + dict slot)")
    print(f"ratio:   RocksDB RSS per id / dict RSS per id = {rss / in_memory:.2f}")


if __name__ == "__main__":
    main()
