"""Read-only SQL behind ``usage-stream report`` (the monthly statement).

The report opens the summary DB read-only (``mode=ro``): the business side may run it with
read access alone, and a statement must never change the data it states. It reads
``usage_daily_live`` when the DB has it (closed days plus provisional rows of open days,
each with ``final``) and otherwise ``usage_daily`` alone (closed days only; an older DB).
Money is read from the exact ``*_nano`` integers, never from the REAL convenience columns.

A closed month (``closed_months``, tables/summary_db/statements.py) is stated from
``statements``, as issued, with the ``adjustments`` of its dates recorded since; an open
month lists the adjustments that land on it (``statement_month``). DBs from before those
tables have no closed months and no adjustments.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from tables.summary_db.columns import KEY_COLUMNS, SUMMED_COLUMNS
from tables.summary_db.command_db import connect_read_only, has_table
from tables.summary_db.statements import Usage

__all__ = [
    "AdjustmentRow",
    "ReportRow",
    "IssuedRow",
    "adjustment_rows",
    "ReportSourceError",
    "closed_at",
    "issued_rows",
    "last_usage_month",
    "month_bounds",
    "month_rows",
    "open_readonly",
    "unrolled_dates",
    "usage_source",
]

LIVE_SOURCE = "usage_daily_live"
CLOSED_SOURCE = "usage_daily"

_COLUMNS = ", ".join((*KEY_COLUMNS, *SUMMED_COLUMNS, "usd_pln_rate", "nbp_table_no"))


class ReportSourceError(RuntimeError):
    """The summary DB cannot be read (missing, unreadable, or not a usage-stream DB)."""


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One ``usage_daily`` (or ``usage_daily_live``) row; its sums (money in exact
    nano-units) as the :class:`~tables.summary_db.statements.Usage` every sum row shares."""

    client_org_id: str
    user_id: str
    model: str
    usage_date: str
    usage: Usage
    usd_pln_rate: str | None
    nbp_table_no: str | None
    final: bool


# A ReportRow as its SELECT lists the columns, ``final`` an integer (sqlite3 types rows as Any).
_ReportRowValues = tuple[
    str, str, str, str, int, int, int, int, int, int, int, int | None, str | None, str | None, int
]


@dataclass(frozen=True, slots=True)
class IssuedRow:
    """A ``statements`` row: a client's closed month as issued, its sums a ``Usage``."""

    client_org_id: str
    closed_at: str
    usage: Usage


@dataclass(frozen=True, slots=True)
class AdjustmentRow:
    """An ``adjustments`` row: a correction of a closed month, billed on ``statement_month``
    (``usage`` holds the deltas)."""

    id: int
    client_org_id: str
    usage_date: str
    statement_month: str
    usage: Usage
    reason: str
    created_at: str


_SUMS = ", ".join(SUMMED_COLUMNS)


def closed_at(conn: sqlite3.Connection, month: date) -> str | None:
    """When ``month``'s statement was issued (None: open, or a DB without statements)."""
    if not has_table(conn, "closed_months"):
        return None
    row = conn.execute(
        "SELECT closed_at FROM closed_months WHERE usage_month = ?", (month.strftime("%Y-%m"),)
    ).fetchone()
    return None if row is None else str(row[0])


def issued_rows(conn: sqlite3.Connection, month: date, client: str | None) -> list[IssuedRow]:
    """The closed month's ``statements`` rows (optionally one client), by client."""
    sql = (
        f"SELECT client_org_id, closed_at, {_SUMS} FROM statements WHERE usage_month = ?"
        + (" AND client_org_id = ?" if client is not None else "")
        + " ORDER BY client_org_id"
    )
    label = month.strftime("%Y-%m")
    params: tuple[str, ...] = (label,) if client is None else (label, client)
    return [
        IssuedRow(row[0], row[1], Usage(*row[2:])) for row in conn.execute(sql, params).fetchall()
    ]


def adjustment_rows(
    conn: sqlite3.Connection, month: date, client: str | None, *, closed: bool
) -> list[AdjustmentRow]:
    """Of a closed month: the adjustments of its dates (every one is recorded after its
    close). Of an open month: the adjustments that land on it. In the order recorded."""
    if not has_table(conn, "adjustments"):
        return []
    start, end = month_bounds(month)
    where, params = (
        ("usage_date >= ? AND usage_date < ?", [start, end])
        if closed
        else ("statement_month = ?", [month.strftime("%Y-%m")])
    )
    if client is not None:
        where += " AND client_org_id = ?"
        params.append(client)
    rows = conn.execute(
        f"SELECT id, client_org_id, usage_date, statement_month, {_SUMS}, reason, created_at"
        f" FROM adjustments WHERE {where} ORDER BY id",
        params,
    ).fetchall()
    return [
        AdjustmentRow(row[0], row[1], row[2], row[3], Usage(*row[4:12]), row[12], row[13])
        for row in rows
    ]


