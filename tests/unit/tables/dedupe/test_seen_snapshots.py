"""Seen-set snapshot files: a round trip, and every damaged or foreign file refused."""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from streams.kafka.batch_log import ChainHead
from tables.dedupe import seen_snapshots
from tables.dedupe.seen_requests import SeenRequests
from tables.dedupe.seen_snapshots import KEEP, Snapshot, SnapshotError, candidates, load, write

DAY = 86_400_000
TOPIC = "app-batch-log"
HEAD = ChainHead(41, 1000, 20, 1_795_169_472_000, "1795169472000:0badcafe", "")


def _state(ids: int = 3000) -> SeenRequests:
    seen = SeenRequests(ttl_ms=7 * DAY)
    for day in range(3):
        part = [f"req-{day}-{i}" for i in range(ids // 3)]
        seen.add(part, 100 * DAY + day * DAY, np.arange(len(part), dtype=np.uint64) + day)
    return seen


def _snapshot(seen: SeenRequests, head: ChainHead = HEAD, partition: int = 2) -> Snapshot:
    fences = [{"usage_date": "2026-11-20", "usage_end": 900, "rerouted_end": 10}]
    return Snapshot(TOPIC, partition, head, seen.ttl_ms, seen.segments(), fences)


def test_round_trip_keeps_every_id_fingerprint_bucket_and_the_head(tmp_path: Path) -> None:
    seen = _state()
    path = write(tmp_path, _snapshot(seen))
    assert path.name == "p2-000000000041.npz"
    loaded = load(path, TOPIC, 2, 7 * DAY)
    assert loaded.head == HEAD and loaded.ids == 3000
    assert loaded.fences == [{"usage_date": "2026-11-20", "usage_end": 900, "rerouted_end": 10}]
    again = loaded.seen(7 * DAY)
    assert len(again) == 3000
    assert again.fingerprint("req-2-17") == seen.fingerprint("req-2-17") == 19
    # the buckets came back: the same ids expire at the same time
    now = 107 * DAY + 7 * DAY // 8
    assert again.prune(now) == seen.prune(now) == 1000
    # 24 B per id on disk, plus a small header and ~100 B per member
    assert path.stat().st_size <= 24 * 3000 + 4096


def test_only_the_newest_two_are_kept_and_stale_temporaries_go(tmp_path: Path) -> None:
    seen = _state(30)
    stale = tmp_path / ".p2-000000000001.npz.1234.tmp"
    stale.write_bytes(b"half a file")
    os.utime(stale, (0, 0))
    for offset in (5, 50, 7, 60):
        write(tmp_path, _snapshot(seen, ChainHead(offset, offset, 0)))
    write(tmp_path, _snapshot(seen, ChainHead(3, 3, 0), partition=1))
    assert [p.name for p in candidates(tmp_path, 2)] == [
        "p2-000000000060.npz",
        "p2-000000000050.npz",
    ][:KEEP]
    assert [p.name for p in candidates(tmp_path, 1)] == ["p1-000000000003.npz"]
    assert not stale.exists()


def _corrupt_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def _array_offset(path: Path, member: str) -> int:
    """Where a member's array data starts in the file (past the zip and .npy headers)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member + ".npy")
    raw = path.read_bytes()
    local = info.header_offset  # the local header's own name and extra lengths
    name_length = int.from_bytes(raw[local + 26 : local + 28], "little")
    extra_length = int.from_bytes(raw[local + 28 : local + 30], "little")
    start = local + 30 + name_length + extra_length
    assert raw[start : start + 6] == b"\x93NUMPY"
    npy_header = int.from_bytes(raw[start + 8 : start + 10], "little")
    return start + 10 + npy_header


@pytest.mark.parametrize(
    "damage",
    [
        "truncated",
        "truncated-in-arrays",
        "flipped-key-bit",
        "flipped-fingerprint-bit",
        "empty",
        "not-a-zip",
    ],
)
def test_a_damaged_file_is_refused(tmp_path: Path, damage: str) -> None:
    path = write(tmp_path, _snapshot(_state()))
    size = path.stat().st_size
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: size - 10])
    elif damage == "truncated-in-arrays":
        path.write_bytes(path.read_bytes()[: size // 2])
    elif damage == "flipped-key-bit":
        _corrupt_byte(path, _array_offset(path, "a1") + 100)
    elif damage == "flipped-fingerprint-bit":
        _corrupt_byte(path, _array_offset(path, "fp0") + 7)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"PK\x03\x04 not really" * 100)
    with pytest.raises(SnapshotError):
        load(path, TOPIC, 2, 7 * DAY)


def _rewrite_header(path: Path, change: dict) -> None:
    with np.load(path) as members:
        arrays = {name: members[name] for name in members.files}
    header = json.loads(bytes(arrays["header"]).decode())
    header.update(change)
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    with path.open("wb") as out:
        np.savez(out, **arrays)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"format": "something else"}, "not a"),
        ({"partition": 3}, "partition 3"),
        ({"topic": "other-batch-log"}, "other-batch-log"),
        ({"ttl_ms": 6 * DAY}, "shorter retention"),
        ({"ids": 2999}, "header says"),
        ({"segments": [[0, 1000]] * 4}, "unreadable"),
    ],
)
def test_a_foreign_or_inconsistent_file_is_refused(tmp_path: Path, change: dict, why: str) -> None:
    path = write(tmp_path, _snapshot(_state()))
    _rewrite_header(path, change)
    with pytest.raises(SnapshotError, match=why):
        load(path, TOPIC, 2, 7 * DAY)


def test_an_unsorted_run_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, _snapshot(_state()))
    with np.load(path) as members:
        arrays = {name: members[name] for name in members.files}
    arrays["a0"] = arrays["a0"][::-1].copy()
    with path.open("wb") as out:
        np.savez(out, **arrays)
    with pytest.raises(SnapshotError, match="not sorted"):
        load(path, TOPIC, 2, 7 * DAY)


def test_a_longer_retention_than_the_workers_is_fine(tmp_path: Path) -> None:
    path = write(tmp_path, _snapshot(_state()))
    assert load(path, TOPIC, 2, 6 * DAY).ids == 3000


def test_unreadable_headers_are_reported_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen = _state(30)
    good = write(tmp_path, _snapshot(seen, ChainHead(5, 5, 0)))
    bad = write(tmp_path, _snapshot(seen, ChainHead(9, 9, 0)))
    bad.write_bytes(bad.read_bytes()[:50])
    with caplog.at_level(logging.WARNING):
        found = list(seen_snapshots.usable(tmp_path, 2))
    assert [path for path, _ in found] == [good]
    assert "p2-000000000009.npz ignored" in caplog.text
