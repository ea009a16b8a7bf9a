"""Retention of the embedded sink's daily line-protocol files (``RAW_RETENTION_DAYS``,
docs/contract.md §5).

``DATA_DIR/raw/usage_tracking-YYYY-MM-DD.lp`` (UTC day of the points) is gzipped into
``usage_tracking-YYYY-MM-DD.lp.gz`` once its day ended more than ``grace_seconds`` ago,
and every file of a day is deleted once the day ended more than ``retention_days`` days
ago (0 keeps them for ever). Deleting by the day of the points, not by the file's age,
is what an InfluxDB retention policy does too: a backfill of points older than the
retention is not kept either.

Late or redelivered points for a day that is already gzipped are still appended by
:class:`~streams.sinks.files.FileWriter`, to a fresh ``.lp`` with the header; the next
maintenance appends that file to the ``.lp.gz`` as one more gzip member. ``gzip -dc``
(and Python's :mod:`gzip`) decompress concatenated members as one stream, so the result
is still importable line protocol (the header comment lines repeat, which every
importer accepts)::

    gzip -dc usage_tracking-2026-11-20.lp.gz | \\
        curl --data-binary @- 'http://HOST:8086/write?db=usage_stream&precision=ns'

**Concurrency.** Writers and maintenance coordinate with ``flock`` on the ``.lp`` file
itself, not with the writer's thread lock, so this is safe between threads *and* between
worker processes sharing ``DATA_DIR``: a writer appends while holding an exclusive
``flock`` and re-opens the path when the file it locked is no longer the one at the path
(:func:`open_current_locked`). Maintenance takes the same ``flock`` only to *rename* the
``.lp`` aside (``.lp.gzipping``), which is instant; compression runs afterwards on the
renamed file, which no writer can reach any more. Writers therefore never wait for a
compression, and a line is never appended to a file that is being compressed.
Concurrent maintenance runs are serialised by ``flock`` on ``raw/.maintenance.lock``;
a run that finds it held does nothing (``busy``).

**Crash safety.** A member is appended by writing ``X.lp.gz.tmp`` (old ``.gz`` + the new
member), fsync, rename over ``X.lp.gz``, fsync the directory, and only then unlinking the
source, so a crash at any point loses nothing: a leftover ``.tmp`` is deleted, a leftover
``.lp.gzipping`` is compressed by the next run, and a source whose member already made
it into the ``.gz`` (crash between rename and unlink) is recognised (the ``.gz`` already
ends with the very same member bytes) and not appended twice. A torn last line (a write
cut by a crash, never acknowledged) is left out, as the writer would cut it.

Everything is blocking file I/O: call it from a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import gzip
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from _typeshed import OpenBinaryMode

__all__ = [
    "RawMaintenance",
    "fsync_dir",
    "maintain_raw_files",
    "open_current_locked",
    "raw_path",
]

PREFIX = "usage_tracking-"
LOCK_NAME = ".maintenance.lock"
_NAME = re.compile(r"^usage_tracking-(\d{4}-\d{2}-\d{2})\.lp(\.gzipping|\.gz|\.gz\.tmp)?$")
_CHUNK = 1 << 20
_COMPRESS_LEVEL = 6  # gzip's own default: level 9 costs ~3x the CPU for a few percent


@dataclass
class RawMaintenance:
    """What one :func:`maintain_raw_files` run did."""

    gzipped: list[Path] = field(default_factory=list)
    """Source files now inside their ``.lp.gz`` (and removed)."""
    deleted: list[Path] = field(default_factory=list)
    """Files removed because their day is past the retention."""
    busy: bool = False
    """Another maintenance run held the directory lock: nothing was done."""


def raw_path(directory: Path, day: dt.date, suffix: str = ".lp") -> Path:
    """``directory/usage_tracking-YYYY-MM-DD<suffix>``: the one naming rule of the raw files."""
    return directory / f"{PREFIX}{day.isoformat()}{suffix}"


def maintain_raw_files(
    directory: Path,
    now: dt.datetime,
    retention_days: int,
    grace_seconds: float = 3600.0,
) -> RawMaintenance:
    """Gzip the raw files of finished UTC days and delete those past the retention.

    :param directory: the raw directory (``settings.raw_dir``); missing is fine.
    :param now: the current time, timezone-aware.
    :param retention_days: ``RAW_RETENTION_DAYS``; a day's files go once the day ended
        more than this many days ago; 0 keeps them for ever.
    :param grace_seconds: how long after the end of a UTC day its file stays plain,
        while late points are most likely.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if retention_days < 0:
        raise ValueError(f"retention_days must be >= 0, got {retention_days}")
    result = RawMaintenance()
    directory = Path(directory)
    try:
        lock = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:  # nothing was ever written
        return result
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            result.busy = True
            return result
        days: set[dt.date] = set()
        for entry in os.scandir(directory):
            match = _NAME.match(entry.name)
            if match is None:
                continue
            if entry.name.endswith(".tmp"):  # a run that crashed mid-write; we hold the lock
                os.unlink(entry.path)
                continue
            days.add(dt.date.fromisoformat(match.group(1)))
        for day in sorted(days):
            ended = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)
            if retention_days and now >= ended + dt.timedelta(days=retention_days):
                _delete_day(directory, day, result)
            elif now >= ended + dt.timedelta(seconds=grace_seconds):
                _gzip_day(directory, day, result)
    finally:
        os.close(lock)  # releases the flock
    return result


