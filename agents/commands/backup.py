"""``usage-stream backup FILE``: a consistent online copy of the summary DB.

Runs beside a working summary writer (tables/summary_db/backup.py: SQLite's backup API, one read
transaction's snapshot); prints one line with what the copy holds. Restore: stop the
writer, remove ``usage.db-wal`` and ``usage.db-shm``, copy the file to
``SUMMARY_DB_PATH`` and start the writer (docs/operations.md).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import NoReturn

import click

from streams.cli import fail
from streams.settings import get_settings
from tables.summary_db.backup import backup_summary_db

HELP = """Copy the summary DB to FILE while the worker runs.

A consistent copy (one read transaction's snapshot); restoring it loses nothing, the
writer catches up from the log (docs/operations.md).

\b
Example:
  usage-stream backup /backups/usage-$(date +%F).db
"""


@click.command(name="backup", help=HELP)
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def standalone(file: Path) -> NoReturn:
    settings = get_settings()
    source = settings.summary_db_path
    if file.resolve() == source.resolve():
        fail(f"backup FILE must not be the summary DB itself ({source})")
    try:
        info = backup_summary_db(source, file)
    except FileNotFoundError as error:
        fail(str(error))
    except (sqlite3.Error, OSError) as error:
        fail(f"backup of {source} to {file} failed: {error}")
    print(
        f"backed up {source} to {info.path}: {info.bytes} bytes, {info.usage_rows}"
        f" usage_daily rows, {info.positions} batch-log records applied"
    )
    raise SystemExit(0)
