"""The worker's shared aiosqlite connection to the summary DB (rollup, web pages, prices).

The summary writer has a connection of its own (tables/summary_db/batch_apply.py): it runs whole
transactions in one thread. This one is for the many small awaits of timers and pages; writers on it
go through :func:`tables.summary_db.schema.write_transaction`.
"""

from __future__ import annotations

import asyncio

import aiosqlite
import faust

from streams.app import app, settings
from tables.summary_db.schema import connect

__all__ = ["summary_db"]

_db: aiosqlite.Connection | None = None
_db_lock = asyncio.Lock()


async def summary_db() -> aiosqlite.Connection:
    """The worker's shared connection to the summary DB (opened and migrated on first use)."""
    global _db
    async with _db_lock:
        if _db is None:
            _db = await connect(settings.summary_db_path)
        return _db


# mode types a handler with mypy_extensions' VarArg/NamedArg, which no handler matches
@app.on_before_shutdown.connect  # type: ignore[arg-type]
async def _close_summary_db(app: faust.App, **kwargs: object) -> None:
    """Close the shared connection: aiosqlite's thread would otherwise keep the process up."""
    global _db
    async with _db_lock:
        if _db is not None:
            await _db.close()
            _db = None
