"""Durable local spool of raw points: the disk buffer between billing and InfluxDB.

Why: billing must not wait for InfluxDB. The hot path appends a batch's raw points here
(``fsync``ed before :meth:`Spool.append` returns, so the batch's offsets may be committed
right after) and a shipper (:mod:`streams.sinks.shipper`) sends them on from disk, the
disk-buffer pattern of Telegraf and Vector.

Layout under ``DATA_DIR/spool/``::

    0/.lock                  a lane, owned by one process at a time (flock)
    0/000000000007.lp        segments, shipped oldest first
    1/...                    a second worker sharing DATA_DIR gets its own lane
    rejected/<stamp>-lane0-000000000005.lp   segments InfluxDB refused for good
    rejected/<stamp>-lane0-000000000005.json  why (one line), when, attempts, points

Lanes exist because several worker processes may share ``DATA_DIR``: each takes the
lowest lane whose ``flock`` it gets, so a restarted worker resumes its predecessor's
lane, and a running worker adopts the segments of a lane nobody holds (a worker that
died and never came back, see :meth:`Spool.adopt_orphans`).

A segment is valid InfluxDB line protocol (framing lines start with ``#``, a comment),
so ``curl --data-binary @SEGMENT 'http://HOST:8086/write?db=DB&precision=ns'`` imports one
by hand. It is a header comment followed by records, one per append::

    # spool <payload bytes> <points> <spooled unix ms> <crc32 hex>
    <line>\\n ... <line>\\n

The CRC-32 covers the numbers and the payload, so a record torn by a crash (never
acknowledged: the append had not returned) is recognised and cut off when the lane is
opened again, also when the file system left zeros instead of data. Appends write at
the known committed length, so a failed append (disk full) never leaves a hole that a
later record would sit behind.

Segments are rotated at ``segment_bytes`` and, when the shipper caught up, the active
segment is deleted (:meth:`Spool.retire`) and the next append starts a fresh one; a
healthy pipeline therefore keeps the spool near empty. The spool is not bounded: it
never drops a point, it grows while InfluxDB is away (watch
``usage_stream_raw_spool_bytes``), and an append that finds the disk full fails, which
stalls the batch in the hot path (no offsets committed) until space returns.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import itertools
import json
import logging
import os
import re
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streams.sinks.raw_retention import fsync_dir

__all__ = [
    "HEADER",
    "REJECTED",
    "Record",
    "Segment",
    "Spool",
    "SpoolCorrupt",
    "SpoolLocked",
    "read_records",
    "rejected_segments",
]

log = logging.getLogger(__name__)

HEADER = b"# usage-stream spool segment: InfluxDB line protocol, ns precision\n"
REJECTED = "rejected"
SEGMENT_BYTES = 16 * 1024 * 1024
LOCK_NAME = ".lock"
MAX_LANES = 1024

_SEGMENT = re.compile(r"^(\d{12})\.lp$")
_RECORD = re.compile(rb"^# spool (\d{1,12}) (\d{1,9}) (\d{1,15}) ([0-9a-f]{8})\n")
_MAX_RECORD_HEADER = 64


class SpoolCorrupt(Exception):
    """A record that does not decode (bad framing, CRC or UTF-8) at ``offset``."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(f"corrupt spool record in {path.name} at byte {offset}: {reason}")
        self.offset = offset


class SpoolLocked(Exception):
    """Every lane (or the rejected directory) is held by another process."""


@dataclass(slots=True)
class Record:
    """One append: its byte range in the segment, its lines and when it was spooled."""

    start: int
    end: int
    lines: list[str]
    spooled_ms: int
    points: int


@dataclass(slots=True)
class Segment:
    """A segment file and the shipper's progress in it (progress lives in memory only: a
    restart re-sends a partly shipped segment, which lands on the same points)."""

    seq: int
    path: Path
    size: int  # committed bytes: complete, fsynced records
    points: int
    oldest_ms: int | None  # spool time of the oldest unshipped record (None: none / unknown)
    sealed: bool
    shipped: int = len(HEADER)  # bytes acknowledged by InfluxDB (a record boundary)
    shipped_points: int = 0

    @property
    def pending_bytes(self) -> int:
        return max(self.size - self.shipped, 0)

    @property
    def pending_points(self) -> int:
        return max(self.points - self.shipped_points, 0)


def _record_header(payload: bytes, points: int, spooled_ms: int) -> bytes:
    numbers = f"{len(payload)} {points} {spooled_ms}"
    crc = zlib.crc32(payload, zlib.crc32(numbers.encode()))
    return f"# spool {numbers} {crc:08x}\n".encode()


