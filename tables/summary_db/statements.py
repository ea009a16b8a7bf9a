"""Statements that close, and the adjustments that correct them (docs/contract.md §3).

A month closes ``STATEMENT_GRACE_DAYS`` after its last day: at local midnight (in
``BUSINESS_TIMEZONE``) of day ``last day + 1 + grace``. :func:`close_due_months` then
writes ``statements`` (one row per client with usage: the month's ``usage_daily`` sums)
and the month's ``closed_months`` row, in one transaction. Months close in order, each
only when nothing of it is still waiting:

* no pending increments of its dates (every day of it closed and merged: a day's own
  close comes ``WINDOW_GRACE_SECONDS`` after its midnight, and a late event merges within
  a rollup interval);
* every row of it has its PLN amount (an NBP rate is known for every date): a statement
  is a bill in PLN too, and one issued with PLN missing could never be completed, since a
  statement is never changed. The month waits for the refresh (logged once);
* the summary writer is not catching up on a backlog (the caller's check).

So ``closed_months`` is contiguous from the first month closed (the earliest month with
usage): a month is closed when it is at most the latest closed month, and the first month
still open is the one after it. A month without usage closes too (no statement rows), so
that the first open month moves on.

``statements`` are never changed (triggers refuse it). Usage that changes a closed month
afterwards still corrects ``usage_daily`` (a late event's merge, a replay), and the
difference becomes an ``adjustments`` row per client and date
(:func:`record_adjustments`): the deltas in ``usage_daily``'s column names, ``reason``
``late_events`` or ``replay``, ``statement_month`` the first month still open when it was
recorded (where it is billed). A closed statement plus the adjustments of its dates equals
``usage_daily`` now, to the nano.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import NamedTuple

import aiosqlite

from tables.summary_db.columns import SUMMED_COLUMNS, SummaryValues
from tables.summary_db.schema import utc_now_text, write_transaction

__all__ = [
    "AdjustmentDeltas",
    "MonthClose",
    "Usage",
    "close_due_months",
    "closes_on",
    "first_open_month",
    "last_closed_month",
    "month_is_closed",
    "next_month",
    "record_adjustments",
    "usage_of_values",
]

log = logging.getLogger(__name__)


class Usage(NamedTuple):
    """The summed columns of one ``usage_daily`` row (or a delta of them)."""

    requests: int
    estimated_requests: int
    input_tokens: int
    output_tokens: int
    total_tokens: int
    raw_cost_nano: int
    markup_cost_nano: int
    markup_cost_pln_nano: int | None  # None: no rate (or, in a delta, not known)


ZERO = Usage(0, 0, 0, 0, 0, 0, 0, 0)


def usage_of_values(values: SummaryValues) -> Usage:
    """A :func:`tables.summary_db.summary_store._summary_values` tuple's summed columns."""
    return Usage(
        values[7],
        values[8],
        values[4],
        values[5],
        values[6],
        values[9],
        values[10],
        values[11],
    )


def next_month(month: str) -> str:
    year, number = int(month[:4]), int(month[5:7])
    return f"{year + number // 12:04d}-{number % 12 + 1:02d}"


def closes_on(month: str, grace_days: int) -> date:
    """The local date at whose midnight ``month`` closes: its last day + 1 + grace."""
    return date.fromisoformat(next_month(month) + "-01") + timedelta(days=grace_days)


async def _scalar(conn: aiosqlite.Connection, sql: str, params: tuple[object, ...] = ()) -> object:
    async with conn.execute(sql, params) as cursor:
        row = await cursor.fetchone()
    return None if row is None else row[0]


async def last_closed_month(conn: aiosqlite.Connection) -> str | None:
    return await _scalar(conn, "SELECT MAX(usage_month) FROM closed_months")  # type: ignore[return-value]


async def month_is_closed(conn: aiosqlite.Connection, month: str) -> bool:
    last = await last_closed_month(conn)
    return last is not None and month <= last


async def first_open_month(conn: aiosqlite.Connection) -> str | None:
    """The month after the latest closed one (None while no month has closed)."""
    last = await last_closed_month(conn)
    return None if last is None else next_month(last)


