"""Migrations on databases older releases left: 3 carries a membership-ledger database over
to the folded-increment design, 6 drops the single-file design's per-event ledger."""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from pathlib import Path

import aiosqlite

from tables.summary_db.schema import MIGRATIONS, connect, migrate
from tables.summary_db.summary_store import rollup_day


async def no_rate(conn: aiosqlite.Connection, day: object) -> None:
    return None


def _migrate_to(conn: sqlite3.Connection, last: int) -> None:
    """Apply the migrations up to version ``last`` that are missing, as a release that
    ended there did."""
    for version, statements in MIGRATIONS:
        done = conn.execute("SELECT 1 FROM schema_migrations WHERE version = ?", (version,))
        if version > last or done.fetchone() is not None:
            continue
        for statement in statements:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations VALUES (?, 'then')", (version,))
    conn.commit()


def _names(conn: sqlite3.Connection, *names: str) -> set[str]:
    marks = ",".join("?" * len(names))
    found = conn.execute(f"SELECT name FROM sqlite_master WHERE name IN ({marks})", names)
    return {name for (name,) in found}


LEDGER = ("ledger", "ledger_buckets", "ledger_events")


def _old_database(path: Path) -> None:
    """A summary DB as the previous release left it: ledger rows, one day rolled up, and
    keys of it and of another day still pending."""
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
    )
    _migrate_to(conn, 2)
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


async def test_old_ledger_is_carried_over_and_pending_keys_become_increments(
    tmp_path: Path,
) -> None:
    path = tmp_path / "usage.db"
    _old_database(path)
    db = sqlite3.connect(path)
    try:
        _migrate_to(db, 5)  # the single-file design's release: migration 3 applied
        rows = db.execute(
            "SELECT request_id, usage_date, client_org_id, cost_nano, source_offset"
            " FROM ledger_events ORDER BY 1"
        ).fetchall()
        assert [row[:4] for row in rows] == [
            ("a", "2026-11-20", "org-1", 1_000),
            ("b", "2026-11-20", "org-1", 2_000),
            ("c", "2026-11-20", "org-1", 3_000),
            ("d", "2026-11-21", "org-2", 4_000),
        ]
        # only what usage_daily lacks is pending: request c for the 20th, d for the 21st
        assert db.execute(
            "SELECT usage_date, requests, estimated_requests, raw_cost_nano FROM daily_pending"
            " ORDER BY 1"
        ).fetchall() == [("2026-11-20", 1, 1, 3_000), ("2026-11-21", 1, 0, 4_000)]
        assert _names(db, "usage_events", "rollup_pending") == set()
        # the carried-over requests sit in live ledger buckets, where the single-file
        # design's deduplication probed them
        known = db.execute(
            "SELECT request_id FROM ledger WHERE bucket IN (SELECT bucket FROM ledger_buckets)"
            " AND request_id IN ('a', 'd', 'new')"
        ).fetchall()
        assert {rid for (rid,) in known} == {"a", "d"}
    finally:
        db.close()
    conn = await aiosqlite.connect(path, isolation_level=None)
    try:
        await migrate(conn)  # today's release: the ledger goes, the increments stay
        async with conn.execute("SELECT COUNT(*) FROM daily_pending") as cursor:
            assert await cursor.fetchone() == (2,)
        await rollup_day(conn, "2026-11-20", Decimal("1.3"), no_rate)
        async with conn.execute(
            "SELECT requests, raw_cost_nano, markup_cost_nano, revision FROM usage_daily"
        ) as cursor:
            assert await cursor.fetchall() == [(3, 6_000, 7_800, 2)]
    finally:
        await conn.close()
    db = sqlite3.connect(path)
    try:
        assert _names(db, *LEDGER) == set()
    finally:
        db.close()


async def test_migration_6_drops_the_ledger_and_keeps_source_offsets(tmp_path: Path) -> None:
    """A database the single-file design billed: its ledger goes, its stored offsets stay
    for carry_over_offsets (the upgrade path), its pending sums are untouched."""
    path = tmp_path / "usage.db"
    db = sqlite3.connect(path)
    try:
        db.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        _migrate_to(db, 5)
        db.execute("INSERT INTO summary_keys VALUES (1, 'org-1', 'u', 'm')")
        db.execute("INSERT INTO ledger_buckets VALUES (1000)")
        db.execute("INSERT INTO ledger VALUES (1000, 'a', 740000, 1, 10, 5, 1000, 0, 0, 7)")
        db.execute("INSERT INTO daily_pending VALUES ('2026-11-20', 1, 10, 5, 1, 0, 1000, 0, 1)")
        db.executemany(
            "INSERT INTO source_offsets VALUES (?, ?, ?, 'then')",
            [("usage-events", 0, 8), ("usage-events", 1, 3)],
        )
        db.commit()
    finally:
        db.close()
    conn = await connect(path)
    try:
        await migrate(conn)  # again: nothing left to apply
    finally:
        await conn.close()
    db = sqlite3.connect(path)
    try:
        assert _names(db, *LEDGER) == set()
        assert db.execute("SELECT 1 FROM schema_migrations WHERE version = 6").fetchone()
        assert db.execute(
            "SELECT topic, partition, next_offset FROM source_offsets ORDER BY 2"
        ).fetchall() == [("usage-events", 0, 8), ("usage-events", 1, 3)]
        assert db.execute("SELECT usage_date, key_id, requests FROM daily_pending").fetchall() == [
            ("2026-11-20", 1, 1)
        ]
    finally:
        db.close()


async def test_a_new_database_has_no_ledger(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    await (await connect(path)).close()
    db = sqlite3.connect(path)
    try:
        assert _names(db, *LEDGER, "source_offsets") == {"source_offsets"}
    finally:
        db.close()
