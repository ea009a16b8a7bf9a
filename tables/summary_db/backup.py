"""A consistent copy of the summary DB while the summary writer runs (SQLite's backup API).

Why the backup API and not ``cp``: the summary DB is in WAL mode, so its committed state
is the main file *plus* the ``-wal`` file, and a file copy taken while the writer commits
can hold half a transaction. ``sqlite3.Connection.backup`` copies the pages of one read
transaction: a snapshot of a moment, with every position stored in the same transaction
as the sums it stands for (tables/summary_db/batch_apply.py). In WAL mode a reader never blocks the
writer, so the worker goes on meanwhile.

The copy is written beside the target and renamed over it once complete and checked, in
rollback-journal mode (one self-contained file). Restoring it (docs/operations.md): stop
the summary writer, remove ``usage.db-wal`` and ``usage.db-shm``, copy the backup to
``SUMMARY_DB_PATH``, start the writer: it reads the batch log on from the backup's
positions and completes any replay the backup did not know of
(agents/replay/results.py), so nothing is lost and nothing counts twice.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BackupInfo", "backup_summary_db"]


@dataclass(frozen=True, slots=True)
class BackupInfo:
    path: Path
    bytes: int
    usage_rows: int  # usage_daily rows in the copy
    positions: int  # batch-log records applied (sum of the stored next offsets)


def backup_summary_db(source: Path, target: Path) -> BackupInfo:
    """Copy ``source`` to ``target`` consistently (module docstring). Raises
    ``FileNotFoundError`` for a missing source, ``sqlite3.Error``/``OSError`` otherwise;
    ``target`` is untouched on any failure."""
    if not source.is_file():
        raise FileNotFoundError(f"no summary DB at {source}")
    target = target.resolve()
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    partial.unlink(missing_ok=True)
    try:
        with sqlite3.connect(source, timeout=60) as src:
            copy = sqlite3.connect(partial)
            try:
                src.backup(copy)  # all pages in one step: one read transaction's snapshot
                copy.execute("PRAGMA journal_mode = DELETE")
                (verdict,) = copy.execute("PRAGMA quick_check").fetchone()
                if verdict != "ok":
                    raise sqlite3.DatabaseError(f"the copy does not check: {verdict}")
                (rows,) = copy.execute("SELECT COUNT(*) FROM usage_daily").fetchone()
                (positions,) = copy.execute(
                    "SELECT COALESCE(SUM(next_offset), 0) FROM batch_log_heads"
                ).fetchone()
            finally:
                copy.close()
        with partial.open("rb") as written:
            os.fsync(written.fileno())
        os.replace(partial, target)
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return BackupInfo(target, target.stat().st_size, rows, positions)
