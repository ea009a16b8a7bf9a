"""Start-up check of the ``tables`` package: the summary DB opens, migrates and is writable.

One of the worker's preflight checks (agents/wiring.py), run by
:func:`streams.cli.prepare_worker` before Faust starts, so ``usage-stream worker`` stops
with one line naming the file instead of a traceback from inside Faust.
"""

from __future__ import annotations

import sqlite3

from streams.settings import Settings
from tables.summary_db.schema import connect

__all__ = ["summary_db_writable"]


async def summary_db_writable(settings: Settings) -> str | None:
    if not settings.SUMMARY_WRITER:  # never opens the summary DB
        return None
    try:
        conn = await connect(settings.summary_db_path)
        await conn.close()
    except (sqlite3.Error, OSError) as error:
        return f"summary DB {settings.summary_db_path} is not writable: {error}"
    return None
