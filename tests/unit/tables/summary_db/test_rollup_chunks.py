"""A date closed in chunks of keys (``CHUNK_KEYS``) gives exactly what one chunk gives: the
same ``usage_daily`` rows (inserted in the same order), the same ``adjustments`` (one per
client, the whole day's delta), the same :class:`DayRollup`; and the provisional rows of
an open date likewise. On a summary DB made by the project's migrations, with key ids in
an order unrelated to key order, rows stored by an earlier close (so that merges happen)
and the date's month closed (so that adjustments are written)."""

from __future__ import annotations

import random
import shutil
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import NamedTuple

import aiosqlite
import pytest

from tables.summary_db import summary_store
from tables.summary_db.schema import connect
from tables.summary_db.summary_store import DayRollup, refresh_open_days, rollup_day

DAY = "2026-11-20"
OPEN_DAY = "2026-12-02"
MARKUP = Decimal("1.3")
KEYS = 50
SMALL_CHUNK = 7


class FixedRate(NamedTuple):
    mid: Decimal
    table_no: str


async def a_rate(conn: aiosqlite.Connection, day: date) -> FixedRate:
    return FixedRate(Decimal("4.0123"), "224/A/NBP/2026")


def _keys() -> list[tuple[str, str, str]]:
    """50 keys of 5 clients, shuffled: key ids are not in key order."""
    keys = [(f"org-{i % 5}", f"user-{i % 7}", f"model-{i}") for i in range(KEYS)]
    random.Random(7).shuffle(keys)
    return keys


async def _pending(conn: aiosqlite.Connection, day: str, key_ids: list[int], seed: int) -> None:
    rng = random.Random(seed)
    await conn.executemany(
        "INSERT INTO daily_pending VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1)",
        [
            (
                day,
                key_id,
                rng.randrange(1, 10_000),
                rng.randrange(1, 10_000),
                requests := rng.randrange(1, 50),
                rng.randrange(0, requests),
                rng.randrange(1, 10**12),  # nano-dollars: rounding of markup and PLN matters
                rng.randrange(0, 3),
            )
            for key_id in key_ids
        ],
    )


@pytest.fixture
async def prepared(tmp_path: Path) -> Path:
    """A DB whose ``DAY`` has 30 keys closed once already, its month's statement closed,
    and then pending increments for all 50 keys (30 merges, 20 new rows); ``OPEN_DAY``
    has 50 dirty keys."""
    path = tmp_path / "usage.db"
    conn = await connect(path)
    try:
        await conn.executemany(
            "INSERT INTO summary_keys (client_org_id, user_id, model) VALUES (?, ?, ?)", _keys()
        )
        async with conn.execute("SELECT key_id FROM summary_keys ORDER BY key_id") as cursor:
            key_ids = [row[0] for row in await cursor.fetchall()]
        await _pending(conn, DAY, key_ids[::2] + key_ids[1:10:2], seed=1)
        await conn.commit()
        await rollup_day(conn, DAY, MARKUP, a_rate)
        await conn.execute("INSERT INTO closed_months VALUES ('2026-11', 'then')")
        await _pending(conn, DAY, key_ids, seed=2)
        await _pending(conn, OPEN_DAY, key_ids, seed=3)
        await conn.commit()
    finally:
        await conn.close()
    return path


async def _rows(conn: aiosqlite.Connection, sql: str) -> list[tuple[object, ...]]:
    async with conn.execute(sql) as cursor:
        return [tuple(row) for row in await cursor.fetchall()]


