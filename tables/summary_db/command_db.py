"""The summary DB as the operator commands (``budget``, ``markup``) open it.

Commands that change something open it read-write and migrated (they may run before the
worker ever did: the dev stack sets its demo budget and rule that way), one plain
``sqlite3`` connection in autocommit mode with a busy timeout, so their short
``BEGIN IMMEDIATE`` transactions wait for the worker's instead of failing. Commands that
only list open it read-only (``mode=ro``): they never create a file, and a business user
with read access alone may run them. Every failure is a :class:`CommandDbError` whose
text is one line naming the file.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import urllib.parse
from pathlib import Path

__all__ = [
    "CommandDbError",
    "connect_read_only",
    "has_table",
    "open_read_only",
    "open_read_write",
]


class CommandDbError(RuntimeError):
    """The summary DB cannot be used; ``str()`` is one line naming it."""


def open_read_write(path: Path) -> sqlite3.Connection:
    """The DB migrated (created with its parents if missing), in autocommit mode."""
    from tables.summary_db.schema import connect

    async def migrate() -> None:
        conn = await connect(path)
        await conn.close()

    try:
        # in a thread of its own: the caller may be inside an event loop (the dev stack)
        with concurrent.futures.ThreadPoolExecutor(1) as thread:
            thread.submit(asyncio.run, migrate()).result()
        conn = sqlite3.connect(path, isolation_level=None, timeout=60)
        conn.execute("PRAGMA busy_timeout = 60000")
    except (sqlite3.Error, OSError) as error:
        raise CommandDbError(f"summary DB {path}: {_reason(error)}") from None
    return conn


def open_read_only(path: Path) -> sqlite3.Connection:
    """The existing DB, read-only; a missing file is an error, never a new empty DB."""
    if not path.is_file():
        raise CommandDbError(f"summary DB {path} does not exist (is DATA_DIR right?)")
    try:
        conn = connect_read_only(path)
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.Error as error:
        raise CommandDbError(f"summary DB {path} is not readable: {_reason(error)}") from None
    return conn


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection to the file at ``path`` (``mode=ro``: it never creates one),
    for every command that only reads (``budget list``, ``markup list``, ``report``).
    Waits up to 30 s for the worker's write transactions rather than failing at once."""
    uri = f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=30)
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


def has_table(conn: sqlite3.Connection, name: str) -> bool:
    """False on a DB from before the migration that adds ``name`` (nothing to list)."""
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE name = ? AND type IN ('table', 'view')", (name,)
    ).fetchone()
    return found is not None


def _reason(error: BaseException) -> str:
    return " ".join(str(getattr(error, "strerror", None) or error).split())