class AdjustmentDeltas:
    """Per-client sums of the changes (client, row before or None, row after or None) to
    one date's rows, fed in any number of steps and written once: a rollup reads a
    date's keys in chunks (tables/summary_db/summary_store.py), but ``adjustments`` has
    one row per client and date with the whole change. The PLN delta is None when a side
    has no PLN amount. Memory is one small list per client, not per key."""

    def __init__(self) -> None:
        self._deltas: dict[str, list[int | None]] = {}

    def add(self, changes: Iterable[tuple[str, Usage | None, Usage | None]]) -> None:
        deltas = self._deltas
        for client, old, new in changes:
            before, after = old or ZERO, new or ZERO
            delta = deltas.setdefault(client, [0] * len(SUMMED_COLUMNS))
            for index in range(len(SUMMED_COLUMNS)):
                was, now, sum_so_far = before[index], after[index], delta[index]
                if was is None or now is None or sum_so_far is None:
                    delta[index] = None
                else:
                    delta[index] = sum_so_far + now - was

    async def write(self, conn: aiosqlite.Connection, usage_date: str, reason: str) -> int:
        """Inside the caller's transaction: one ``adjustments`` row per client whose sum
        differs. Returns the rows written (none while no month is closed)."""
        statement_month = await first_open_month(conn)
        if statement_month is None:  # no month closed: nothing to adjust
            return 0
        rows = [
            (client, usage_date, statement_month, *delta, reason, utc_now_text())
            for client, delta in sorted(self._deltas.items())
            if any(value != 0 for value in delta)
        ]
        await conn.executemany(
            f"INSERT INTO adjustments (client_org_id, usage_date, statement_month,"
            f" {', '.join(SUMMED_COLUMNS)}, reason, created_at)"
            f" VALUES (?, ?, ?, {', '.join('?' * len(SUMMED_COLUMNS))}, ?, ?)",
            rows,
        )
        return len(rows)


async def record_adjustments(
    conn: aiosqlite.Connection,
    usage_date: str,
    changes: Iterable[tuple[str, Usage | None, Usage | None]],
    reason: str,
) -> int:
    """Inside the caller's transaction: one ``adjustments`` row per client of
    ``changes`` (client, row before or None, row after or None) whose sum differs; the
    PLN delta is NULL when a side has no PLN amount. Returns the rows written."""
    if await first_open_month(conn) is None:  # no month closed: nothing to adjust
        return 0
    deltas = AdjustmentDeltas()
    deltas.add(changes)
    return await deltas.write(conn, usage_date, reason)


@dataclass(frozen=True, slots=True)
class MonthClose:
    closed: list[str]  # months closed by this call, in order
    waiting: str | None  # why the next due month did not close (None: none due)


_STATEMENT_SQL = """
INSERT INTO statements (client_org_id, usage_month, closed_at, input_tokens, output_tokens,
    total_tokens, requests, estimated_requests, raw_cost_nano, markup_cost_nano,
    markup_cost_pln_nano, raw_cost_usd, markup_cost_usd, markup_cost_pln)
SELECT client_org_id, :month, :closed_at, SUM(input_tokens), SUM(output_tokens),
    SUM(total_tokens), SUM(requests), SUM(estimated_requests), SUM(raw_cost_nano),
    SUM(markup_cost_nano),
    CASE WHEN SUM(pln_rows) = SUM(rows) THEN SUM(markup_cost_pln_nano) END,
    SUM(raw_cost_nano) / 1e9, SUM(markup_cost_nano) / 1e9,
    CASE WHEN SUM(pln_rows) = SUM(rows) THEN SUM(markup_cost_pln_nano) / 1e9 END
FROM usage_client_daily WHERE usage_date >= :start AND usage_date < :end
GROUP BY client_org_id
"""


async def _first_candidate(conn: aiosqlite.Connection) -> str | None:
    last = await last_closed_month(conn)
    if last is not None:
        return next_month(last)
    first = await _scalar(
        conn,
        "SELECT MIN(d) FROM (SELECT MIN(usage_date) AS d FROM usage_daily"
        " UNION ALL SELECT MIN(usage_date) FROM daily_pending)",
    )
    return None if first is None else str(first)[:7]


async def _why_not(conn: aiosqlite.Connection, month: str, start: str, end: str) -> str | None:
    pending = await _scalar(
        conn,
        "SELECT usage_date FROM daily_pending WHERE usage_date >= ? AND usage_date < ?"
        " ORDER BY usage_date LIMIT 1",
        (start, end),
    )
    if pending is not None:
        return f"statement {month} waits: usage of {pending} is not merged yet"
    no_rate = await _scalar(
        conn,
        "SELECT usage_date FROM usage_daily INDEXED BY usage_daily_pln_pending"
        " WHERE usage_date >= ? AND usage_date < ? AND markup_cost_pln_nano IS NULL"
        " ORDER BY usage_date LIMIT 1",
        (start, end),
    )
    if no_rate is not None:
        return f"statement {month} waits for the NBP rate of {no_rate} (PLN pending)"
    return None


async def close_due_months(conn: aiosqlite.Connection, today: date, grace_days: int) -> MonthClose:
    """Close every month that is due and complete, in order (module docstring); each in
    one ``BEGIN IMMEDIATE`` transaction, so a statement and its month's close are one."""
    closed: list[str] = []
    while True:
        async with write_transaction(conn):
            month = await _first_candidate(conn)
            if month is None or closes_on(month, grace_days) > today:
                return MonthClose(closed, None)
            start, end = f"{month}-01", f"{next_month(month)}-01"
            waiting = await _why_not(conn, month, start, end)
            if waiting is not None:
                return MonthClose(closed, waiting)
            closed_at = utc_now_text()
            await conn.execute(
                _STATEMENT_SQL,
                {"month": month, "closed_at": closed_at, "start": start, "end": end},
            )
            await conn.execute("INSERT INTO closed_months VALUES (?, ?)", (month, closed_at))
        closed.append(month)