async def _state(conn: aiosqlite.Connection) -> dict[str, list[tuple[object, ...]]]:
    """Every row the rollup writes, less its clock readings (``updated_at``,
    ``created_at``, ``closed_at``); ``usage_daily`` with its rowid (insertion order)."""
    return {
        "usage_daily": await _rows(
            conn,
            "SELECT rowid, client_org_id, user_id, model, usage_date, input_tokens,"
            " output_tokens, total_tokens, requests, estimated_requests, raw_cost_nano,"
            " markup_cost_nano, markup_cost_pln_nano, raw_cost_usd, markup_cost_usd,"
            " markup_cost_pln, usd_pln_rate, nbp_table_no, markup_multiplier, revision"
            " FROM usage_daily ORDER BY rowid",
        ),
        "usage_daily_open": await _rows(
            conn,
            "SELECT client_org_id, user_id, model, usage_date, input_tokens, output_tokens,"
            " total_tokens, requests, estimated_requests, raw_cost_nano, markup_cost_nano,"
            " markup_cost_pln_nano, raw_cost_usd, markup_cost_usd, markup_cost_pln,"
            " usd_pln_rate, nbp_table_no, markup_multiplier, revision"
            " FROM usage_daily_open ORDER BY 1, 2, 3, 4",
        ),
        "adjustments": await _rows(
            conn,
            "SELECT client_org_id, usage_date, statement_month, requests, estimated_requests,"
            " input_tokens, output_tokens, total_tokens, raw_cost_nano, markup_cost_nano,"
            " markup_cost_pln_nano, reason FROM adjustments ORDER BY rowid",
        ),
        "daily_pending": await _rows(conn, "SELECT * FROM daily_pending ORDER BY 1, 2"),
        "closed_days": await _rows(conn, "SELECT usage_date, closed_by FROM closed_days"),
    }


async def _close_and_refresh(
    path: Path, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[DayRollup, int, dict[str, list[tuple[object, ...]]]]:
    monkeypatch.setattr(summary_store, "CHUNK_KEYS", chunk)
    conn = await connect(path)
    try:
        result = await rollup_day(conn, DAY, MARKUP, a_rate)
        refreshed = await refresh_open_days(conn, [OPEN_DAY], MARKUP, a_rate)
        return result, refreshed, await _state(conn)
    finally:
        await conn.close()


async def test_a_date_closed_in_chunks_equals_it_closed_whole(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole_db = tmp_path / "whole.db"
    shutil.copyfile(prepared, whole_db)

    chunked, chunked_open, chunked_state = await _close_and_refresh(
        prepared, SMALL_CHUNK, monkeypatch
    )
    whole, whole_open, whole_state = await _close_and_refresh(whole_db, KEYS * 10, monkeypatch)

    assert chunked == whole
    assert chunked == DayRollup(
        usage_date=DAY,
        records=chunked.records,
        summaries_written=KEYS,  # 30 merged, 20 new
        clients=5,
        late_rewrite=True,
        late_events=chunked.late_events,
    )
    assert chunked.records > 0 and chunked.late_events > 0
    assert chunked_open == whole_open == KEYS
    assert chunked_state == whole_state
    adjustments = chunked_state["adjustments"]
    assert [row[0] for row in adjustments] == [f"org-{i}" for i in range(5)]  # one per client
    assert all(row[1:3] == (DAY, "2026-12") and row[-1] == "late_events" for row in adjustments)
    merged = chunked_state["usage_daily"]
    assert len(merged) == KEYS and sum(row[-1] == 2 for row in merged) == 30  # revision 2
    left = chunked_state["daily_pending"]  # the open date's, all shown now (live_dirty 0)
    assert len(left) == KEYS and all(row[0] == OPEN_DAY and row[-1] == 0 for row in left)
    assert len(chunked_state["usage_daily_open"]) == KEYS


async def test_adjustments_hold_the_whole_days_delta_per_client(
    prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each client's adjustment is what its keys' rows gained, summed over all chunks."""
    conn = await connect(prepared)
    try:
        gained = await _rows(
            conn,
            "SELECT k.client_org_id, SUM(p.requests), SUM(p.raw_cost_nano)"
            " FROM daily_pending p JOIN summary_keys k USING (key_id)"
            " WHERE p.usage_date = '2026-11-20' GROUP BY 1 ORDER BY 1",
        )
    finally:
        await conn.close()
    *_, state = await _close_and_refresh(prepared, SMALL_CHUNK, monkeypatch)
    assert [(row[0], row[3], row[8]) for row in state["adjustments"]] == gained
