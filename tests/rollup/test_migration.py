"""Migration 3 carries a membership-ledger database over to the folded-increment design."""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from pathlib import Path

import aiosqlite

from tables.schema import MIGRATIONS, migrate
from tables.summary_store import rollup_day


async def no_rate(conn: aiosqlite.Connection, day: object) -> None:
    return None


def _old_database(path: Path) -> None:
    """A summary DB as the previous release left it: ledger rows, one day rolled up, and
    keys of it and of another day still pending."""
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
    )
    for version, statements in MIGRATIONS[:2]:
        for statement in statements:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations VALUES (?, 'then')", (version,))
    rows = [
        # request, date, client, user, model, in, out, cost, estimated, partition, offset
        ("a", "2026-11-20", "org-1", "u", "m", 10, 5, 1_000, 0, 0, 1),
        ("b", "2026-11-20", "org-1", "u", "m", 20, 5, 2_000, 0, 0, 2),
        ("c", "2026-11-20", "org-1", "u", "m", 30, 5, 3_000, 1, 1, 1),  # late, pending
        ("d", "2026-11-21", "org-2", "u", "m", 40, 5, 4_000, 0, 1, 2),  # open day, pending
    ]
    conn.executemany(
        "INSERT INTO usage_events VALUES (?,?,?,?,?,?,?,?,?,0,'usage-events',?,?,'then')",
        rows,
    )
    conn.execute(
        "INSERT INTO usage_daily VALUES ('org-1','u','m','2026-11-20',30,10,40,2,0,3000,3900,"
        "NULL,3e-06,3.9e-06,NULL,NULL,NULL,1,'then')"
    )
    conn.execute("INSERT INTO closed_days VALUES ('2026-11-20', 'then', 'w')")
    conn.executemany(
        "INSERT INTO rollup_pending VALUES (?, ?, 'u', 'm')",
        [("2026-11-20", "org-1"), ("2026-11-21", "org-2")],
    )
    conn.commit()
    conn.close()


async def test_old_ledger_keeps_deduplicating_and_pending_keys_become_increments(
    tmp_path: Path,
) -> None:
    path = tmp_path / "usage.db"
    _old_database(path)
    conn = await aiosqlite.connect(path, isolation_level=None)
    try:
        await migrate(conn)
        async with conn.execute(
            "SELECT request_id, usage_date, client_org_id, cost_nano, source_offset"
            " FROM ledger_events ORDER BY 1"
        ) as cursor:
            assert [row[:4] for row in await cursor.fetchall()] == [
                ("a", "2026-11-20", "org-1", 1_000),
                ("b", "2026-11-20", "org-1", 2_000),
                ("c", "2026-11-20", "org-1", 3_000),
                ("d", "2026-11-21", "org-2", 4_000),
            ]
        # only what usage_daily lacks is pending: request c for the 20th, d for the 21st
        async with conn.execute(
            "SELECT usage_date, requests, estimated_requests, raw_cost_nano FROM daily_pending"
            " ORDER BY 1"
        ) as cursor:
            assert list(await cursor.fetchall()) == [
                ("2026-11-20", 1, 1, 3_000),
                ("2026-11-21", 1, 0, 4_000),
            ]
        async with conn.execute(
            "SELECT name FROM sqlite_master WHERE name IN ('usage_events', 'rollup_pending')"
        ) as cursor:
            assert await cursor.fetchall() == []
        await rollup_day(conn, "2026-11-20", Decimal("1.3"), no_rate)
        async with conn.execute(
            "SELECT requests, raw_cost_nano, markup_cost_nano, revision FROM usage_daily"
        ) as cursor:
            assert await cursor.fetchall() == [(3, 6_000, 7_800, 2)]
    finally:
        await conn.close()
    # the carried-over requests sit in live ledger buckets, where the single-file
    # design's deduplication probed them
    db = sqlite3.connect(path)
    try:
        known = db.execute(
            "SELECT request_id FROM ledger WHERE bucket IN (SELECT bucket FROM ledger_buckets)"
            " AND request_id IN ('a', 'd', 'new')"
        ).fetchall()
    finally:
        db.close()
    assert {rid for (rid,) in known} == {"a", "d"}
