"""Embedded raw sink: daily line protocol files ``DATA_DIR/raw/usage_tracking-YYYY-MM-DD.lp``.

The date is the UTC date of each point's timestamp. Every write call appends, flushes
and ``fsync``s (in a thread) before returning, so acknowledged points survive a crash.
A point redelivered after a crash is appended again: harmless, the duplicate line is
the very same point on import.

Each file starts with a comment header that makes it importable by every tool::

    # usage-stream raw points: InfluxDB line protocol, ns precision
    # DML
    # CONTEXT-DATABASE: usage_stream

Lines starting with ``#`` are comments in line protocol, so the file imports as is with

* InfluxDB 2.x/3.x CLI: ``influx write --bucket BUCKET --precision ns --file FILE``
* InfluxDB 1.x CLI: ``influx -import -path=FILE -precision=ns`` (the ``# DML`` and
  ``# CONTEXT-DATABASE:`` lines are what ``-import`` requires; create the database first:
  ``influx -execute 'CREATE DATABASE usage_stream'``). The database is
  ``INFLUXDB_DATABASE`` when set, else ``usage_stream``; ``INFLUXDB_RETENTION_POLICY``
  adds a ``# CONTEXT-RETENTION-POLICY:`` line.
* any HTTP client: ``curl --data-binary @FILE 'http://HOST:8086/write?db=usage_stream&precision=ns'``

A write torn by a crash (never acknowledged) is cut back to the last complete line
before the next append to the file.

Files of finished days are gzipped and, after ``RAW_RETENTION_DAYS``, deleted by
:func:`streams.sinks.raw_retention.maintain_raw_files` (also :meth:`FileWriter.maintain`).
Appends hold an exclusive ``flock`` on the file and re-open the path when maintenance
moved the file away meanwhile, so a point for an already gzipped day lands in a fresh
``.lp`` (with the header), which the next maintenance adds to the ``.lp.gz``. The same
``flock`` keeps several worker processes sharing ``DATA_DIR`` from interleaving writes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import threading
from collections import defaultdict
from pathlib import Path
from typing import BinaryIO

from streams.settings import Settings
from streams.sinks.raw_retention import (
    RawMaintenance,
    fsync_dir,
    maintain_raw_files,
    open_current_locked,
    raw_path,
)

__all__ = ["DEFAULT_DATABASE", "FileWriter"]

DEFAULT_DATABASE = "usage_stream"
_NS_PER_DAY = 86_400 * 1_000_000_000
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


class FileWriter:
    """A :class:`~streams.sinks.base.RawWriter` appending to daily ``.lp`` files."""

    def __init__(
        self,
        directory: Path,
        *,
        database: str = DEFAULT_DATABASE,
        retention_policy: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        header = "# usage-stream raw points: InfluxDB line protocol, ns precision\n"
        header += f"# DML\n# CONTEXT-DATABASE: {database}\n"
        if retention_policy:
            header += f"# CONTEXT-RETENTION-POLICY: {retention_policy}\n"
        self.header = header.encode()
        self._checked: set[Path] = set()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> FileWriter:
        return cls(
            settings.raw_dir,
            database=settings.INFLUXDB_DATABASE or DEFAULT_DATABASE,
            retention_policy=settings.INFLUXDB_RETENTION_POLICY,
        )

    def path_for(self, day: dt.date) -> Path:
        return raw_path(self.directory, day)

    def maintain(
        self,
        now: dt.datetime,
        retention_days: int,
        grace_seconds: float = 3600.0,
    ) -> RawMaintenance:
        """Gzip finished days, delete expired ones: :func:`maintain_raw_files` on our directory.

        Blocking; safe to run in a thread while this writer (or another process's) appends.
        """
        return maintain_raw_files(self.directory, now, retention_days, grace_seconds)

    async def write_lines(self, lines: list[str]) -> None:
        if lines:
            await asyncio.to_thread(self._write_sync, lines)

    async def close(self) -> None:
        """Nothing stays open between writes."""

    def _write_sync(self, lines: list[str]) -> None:
        by_day: dict[int, list[str]] = defaultdict(list)
        for line in lines:  # the timestamp is the last token of every line we build
            by_day[int(line[line.rindex(" ") + 1 :]) // _NS_PER_DAY].append(line)
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            for day, day_lines in by_day.items():
                path = self.path_for(dt.date.fromordinal(_EPOCH_ORDINAL + day))
                self._append(path, ("\n".join(day_lines) + "\n").encode())

    def _append(self, path: Path, data: bytes) -> None:
        file = open_current_locked(path, "a+b")
        assert file is not None  # "a+b" creates the file
        with file:  # the flock is released on close
            fd = file.fileno()
            size = os.fstat(fd).st_size
            created = size == 0
            if created or path not in self._checked or os.pread(fd, 1, size - 1) != b"\n":
                self._repair(file)
                self._checked.add(path)
            file.write(data)
            file.flush()
            os.fsync(fd)
        if created:
            fsync_dir(self.directory)

    def _repair(self, file: BinaryIO) -> None:
        """Write the header into an empty file; cut a torn last line from an old one."""
        file.seek(0)
        head = file.read(len(self.header))
        if len(head) < len(self.header) and self.header.startswith(head):
            file.truncate(0)
            file.write(self.header)
            return
        end = file.seek(0, os.SEEK_END)
        position = end
        while position > 0:
            start = max(0, position - 65_536)
            file.seek(start)
            newline = file.read(position - start).rfind(b"\n")
            if newline >= 0:
                position = start + newline + 1
                break
            position = start
        if position != end:
            file.truncate(position)