def _parse_header(raw: bytes) -> tuple[int, int, int, int, int] | None:
    """(header length, payload bytes, points, spooled ms, crc) or None."""
    match = _RECORD.match(raw)
    if match is None:
        return None
    nbytes, points, ms = (int(match.group(i)) for i in (1, 2, 3))
    return match.end(), nbytes, points, ms, int(match.group(4), 16)


def _read_record(fd: int, path: Path, offset: int, end: int, *, verify: bool) -> Record:
    """The record at ``offset`` (``verify``: check CRC, point count and UTF-8 too)."""
    raw = os.pread(fd, _MAX_RECORD_HEADER, offset)
    parsed = _parse_header(raw)
    if parsed is None:
        raise SpoolCorrupt(path, offset, "no record header")
    header_len, nbytes, points, ms, crc = parsed
    record_end = offset + header_len + nbytes
    if record_end > end:
        raise SpoolCorrupt(path, offset, "record runs past the end")
    if not verify:
        return Record(offset, record_end, [], ms, points)
    payload = os.pread(fd, nbytes, offset + header_len)
    if len(payload) != nbytes:
        raise SpoolCorrupt(path, offset, "short read")
    numbers = f"{nbytes} {points} {ms}".encode()
    if zlib.crc32(payload, zlib.crc32(numbers)) != crc:
        raise SpoolCorrupt(path, offset, "checksum mismatch")
    if payload.count(b"\n") != points or (points and not payload.endswith(b"\n")):
        raise SpoolCorrupt(path, offset, "point count mismatch")
    try:
        lines = payload[:-1].decode().split("\n") if points else []
    except UnicodeDecodeError:
        raise SpoolCorrupt(path, offset, "invalid UTF-8") from None
    return Record(offset, record_end, lines, ms, points)


def read_records(
    path: Path, offset: int, end: int | None = None, max_lines: int | None = None
) -> list[Record]:
    """Verified records of a segment from ``offset`` (a record boundary) up to ``end``
    (default: the file's size), stopping once ``max_lines`` lines were collected.

    Raises :class:`SpoolCorrupt` at the first record that does not verify."""
    with open(path, "rb") as file:
        fd = file.fileno()
        if end is None:
            end = os.fstat(fd).st_size
        if offset < len(HEADER):
            if os.pread(fd, len(HEADER), 0) != HEADER:
                raise SpoolCorrupt(path, 0, "not a spool segment")
            offset = len(HEADER)
        records: list[Record] = []
        lines = 0
        while offset < end and (max_lines is None or lines < max_lines):
            record = _read_record(fd, path, offset, end, verify=True)
            records.append(record)
            lines += len(record.lines)
            offset = record.end
        return records


def _scan(path: Path, *, repair: bool) -> tuple[int, int, int | None]:
    """(committed size, points, oldest spool ms) of a segment.

    ``repair`` (the lane's last segment, the only one a crash can have torn): verify
    every record and truncate the file after the last good one. Otherwise only the
    record headers are read (cheap on a large spool); a bad record there is found, and
    the segment set aside, when it is shipped."""
    with open(path, "r+b" if repair else "rb") as file:
        fd = file.fileno()
        size = os.fstat(fd).st_size
        if os.pread(fd, len(HEADER), 0) != HEADER:
            if repair and HEADER.startswith(os.pread(fd, len(HEADER), 0)):
                os.ftruncate(fd, 0)  # torn while being created: nothing was acknowledged
                os.pwrite(fd, HEADER, 0)
                os.fsync(fd)
                return len(HEADER), 0, None
            raise SpoolCorrupt(path, 0, "not a spool segment")
        offset, points, oldest = len(HEADER), 0, None
        while offset < size:
            try:
                record = _read_record(fd, path, offset, size, verify=repair)
            except SpoolCorrupt as error:
                if not repair:
                    break
                log.warning(
                    "raw spool: cutting a torn tail of %d bytes from %s (%s); it was never "
                    "acknowledged, its batch is redelivered",
                    size - offset,
                    path,
                    str(error).rsplit(": ", 1)[-1],
                )
                os.ftruncate(fd, offset)
                os.fsync(fd)
                size = offset
                break
            points += record.points
            oldest = record.spooled_ms if oldest is None else oldest
            offset = record.end
        return offset, points, oldest


def _segments_in(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for entry in os.scandir(directory):
        match = _SEGMENT.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), Path(entry.path)))
    return sorted(found)


