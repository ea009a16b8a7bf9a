"""The worker's shared aiosqlite connection to the summary DB (rollup, web pages, prices).

The summary writer has a connection of its own (tables/summary_db/batch_apply.py): it runs whole
transactions in one thread. This one is for the many small awaits of timers and pages; writers on it
go through :func:`tables.summary_db.schema.write_transaction`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosqlite

from tables.summary_db.schema import connect

__all__ = ["SharedSummaryDb"]


class SharedSummaryDb:
    """One connection, opened and migrated on first use, shared by whoever is handed this
    object (a worker makes one, agents/wiring.py). :meth:`close` at shutdown: aiosqlite's
    thread would otherwise keep the process up."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> aiosqlite.Connection:
        """The connection (opened and migrated on the first call)."""
        async with self._lock:
            if self._conn is None:
                self._conn = await connect(self.path)
            return self._conn

    async def close(self) -> None:
        async with self._lock:
            if self._conn is not None:
                await self._conn.close()
                self._conn = None