def open_readonly(path: Path) -> sqlite3.Connection:
    """Open the summary DB read-only; :class:`ReportSourceError` when that is impossible.

    A missing file is an error, not a new empty DB (``mode=ro`` never creates one), and a
    file without ``usage_daily`` is named as such instead of failing later in a query.
    """
    if not path.is_file():
        raise ReportSourceError(f"summary DB {path} does not exist")
    try:
        conn = connect_read_only(path)
        found = has_table(conn, CLOSED_SOURCE)
    except sqlite3.Error as error:
        raise ReportSourceError(f"summary DB {path} is not readable: {error}") from None
    if not found:
        conn.close()
        raise ReportSourceError(f"{path} is not a usage-stream summary DB (no usage_daily)")
    return conn


def usage_source(conn: sqlite3.Connection) -> str:
    """``usage_daily_live`` when the DB has it (table or view), else ``usage_daily``."""
    return LIVE_SOURCE if has_table(conn, LIVE_SOURCE) else CLOSED_SOURCE


def month_bounds(month: date) -> tuple[str, str]:
    """``[first day, first day of the next month)`` as ISO dates, for an indexed range."""
    first = month.replace(day=1)
    following = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    return first.isoformat(), following.isoformat()


def month_rows(
    conn: sqlite3.Connection, source: str, month: date, client: str | None
) -> list[ReportRow]:
    """Every row of ``source`` in ``month`` (optionally one client), oldest date first."""
    if source not in (LIVE_SOURCE, CLOSED_SOURCE):
        raise ValueError(f"unknown report source {source!r}")
    final = "final" if source == LIVE_SOURCE else "1"
    start, end = month_bounds(month)
    sql = (
        f"SELECT {_COLUMNS}, {final} FROM {source}"
        " WHERE usage_date >= ? AND usage_date < ?"
        + (" AND client_org_id = ?" if client is not None else "")
        + " ORDER BY client_org_id, user_id, model, usage_date"
    )
    params: tuple[str, ...] = (start, end) if client is None else (start, end, client)
    try:
        rows: list[_ReportRowValues] = conn.execute(sql, params).fetchall()
    except sqlite3.Error as error:
        raise ReportSourceError(f"cannot read {source}: {error}") from None
    daily = [
        ReportRow(*row[:4], Usage(*row[4:12]), row[12], row[13], final=bool(row[14]))
        for row in rows
    ]
    _refuse_double_rows(daily, source)
    return daily


def _refuse_double_rows(rows: list[ReportRow], source: str) -> None:
    """Two rows for one (client, user, model, date), e.g. a closed and a provisional one in
    ``usage_daily_live``, would be summed twice: refuse rather than guess which is right."""
    seen: set[tuple[str, str, str, str]] = set()
    for row in rows:
        key = (row.client_org_id, row.user_id, row.model, row.usage_date)
        if key in seen:
            raise ReportSourceError(
                f"{source} has more than one row for {'/'.join(key)}: a statement would"
                " count it twice"
            )
        seen.add(key)


def unrolled_dates(conn: sqlite3.Connection, month: date) -> list[str]:
    """Dates of ``month`` with recorded events not yet rolled up (the worker's
    ``rollup_pending``), or ``[]`` when the DB has no such table.

    Used only without ``usage_daily_live``: there, such a date has no closed data yet.
    """
    if not has_table(conn, "rollup_pending"):
        return []
    start, end = month_bounds(month)
    try:
        rows = conn.execute(
            "SELECT DISTINCT usage_date FROM rollup_pending"
            " WHERE usage_date >= ? AND usage_date < ? ORDER BY 1",
            (start, end),
        ).fetchall()
    except sqlite3.Error:
        return []  # an internal table of the worker: its absence must not stop a statement
    return [str(row[0]) for row in rows]


def last_usage_month(conn: sqlite3.Connection, source: str, client: str) -> str | None:
    """The latest ``YYYY-MM`` with any row for ``client``: tells "no usage this month"
    apart from "unknown client" in the error line."""
    if source not in (LIVE_SOURCE, CLOSED_SOURCE):
        raise ValueError(f"unknown report source {source!r}")
    row = conn.execute(
        f"SELECT substr(MAX(usage_date), 1, 7) FROM {source} WHERE client_org_id = ?", (client,)
    ).fetchone()
    return None if row is None or row[0] is None else str(row[0])