def _try_lock(directory: Path) -> int | None:
    """An open fd holding the exclusive flock of ``directory``, or None when taken."""
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def rejected_segments(root: Path) -> list[Path]:
    """The segments waiting in ``root/rejected/`` for ``usage-stream raw-resend``."""
    directory = root / REJECTED
    try:
        return sorted(p for p in directory.iterdir() if p.suffix == ".lp" and p.is_file())
    except FileNotFoundError:
        return []


class Spool:
    """One process's lane of the spool (module docstring). Thread-safe: the hot path
    appends from a worker thread while the shipper reads, retires and rejects."""

    def __init__(self, root: Path, *, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.root = Path(root)
        self.segment_bytes = segment_bytes
        self.lane: Path | None = None
        self._lock_fd: int | None = None
        self._segments: list[Segment] = []
        self._active: Segment | None = None
        self._active_fd: int | None = None
        self._torn = False  # the last append failed midway: truncate before the next
        self._next_seq = 1
        self._append_lock = threading.Lock()  # appends, rotation, retire, reject
        self._meta = threading.Lock()  # the segment list (held only briefly)

    # Opening --------------------------------------------------------------------------

    def open(self) -> None:
        """Take the lowest free lane, repair its last segment's tail, load its segments."""
        if self.lane is not None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        for index in range(MAX_LANES):
            lane = self.root / str(index)
            lane.mkdir(exist_ok=True)
            fd = _try_lock(lane)
            if fd is not None:
                self.lane, self._lock_fd = lane, fd
                break
        else:
            raise SpoolLocked(f"all {MAX_LANES} spool lanes under {self.root} are in use")
        found = _segments_in(self.lane)
        segments = []
        for position, (seq, path) in enumerate(found):
            try:
                size, points, oldest = _scan(path, repair=position == len(found) - 1)
            except SpoolCorrupt as error:  # keep it: the shipper sets it aside
                log.error("raw spool: %s", error)
                size, points, oldest = os.path.getsize(path), 0, None
            segments.append(Segment(seq, path, size, points, oldest, sealed=True))
        with self._meta:
            self._segments = segments
        self._next_seq = (found[-1][0] + 1) if found else 1

    def close(self) -> None:
        """Close the active segment and release the lane (the files stay)."""
        with self._append_lock:
            self._close_active()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            self.lane = None

    # Appending ------------------------------------------------------------------------

    def append(self, lines: Sequence[str]) -> None:
        """Append ``lines`` as one record and ``fsync`` it: durable when this returns."""
        if not lines:
            return
        payload = ("\n".join(lines) + "\n").encode()
        if payload.count(b"\n") != len(lines):
            raise ValueError("a raw line contains a newline")  # line() never builds one
        spooled_ms = time.time_ns() // 1_000_000
        data = _record_header(payload, len(lines), spooled_ms) + payload
        with self._append_lock:
            if self.lane is None:
                self.open()
            segment = self._active
            if segment is None or segment.size >= self.segment_bytes:
                segment = self._new_segment()
            fd = self._active_fd
            assert fd is not None
            if self._torn:
                os.ftruncate(fd, segment.size)
                self._torn = False
            self._torn = True
            view, position = memoryview(data), segment.size
            while view:
                written = os.pwrite(fd, view, position)
                view, position = view[written:], position + written
            os.fsync(fd)
            self._torn = False
            with self._meta:
                segment.size += len(data)
                segment.points += len(lines)
                if segment.oldest_ms is None:
                    segment.oldest_ms = spooled_ms

    def _new_segment(self) -> Segment:
        """Seal the active segment and start the next one (caller holds the append lock)."""
        assert self.lane is not None
        self._close_active()
        seq = self._next_seq
        path = self.lane / f"{seq:012d}.lp"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.pwrite(fd, HEADER, 0)
            os.fsync(fd)
            fsync_dir(self.lane)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        self._next_seq = seq + 1
        segment = Segment(seq, path, len(HEADER), 0, None, sealed=False)
        self._active, self._active_fd, self._torn = segment, fd, False
        with self._meta:
            self._segments.append(segment)
        return segment

    def _close_active(self) -> None:
        segment, fd = self._active, self._active_fd
        self._active, self._active_fd = None, None
        if segment is not None:
            segment.sealed = True
        if fd is not None:
            if self._torn and segment is not None:  # cut what a failed append left behind
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, segment.size)
            self._torn = False
            os.close(fd)

    # Shipping -------------------------------------------------------------------------

    def segments(self) -> list[Segment]:
        """The live segments, oldest first (the active one, if any, is last)."""
        with self._meta:
            return list(self._segments)

    def read(self, segment: Segment, max_lines: int) -> list[Record]:
        """Unshipped records of ``segment`` (committed ones only), up to ``max_lines``."""
        with self._meta:
            start, end = segment.shipped, segment.size
        records = read_records(segment.path, start, end, max_lines)
        if records:
            with self._meta:
                segment.oldest_ms = records[0].spooled_ms
        return records

    def shipped(self, segment: Segment, end: int, points: int) -> None:
        """InfluxDB acknowledged ``points`` more points, the records up to byte ``end``."""
        with self._meta:
            segment.shipped_points += points
            if end > segment.shipped:
                segment.shipped = end
                if segment.shipped >= segment.size:
                    segment.oldest_ms = None

    def retire(self, segment: Segment) -> bool:
        """Delete ``segment`` when everything in it was shipped; the active one too (the
        next append starts a fresh segment). False when an append came in meanwhile."""
        with self._append_lock:
            if segment.shipped < segment.size:
                return False
            if segment is self._active:
                self._close_active()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(segment.path)
            with self._meta:
                self._segments = [s for s in self._segments if s is not segment]
            return True

    def reject(self, segment: Segment, sidecar: dict[str, Any]) -> Path:
        """Move ``segment`` to ``rejected/`` with a JSON sidecar; returns its new path.

        The sidecar is written first, then the segment is renamed (atomic): a crash in
        between leaves the segment in the lane, where it is tried again."""
        with self._append_lock:
            if segment is self._active:
                self._close_active()
            directory = self.root / REJECTED
            directory.mkdir(parents=True, exist_ok=True)
            stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
            lane = self.lane.name if self.lane is not None else "x"
            stem = f"{stamp}-lane{lane}-{segment.seq:012d}"
            for suffix in itertools.count():
                name = stem if suffix == 0 else f"{stem}.{suffix}"
                if not (directory / f"{name}.lp").exists():
                    break
            target = directory / f"{name}.lp"
            info = {**sidecar, "segment": target.name, "bytes": segment.size}
            side = directory / f"{name}.json"
            temporary = side.with_suffix(".json.tmp")
            temporary.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            with open(temporary, "rb") as file:
                os.fsync(file.fileno())
            os.replace(temporary, side)
            os.replace(segment.path, target)
            fsync_dir(directory)
            if self.lane is not None:
                fsync_dir(self.lane)
            with self._meta:
                self._segments = [s for s in self._segments if s is not segment]
            return target

    def adopt_orphans(self) -> int:
        """Move the segments of lanes no process holds into ours; returns how many.

        A worker that died and is not restarted (fewer workers than before) would
        otherwise leave its unshipped points behind for good."""
        if self.lane is None:
            return 0
        adopted = 0
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if not entry.name.isdigit() or not entry.is_dir() or entry.name == self.lane.name:
                continue
            other = Path(entry.path)
            if not _segments_in(other):
                continue
            fd = _try_lock(other)
            if fd is None:
                continue
            try:
                adopted += self._adopt(other)
            finally:
                os.close(fd)
        return adopted

    def _adopt(self, other: Path) -> int:
        found = _segments_in(other)
        if not found:
            return 0
        with self._append_lock:
            assert self.lane is not None
            self._close_active()  # adopted segments go after it; the next append starts anew
            adopted = []
            for position, (_, path) in enumerate(found):
                try:
                    size, points, oldest = _scan(path, repair=position == len(found) - 1)
                except SpoolCorrupt:
                    size, points, oldest = os.path.getsize(path), 0, None
                seq = self._next_seq
                target = self.lane / f"{seq:012d}.lp"
                os.replace(path, target)
                self._next_seq = seq + 1
                adopted.append(Segment(seq, target, size, points, oldest, sealed=True))
            fsync_dir(self.lane)
            fsync_dir(other)
            with self._meta:
                self._segments.extend(adopted)
        log.warning(
            "raw spool: adopted %d segments (%d points) left in %s by a stopped worker",
            len(adopted),
            sum(s.points for s in adopted),
            other,
        )
        return len(adopted)

    # Sizes ----------------------------------------------------------------------------

    def pending(self) -> tuple[int, int, int | None]:
        """(bytes, points, oldest spool ms) not yet acknowledged by InfluxDB."""
        with self._meta:
            segments = list(self._segments)
        size = sum(s.pending_bytes for s in segments)
        points = sum(s.pending_points for s in segments)
        oldest = next(
            (s.oldest_ms for s in segments if s.pending_bytes and s.oldest_ms is not None), None
        )
        return size, points, oldest
