"""Snapshots of a home partition's seen set at a chain head: restarts that read only the
tail (issue 20 item 3).

**Where.** ``DATA_DIR/snapshots/<batch-log topic>/p<partition>-<head offset>.npz``: no
setting; the worker keeps the newest two per partition (:data:`KEEP`), so the directory
holds at most ~2 x 24 B per tracked id. Valid on any host that has the file: nothing in
it depends on the host (keys and fingerprints are fixed functions of the events).

**Format**: NumPy's ``.npz`` (a zip of ``.npy`` arrays, stored, not compressed), written
with ``np.savez``: a documented format any numpy reads, with a CRC-32 per member that
``zipfile`` checks on every full read, and no code of ours to get wrong. Members:
``header`` (UTF-8 JSON: format, batch-log topic, partition, the chain head and its
record marks, the replay fences met, ``ttl_ms``, the number of ids, per segment its
bucket end and length) and, per segment (a run of :class:`tables.dedupe.seen_requests.Keys`),
``a<i>``, ``b<i>``, ``fp<i>``: 24 B per id, plus ~100 B per member. Random 64-bit
values do not compress, so the file is ~24 B per id: an 80M-id partition is 1.9 GB.

**Durable and atomic**: written to a temporary file in the same directory, ``fsync``ed,
renamed over the final name, and the directory ``fsync``ed. A crash leaves the old
snapshots and maybe a temporary file (removed at the next write).

**Never trusted blindly** (:func:`load`): a file that is truncated, fails a CRC, has the
wrong members or lengths, unsorted runs, another format, partition or topic, or a shorter
TTL than the worker's is skipped with a warning. That its chain head is on *this*
batch log and that its positions are positions in *these* topics is checked by the
caller against the topics (:mod:`agents.hot_path.home_state`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from streams.kafka.batch_log import ChainHead
from streams.sinks.raw_retention import fsync_dir
from tables.dedupe.seen_requests import Keys, SeenRequests

__all__ = ["FORMAT", "KEEP", "Snapshot", "SnapshotError", "candidates", "load", "write"]

log = logging.getLogger(__name__)

#: Version of the file layout *and* of the key and fingerprint functions: a change to
#: either makes older files unusable, never misread.
FORMAT = "usage-stream seen snapshot v1"
#: Snapshots kept per partition (the newest by chain head).
KEEP = 2
_NAME = re.compile(r"p(\d+)-(\d+)\.npz")


class SnapshotError(ValueError):
    """A snapshot file that must not be used (why)."""


class FenceFields(TypedDict):
    """A replay fence met on the chain (``agents.hot_path.home_partition.ReplayFence``'s fields)."""

    usage_date: str
    usage_end: int
    rerouted_end: int


@dataclass(slots=True)
class Snapshot:
    """One home partition's seen set at a chain head, as written and read."""

    topic: str  # the batch log
    partition: int
    head: ChainHead
    ttl_ms: int
    segments: list[tuple[int, Keys]]  # (bucket end, run)
    fences: list[FenceFields] = field(default_factory=list)
    written_ms: int = 0

    @property
    def ids(self) -> int:
        return sum(len(run) for _, run in self.segments)

    def seen(self, ttl_ms: int) -> SeenRequests:
        return SeenRequests.from_segments(ttl_ms, self.segments)


def directory(data_dir: Path, topic: str) -> Path:
    return data_dir / "snapshots" / topic


def _path(folder: Path, partition: int, head_offset: int) -> Path:
    return folder / f"p{partition}-{head_offset:012d}.npz"


def candidates(folder: Path, partition: int) -> list[Path]:
    """The partition's snapshot files, newest chain head first."""
    found: list[tuple[int, Path]] = []
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        return []
    for path in entries:
        match = _NAME.fullmatch(path.name)
        if match and int(match.group(1)) == partition:
            found.append((int(match.group(2)), path))
    return [path for _, path in sorted(found, reverse=True)]


def _header(snapshot: Snapshot) -> bytes:
    head = snapshot.head
    return json.dumps(
        {
            "format": FORMAT,
            "topic": snapshot.topic,
            "partition": snapshot.partition,
            "head": {
                "offset": head.offset,
                "usage_next": head.usage_next,
                "rerouted_next": head.rerouted_next,
                "newest_event_ms": head.newest_event_ms,
                "usage_mark": head.usage_mark,
                "rerouted_mark": head.rerouted_mark,
            },
            "fences": snapshot.fences,
            "ttl_ms": snapshot.ttl_ms,
            "ids": snapshot.ids,
            "segments": [[end, len(run)] for end, run in snapshot.segments],
            "written_ms": snapshot.written_ms or time.time_ns() // 1_000_000,
        },
        sort_keys=True,
    ).encode()


def write(folder: Path, snapshot: Snapshot) -> Path:
    """Write ``snapshot`` durably and atomically (module docstring); keep the newest
    :data:`KEEP`. Blocking: run it in a thread (``asyncio.to_thread``)."""
    folder.mkdir(parents=True, exist_ok=True)
    final = _path(folder, snapshot.partition, snapshot.head.offset)
    temporary = folder / f".{final.name}.{os.getpid()}.tmp"
    members: dict[str, np.ndarray] = {"header": np.frombuffer(_header(snapshot), dtype=np.uint8)}
    for i, (_, run) in enumerate(snapshot.segments):
        members[f"a{i}"], members[f"b{i}"], members[f"fp{i}"] = run.a, run.b, run.fp
    try:
        with temporary.open("wb") as out:
            np.savez(out, **members)  # type: ignore[arg-type]
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, final)
        fsync_dir(folder)
    finally:
        temporary.unlink(missing_ok=True)
    for old in candidates(folder, snapshot.partition)[KEEP:]:
        old.unlink(missing_ok=True)
    for stale in folder.glob(f".p{snapshot.partition}-*.tmp"):
        if stale.stat().st_mtime < time.time() - 3600:  # a crashed writer's
            stale.unlink(missing_ok=True)
    return final


