"""Summary keys ((client, user, model) → a small integer id) and the fold of increments
into ``daily_pending``: shared by everything that adds sums to the summary DB (the
summary writer's batch-log apply)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Protocol

__all__ = ["FOLD_SQL", "KeyedRow", "SummaryKeyIds"]

#: Add one (usage_date, key_id) increment: input, output, requests, estimated, cost, late.
FOLD_SQL = """
    INSERT INTO daily_pending VALUES (?,?,?,?,?,?,?,?,1)
    ON CONFLICT (usage_date, key_id) DO UPDATE SET
        live_dirty = 1,
        input_tokens = input_tokens + excluded.input_tokens,
        output_tokens = output_tokens + excluded.output_tokens,
        requests = requests + excluded.requests,
        estimated_requests = estimated_requests + excluded.estimated_requests,
        raw_cost_nano = raw_cost_nano + excluded.raw_cost_nano,
        late_events = late_events + excluded.late_events
"""

# Strings reach SQLite as bound values only (SQLite's JSON functions stop at a NUL), so the
# keys of a batch go through a small TEMP table: two statements whatever their number.
_PROBE_KEYS = (
    "CREATE TEMP TABLE IF NOT EXISTS probe_keys (client_org_id TEXT NOT NULL,"
    " user_id TEXT NOT NULL, model TEXT NOT NULL,"
    " PRIMARY KEY (client_org_id, user_id, model)) WITHOUT ROWID"
)
_NEW_KEYS = """
    INSERT OR IGNORE INTO summary_keys (client_org_id, user_id, model)
    SELECT client_org_id, user_id, model FROM temp.probe_keys
"""
_KEY_IDS = """
    SELECT k.key_id, k.client_org_id, k.user_id, k.model FROM temp.probe_keys AS p
    JOIN summary_keys AS k ON k.client_org_id = p.client_org_id
        AND k.user_id = p.user_id AND k.model = p.model
"""


class KeyedRow(Protocol):
    client_org_id: str
    user_id: str
    model: str


class SummaryKeyIds:
    """Key ids, cached per connection owner (ids never change once assigned)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str, str], int] = {}
        self._probe_ready: set[int] = set()

    def resolve(
        self, conn: sqlite3.Connection, rows: Iterable[KeyedRow]
    ) -> dict[tuple[str, str, str], int]:
        """The ids of the rows' keys (new keys inserted, inside the caller's transaction).
        Returns the whole cache: look keys up in it."""
        cache = self._cache
        missing = {
            key for row in rows if (key := (row.client_org_id, row.user_id, row.model)) not in cache
        }
        if missing:
            if id(conn) not in self._probe_ready:
                conn.execute(_PROBE_KEYS)
                self._probe_ready.add(id(conn))
            conn.execute("DELETE FROM temp.probe_keys")
            conn.executemany("INSERT INTO temp.probe_keys VALUES (?,?,?)", missing)
            conn.execute(_NEW_KEYS)
            for key_id, *key in conn.execute(_KEY_IDS):
                cache[tuple(key)] = key_id  # type: ignore[index]
        return cache

    def forget_connection(self, conn: sqlite3.Connection) -> None:
        """The connection closed: its TEMP table is gone (ids stay valid)."""
        self._probe_ready.discard(id(conn))
