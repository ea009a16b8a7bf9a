"""Summary keys ((client, user, model) → a small integer id) and the fold of batch sums
into ``daily_pending``: the one way sums reach the summary DB (the summary writer's
batch-log apply, and a replay's apply up to its fences).

Why the fold is SQL: the summary writer runs in the worker's process, beside the hot
path. Summing ~one row per event in Python held the GIL for a fifth of the worker's
time. SQLite releases the GIL for the whole of a statement, so here the rows are staged
into a TEMP table (straight from the batch log's JSON text with ``json_each`` when it
can), and a few ``INSERT … SELECT`` statements resolve the keys, sum per (date, key),
count the late requests and upsert ``daily_pending``, on the second core, while the hot
path goes on.

Exactness: the staging table is ``STRICT``, so a number that is not a 64-bit integer
(JSON text SQLite would read as a REAL) is an error, never a rounded value; ``SUM`` of
integers raises on overflow. Text reaches SQLite's JSON functions only when it has no
escaped NUL (``\\u0000``), which those functions would cut short; such rows are decoded
in Python and bound as values instead.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

import msgspec

from streams.kafka.batch_log import SumRow
from tables.summary_db.schema import json_for_sqlite

__all__ = ["FoldedSums", "SumsFolder"]

_STAGE_TABLE = """
    CREATE TEMP TABLE IF NOT EXISTS fold_rows (
        usage_date TEXT NOT NULL,
        client_org_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        model TEXT NOT NULL,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        requests INTEGER NOT NULL,
        estimated_requests INTEGER NOT NULL,
        raw_cost_nano INTEGER NOT NULL
    ) STRICT
"""
# one batch-log entry's rows (a JSON array of SumRow arrays) in one statement
_STAGE_JSON = """
    INSERT INTO temp.fold_rows
    SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6,
        value->>7, value->>8
    FROM json_each(?)
"""
_STAGE_VALUES = "INSERT INTO temp.fold_rows VALUES (?,?,?,?,?,?,?,?,?)"
#: Keys not seen before get an id. The staged rows are probed first and only the new
#: ones are made DISTINCT: sorting every staged row for DISTINCT cost ~3 µs a row, the
#: probe ~1.5 (bench/writer_rate.py's rows, nearly all keys known).
_NEW_KEYS = """
    INSERT OR IGNORE INTO summary_keys (client_org_id, user_id, model)
    SELECT DISTINCT r.client_org_id, r.user_id, r.model FROM temp.fold_rows AS r
    WHERE NOT EXISTS (
        SELECT 1 FROM summary_keys AS k
        WHERE k.client_org_id = r.client_org_id AND k.user_id = r.user_id AND k.model = r.model
    )
"""
_COUNTS = """
    SELECT COALESCE(SUM(r.requests), 0),
        COALESCE(SUM(CASE WHEN c.usage_date IS NULL THEN 0 ELSE r.requests END), 0)
    FROM temp.fold_rows AS r LEFT JOIN closed_days AS c ON c.usage_date = r.usage_date
"""
#: Adds the staged rows to ``daily_pending``, summed per (usage_date, key_id) first: input,
#: output, requests, estimated, cost, and the requests of dates already closed (late).
_FOLD = """
    INSERT INTO daily_pending
    SELECT r.usage_date, k.key_id, SUM(r.input_tokens), SUM(r.output_tokens),
        SUM(r.requests), SUM(r.estimated_requests), SUM(r.raw_cost_nano),
        CASE WHEN c.usage_date IS NULL THEN 0 ELSE SUM(r.requests) END, 1
    FROM temp.fold_rows AS r
    JOIN summary_keys AS k ON k.client_org_id = r.client_org_id
        AND k.user_id = r.user_id AND k.model = r.model
    LEFT JOIN closed_days AS c ON c.usage_date = r.usage_date
    WHERE true
    GROUP BY r.usage_date, k.key_id
    ON CONFLICT (usage_date, key_id) DO UPDATE SET
        live_dirty = 1,
        input_tokens = input_tokens + excluded.input_tokens,
        output_tokens = output_tokens + excluded.output_tokens,
        requests = requests + excluded.requests,
        estimated_requests = estimated_requests + excluded.estimated_requests,
        raw_cost_nano = raw_cost_nano + excluded.raw_cost_nano,
        late_events = late_events + excluded.late_events
"""
_ROWS = msgspec.json.Decoder(list[SumRow])


class FoldedSums(msgspec.Struct, frozen=True):
    requests: int  # requests added
    late: int  # of which for dates already closed


class SumsFolder:
    """Stages rows, then folds them into ``daily_pending`` inside the caller's
    transaction (module docstring). One per connection: the TEMP table is the
    connection's."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        conn.execute(_STAGE_TABLE)
        conn.execute("DELETE FROM temp.fold_rows")

    def add_json(self, rows: bytes | memoryview) -> None:
        """A batch-log entry's ``rows`` as their JSON text (``msgspec.Raw``)."""
        raw = bytes(rows)
        text = json_for_sqlite(raw)
        if text is None:
            self.add(_ROWS.decode(raw))
        else:
            self.conn.execute(_STAGE_JSON, (text,))

    def add(self, rows: Iterable[SumRow]) -> None:
        self.conn.executemany(_STAGE_VALUES, [msgspec.structs.astuple(row) for row in rows])

    def fold(self) -> FoldedSums:
        """Everything staged into ``daily_pending``; the staging table is emptied."""
        conn = self.conn
        requests, late = conn.execute(_COUNTS).fetchone()
        conn.execute(_NEW_KEYS)
        conn.execute(_FOLD)
        conn.execute("DELETE FROM temp.fold_rows")
        return FoldedSums(requests, late)