def open_current_locked(path: Path, mode: OpenBinaryMode) -> BinaryIO | None:
    """Open ``path`` and hold an exclusive ``flock`` on the file that is *still* at ``path``.

    Someone may rename or unlink the file between our ``open`` and our lock; then the
    locked inode is no longer the path's and we try again. Returns None when the path
    does not exist and ``mode`` does not create it. Closing the file releases the lock.
    """
    while True:
        try:
            file: BinaryIO = open(path, mode)  # noqa: SIM115 - returned to the caller
        except FileNotFoundError:
            if "a" in mode or "w" in mode:
                raise  # the directory is missing
            return None
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX)
            opened = os.fstat(file.fileno())
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            if current is not None and (current.st_dev, current.st_ino) == (
                opened.st_dev,
                opened.st_ino,
            ):
                return file
        except BaseException:
            file.close()
            raise
        file.close()


def fsync_dir(directory: Path) -> None:
    """Make a create, rename or unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _gzip_day(directory: Path, day: dt.date, result: RawMaintenance) -> None:
    source = raw_path(directory, day)
    aside = raw_path(directory, day, ".lp.gzipping")
    target = raw_path(directory, day, ".lp.gz")
    if aside.exists():  # moved aside by a run that crashed before finishing
        _append_member(aside, target)
        result.gzipped.append(aside)
    file = open_current_locked(source, "rb")
    if file is None:
        return
    with file:  # the writers' lock, held only for the rename
        os.rename(source, aside)
    fsync_dir(directory)
    _append_member(aside, target)
    result.gzipped.append(source)


def _append_member(source: Path, target: Path) -> None:
    """Append ``source`` to ``target`` as one more gzip member, atomically; remove ``source``."""
    length = _complete_length(source)
    if length:
        tmp = target.with_name(target.name + ".tmp")
        with tmp.open("wb") as out:
            if target.exists():
                with target.open("rb") as old:
                    shutil.copyfileobj(old, out, _CHUNK)
            start = out.tell()
            with (
                source.open("rb") as src,
                gzip.GzipFile(
                    filename="", mode="wb", fileobj=out, mtime=0, compresslevel=_COMPRESS_LEVEL
                ) as member,
            ):
                _copy(src, member, length)
            size = out.tell() - start
            out.flush()
            os.fsync(out.fileno())
        if 0 < size <= start and _equal_ranges(target, start - size, tmp, start, size):
            tmp.unlink()  # this very member is already the .gz's last one: a crash after rename
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    source.unlink()
    fsync_dir(source.parent)


def _complete_length(path: Path) -> int:
    """Bytes up to and including the last newline: a torn last line was never acknowledged."""
    with path.open("rb") as file:
        position = file.seek(0, os.SEEK_END)
        while position > 0:
            start = max(0, position - 65_536)
            file.seek(start)
            newline = file.read(position - start).rfind(b"\n")
            if newline >= 0:
                return start + newline + 1
            position = start
    return 0


def _copy(src: BinaryIO, dst: BinaryIO | gzip.GzipFile, length: int) -> None:
    while length > 0:
        chunk = src.read(min(_CHUNK, length))
        if not chunk:
            raise OSError(f"{src.name} shrank while being compressed")
        dst.write(chunk)
        length -= len(chunk)


def _equal_ranges(a: Path, a_start: int, b: Path, b_start: int, size: int) -> bool:
    with a.open("rb") as fa, b.open("rb") as fb:
        fa.seek(a_start)
        fb.seek(b_start)
        while size > 0:
            step = min(_CHUNK, size)
            if fa.read(step) != fb.read(step):
                return False
            size -= step
    return True


def _delete_day(directory: Path, day: dt.date, result: RawMaintenance) -> None:
    source = raw_path(directory, day)
    file = open_current_locked(source, "rb")
    if file is not None:
        with file:  # never unlink under a writer in the middle of an append
            source.unlink()
        result.deleted.append(source)
    for suffix in (".lp.gzipping", ".lp.gz"):
        path = raw_path(directory, day, suffix)
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        result.deleted.append(path)
    fsync_dir(directory)