def read_header(path: Path) -> dict[str, Any]:  # JSON, as :func:`write` wrote it
    """The header alone (cheap: the arrays are not read). Raises :class:`SnapshotError`."""
    try:
        with np.load(path, allow_pickle=False) as members:
            header = json.loads(bytes(members["header"]).decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise SnapshotError(f"unreadable: {error}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise SnapshotError(f"not a {FORMAT!r} file")
    return header


def load(path: Path, topic: str, partition: int, ttl_ms: int) -> Snapshot:
    """Read and check a snapshot (module docstring). Raises :class:`SnapshotError`.
    Blocking (~1 s per 40M ids): run it in a thread."""
    header = read_header(path)
    if header.get("topic") != topic or header.get("partition") != partition:
        raise SnapshotError(
            f"for {header.get('topic')} partition {header.get('partition')}, not {topic}"
            f" partition {partition}"
        )
    if int(header["ttl_ms"]) < ttl_ms:
        raise SnapshotError(
            f"taken with a shorter retention ({header['ttl_ms']} ms < {ttl_ms} ms): ids"
            " the worker must remember may have been pruned"
        )
    try:
        head = ChainHead(**header["head"])
        segments = []
        with np.load(path, allow_pickle=False) as members:
            for i, (end, count) in enumerate(header["segments"]):
                run = Keys(members[f"a{i}"], members[f"b{i}"], members[f"fp{i}"])
                for column in (run.a, run.b, run.fp):
                    if column.dtype != np.uint64 or column.shape != (count,):
                        raise SnapshotError(f"segment {i}: not {count} uint64 values")
                if count > 1 and not bool(np.all(run.a[1:] >= run.a[:-1])):
                    raise SnapshotError(f"segment {i} is not sorted")
                segments.append((int(end), run))
            extra = (
                set(members.files)
                - {"header"}
                - {f"{column}{i}" for i in range(len(segments)) for column in ("a", "b", "fp")}
            )
            if extra:
                raise SnapshotError(f"unexpected members {sorted(extra)}")
    except SnapshotError:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as error:
        raise SnapshotError(f"unreadable: {error}") from None
    snapshot = Snapshot(
        topic,
        partition,
        head,
        int(header["ttl_ms"]),
        segments,
        list(header.get("fences", [])),
        int(header.get("written_ms", 0)),
    )
    if snapshot.ids != header.get("ids"):
        raise SnapshotError(f"holds {snapshot.ids} ids, its header says {header.get('ids')}")
    return snapshot


def usable(folder: Path, partition: int) -> Iterator[tuple[Path, dict[str, Any]]]:
    """``(path, header)`` of each snapshot whose header reads, newest head first; the
    others are reported and skipped."""
    for path in candidates(folder, partition):
        try:
            yield path, read_header(path)
        except SnapshotError as error:
            log.warning("seen-set snapshot %s ignored: %s", path, error)
