"""``write_summaries``' one-statement upsert (rows as JSON, GIL released) against the
row-by-row upsert it replaces (tables/summary_db/summary_store.py): the same stored values, REAL
columns to the bit, the same change counts and revisions."""

from __future__ import annotations

import asyncio
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tables.summary_db import summary_store
from tables.summary_db.schema import connect, write_transaction
from tables.summary_db.summary_store import SummaryRow, write_summaries


class _Rate(NamedTuple):
    mid: Decimal
    table_no: str


_TEXT = st.sampled_from(["org", 'o"r\\g', "org\x00x", "żółw", "a\nb", "x" * 40])
_ROWS = st.lists(
    st.builds(
        SummaryRow,
        _TEXT,
        _TEXT,
        st.sampled_from(["m", "m\x00", "gpt-4o"]),
        st.sampled_from(["2026-11-27", "2026-11-28"]),
        st.integers(0, 10**12),
        st.integers(0, 10**12),
        st.integers(1, 10**6),
        st.integers(0, 10),
        st.one_of(st.integers(0, 10**15), st.integers(2**53 - 10, 2**53 + 10**9)),
    ),
    max_size=20,
)


def _stored(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return sorted(
            (table, *(value.hex() if isinstance(value, float) else value for value in row))
            for table in ("usage_daily", "usage_daily_open")
            for row in conn.execute(f"SELECT * FROM {table}")  # noqa: S608
        )


async def _write(
    path: Path, batches: list[list[SummaryRow]], rate: _Rate | None, one_by_one: bool
) -> list[int]:
    conn = await connect(path)
    changed = []
    try:
        for rows in batches:
            async with write_transaction(conn):
                if one_by_one:  # the row-by-row upsert, as before
                    values = [
                        summary_store._summary_values(r, Decimal("1.3"), rate, "t") for r in rows
                    ]
                    cursor = await conn.executemany(summary_store._UPSERT, values)
                    changed.append(cursor.rowcount)  # usage_daily's rows, not the triggers
                else:
                    changed.append(await write_summaries(conn, rows, Decimal("1.3"), rate))
                # the open days' provisional rows (refresh_open_days), both ways too
                values = [summary_store._summary_values(r, Decimal("1.3"), rate, "t") for r in rows]
                payload = None if one_by_one else summary_store._as_json(values)
                if payload is None:
                    await conn.executemany(summary_store._OPEN_UPSERT, values)
                else:
                    await conn.execute(summary_store._OPEN_UPSERT_JSON, (payload,))
    finally:
        await conn.close()
    return changed


@settings(max_examples=40, deadline=None)
@given(_ROWS, _ROWS, st.booleans())
def test_one_statement_upsert_stores_what_the_row_by_row_one_stored(
    tmp_path_factory: pytest.TempPathFactory,
    first: list[SummaryRow],
    second: list[SummaryRow],
    with_rate: bool,
) -> None:
    rate = _Rate(Decimal("4.0123"), "230/A/NBP/2026") if with_rate else None
    # one key once per batch (a rollup writes each key once); the second batch re-writes
    # some keys, changed or not
    batches = [list({r.key: r for r in rows}.values()) for rows in (first, first + second)]
    results = {}
    for one_by_one in (True, False):
        path = tmp_path_factory.mktemp("db") / "usage.db"
        changed = asyncio.run(_write_fixed_time(path, batches, rate, one_by_one))
        results[one_by_one] = (changed, _stored(path))
    assert results[False] == results[True]
    assert results[False][1] or not first + second


async def _write_fixed_time(
    path: Path, batches: list[list[SummaryRow]], rate: _Rate | None, one_by_one: bool
) -> list[int]:
    # the same updated_at for both paths, so whole rows compare
    original = summary_store.utc_now_text
    summary_store.utc_now_text = lambda: "t"
    try:
        return await _write(path, batches, rate, one_by_one)
    finally:
        summary_store.utc_now_text = original


def test_plain_rows_take_the_one_statement_path_and_odd_ones_the_other() -> None:
    plain = SummaryRow("org", "user", "m", "2026-11-27", 1, 2, 1, 0, 2**53 - 1)
    values = [summary_store._summary_values(plain, Decimal("1"), None, "t")]
    assert summary_store._as_json(values) is not None
    for odd in (plain._replace(raw_cost_nano=2**53), plain._replace(user_id="u\x00")):
        odd_values = [summary_store._summary_values(odd, Decimal("1"), None, "t")]
        assert summary_store._as_json(odd_values) is None
