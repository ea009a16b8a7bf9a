"""The day a month's statement closes (docs/contract.md §3: ``STATEMENT_GRACE_DAYS`` after
its last day; docs/billing.md: at local midnight of day last day + 1 + grace), and the
due-months check of the rollup (:func:`close_due_months`) the day before and on the day,
on a DB migrated by the worker's own code."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path

import aiosqlite
import pytest

from streams.settings import Settings
from tables.summary_db.schema import connect
from tables.summary_db.statements import close_due_months, closes_on


@pytest.mark.parametrize(
    ("month", "grace", "closes"),
    [
        ("2026-11", 3, date(2026, 12, 4)),  # 30 November + 1 + 3
        ("2026-12", 3, date(2027, 1, 4)),  # across the year
        ("2028-02", 3, date(2028, 3, 4)),  # a leap February: 29 days
        ("2027-02", 3, date(2027, 3, 4)),
        ("2026-11", 0, date(2026, 12, 1)),  # no grace: at the month's own end
        ("2026-01", 31, date(2026, 3, 4)),
    ],
)
def test_closes_on_is_the_day_after_the_grace_days(month: str, grace: int, closes: date) -> None:
    assert closes_on(month, grace) == closes


def test_the_default_grace_is_three_days() -> None:
    assert Settings.model_fields["STATEMENT_GRACE_DAYS"].default == 3


_COLUMNS = (
    "client_org_id, user_id, model, usage_date, input_tokens, output_tokens, total_tokens,"
    " requests, estimated_requests, raw_cost_nano, markup_cost_nano, markup_cost_pln_nano,"
    " raw_cost_usd, markup_cost_usd, markup_cost_pln, usd_pln_rate, nbp_table_no, revision,"
    " updated_at"
)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[aiosqlite.Connection]:
    """Closed rows of 2026-11-30 (two clients) and 2026-12-01, every one with its PLN."""
    conn = await connect(tmp_path / "usage.db")
    rows = [
        ("org-1", "u", "m", "2026-11-30", 10, 5, 15, 2, 0, 1_000, 1_300, 5_200),
        ("org-2", "u", "m", "2026-11-30", 1, 1, 2, 1, 1, 7, 9, 36),
        ("org-1", "u", "m", "2026-12-01", 3, 3, 6, 1, 0, 100, 130, 520),
    ]
    await conn.executemany(
        f"INSERT INTO usage_daily ({_COLUMNS}) VALUES ({','.join('?' * 19)})",
        [
            (*row, row[9] / 1e9, row[10] / 1e9, row[11] / 1e9, "4.0", "1/A/NBP/2026", 1, "now")
            for row in rows
        ],
    )
    await conn.commit()
    yield conn
    await conn.close()


async def _statements(conn: aiosqlite.Connection) -> list[tuple]:
    async with conn.execute(
        "SELECT client_org_id, usage_month, requests, raw_cost_nano, markup_cost_nano,"
        " markup_cost_pln_nano FROM statements ORDER BY 1, 2"
    ) as cursor:
        return [tuple(row) for row in await cursor.fetchall()]


@pytest.mark.parametrize(
    ("grace", "day_before", "due"),
    [(3, date(2026, 12, 3), date(2026, 12, 4)), (0, date(2026, 11, 30), date(2026, 12, 1))],
)
async def test_a_month_is_due_on_its_close_day_not_the_day_before(
    db: aiosqlite.Connection, grace: int, day_before: date, due: date
) -> None:
    early = await close_due_months(db, day_before, grace)
    assert (early.closed, early.waiting) == ([], None)
    assert await _statements(db) == []
    async with db.execute("SELECT COUNT(*) FROM closed_months") as cursor:
        assert await cursor.fetchone() == (0,)

    closed = await close_due_months(db, due, grace)
    assert (closed.closed, closed.waiting) == (["2026-11"], None)  # December is not due
    assert await _statements(db) == [
        ("org-1", "2026-11", 2, 1_000, 1_300, 5_200),
        ("org-2", "2026-11", 1, 7, 9, 36),
    ]
    again = await close_due_months(db, due, grace)  # closed once: nothing more to do
    assert (again.closed, again.waiting) == ([], None)
