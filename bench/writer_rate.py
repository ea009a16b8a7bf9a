"""How many batch-log records a second the single summary writer applies, here.

    .venv/bin/python bench/writer_rate.py

The writer's work per record, without Kafka: decode the record as the writer does (msgspec,
rows left as JSON text), then :class:`tables.summary_db.batch_apply.BatchApplier` (chain
rule, SQLite staging the rows with ``json_each``, key ids, the fold into ``daily_pending``,
the stored heads), up to 500 records per transaction as the writer
reads them. Records carry R rows (one per (date, key) a batch touched) out of 171k keys,
the benchmark workload's cardinality. Prints records/s and rows/s per R: the event rate at
which the writer is the limit is rows/s × events per row of the deployment's batches.
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from streams.kafka.batch_log import BatchEntry, SumRow, decode_rows_raw, encode  # noqa: E402
from tables.summary_db.batch_apply import BatchApplier  # noqa: E402
from tables.summary_db.schema import connect  # noqa: E402

KEYS = 171_000
PARTITIONS = 4


def encoded_log(rows_per_record: int, records: int, seed: int = 1) -> list[tuple[int, bytes]]:
    rng = random.Random(seed)
    log, prev = [], dict.fromkeys(range(PARTITIONS), -1)
    offsets = dict.fromkeys(range(PARTITIONS), 0)
    for index in range(records):
        partition = index % PARTITIONS
        keys = rng.sample(range(KEYS), rows_per_record)
        rows = [
            SumRow("2026-11-28", f"org-{k % 500}", f"user-{k}", f"model-{k % 40}", 10, 20, 1, 0, 1)
            for k in keys
        ]
        entry = BatchEntry(prev[partition], 0, 0, 0, 0, -1, rows, "bench")
        prev[partition] = offsets[partition]
        offsets[partition] += 1
        log.append((partition, encode(entry)))
    return log


def measure(rows_per_record: int, records: int) -> tuple[float, float]:
    path = Path(tempfile.mkdtemp()) / "usage.db"

    async def create() -> None:
        await (await connect(path)).close()

    asyncio.run(create())
    log = encoded_log(rows_per_record, records)
    applier = BatchApplier(path)
    offsets = dict.fromkeys(range(PARTITIONS), 0)
    started = time.perf_counter()
    for start in range(0, len(log), 500):
        group = []
        for partition, value in log[start : start + 500]:
            group.append((partition, offsets[partition], decode_rows_raw(value)))
            offsets[partition] += 1
        applier.apply(group)
    seconds = time.perf_counter() - started
    applier.close()
    return records / seconds, records * rows_per_record / seconds


def main() -> None:
    for rows, records in ((10, 20_000), (100, 4_000), (1_000, 400), (10_000, 40), (40_000, 12)):
        per_s, rows_s = measure(rows, records)
        print(f"{rows:6d} rows/record: {per_s:9.1f} records/s, {rows_s:9.0f} rows/s")


if __name__ == "__main__":
    main()
