"""The SQLite summary store: the ledger of unique events and the daily summaries.

Totals are *derived from membership*: every unique request is one row of ``usage_events``
(``request_id`` primary key), and a ``usage_daily`` row is recomputed from the ledger rows
of its key, never incremented. A redelivered, recovered or replayed event is therefore
unable to count twice, and any number of workers (sharing this database file) may write
concurrently: each write is one ``BEGIN IMMEDIATE`` transaction.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Protocol
from zoneinfo import ZoneInfo

import aiosqlite

from streams.business_time import usage_date
from streams.event import UsageEvent
from streams.money import nano_to_float, scale_nano
from streams.pricing import Price, estimate_cost_nano
from tables.schema import utc_now_text, write_transaction

__all__ = [
    "DayRollup",
    "LedgerEntry",
    "LedgerResult",
    "ledger_entry",
    "Rate",
    "SummaryRow",
    "closed_days",
    "pending_dates",
    "record_events",
    "rollup_day",
    "summary_rows",
    "write_summaries",
]

_WORKER = f"{socket.gethostname()}"
_IN_CHUNK = 900  # bound parameters per IN (...) query


class Rate(Protocol):
    """An applicable NBP rate (``tables.reference.AppliedRate``)."""

    mid: Decimal
    table_no: str


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """A unique event as the ledger stores it (cost already resolved or estimated)."""

    event: UsageEvent
    usage_date: str
    cost_nano: int
    cost_estimated: bool
    source_topic: str
    source_partition: int
    source_offset: int

    def row(self) -> tuple[object, ...]:
        """The ``usage_events`` columns in table order, but for ``recorded_at``."""
        event = self.event
        return (
            event.request_id,
            self.usage_date,
            event.client_org_id,
            event.user_id,
            event.model,
            event.input_tokens,
            event.output_tokens,
            self.cost_nano,
            int(self.cost_estimated),
            event.event_ms,
            self.source_topic,
            self.source_partition,
            self.source_offset,
        )


def ledger_entry(
    usage: UsageEvent,
    topic: str,
    partition: int,
    offset: int,
    prices: Mapping[str, Price],
    tz: ZoneInfo,
) -> LedgerEntry:
    """The ledger row of one valid event read at ``topic/partition/offset``.

    The cost is ``cost_usd`` when the event has one, else estimated from ``prices`` (the
    latest stored price per model; no price → 0, still counted in ``estimated_requests``).
    """
    estimated = usage.cost_nano is None
    cost = (
        estimate_cost_nano(usage.input_tokens, usage.output_tokens, prices.get(usage.model))
        if estimated
        else usage.cost_nano
    )
    assert cost is not None
    return LedgerEntry(
        event=usage,
        usage_date=usage_date(usage.event_ms, tz).isoformat(),
        cost_nano=cost,
        cost_estimated=estimated,
        source_topic=topic,
        source_partition=partition,
        source_offset=offset,
    )


@dataclass(frozen=True, slots=True)
class LedgerResult:
    inserted: list[LedgerEntry]
    duplicates: int
    late: int


@dataclass(frozen=True, slots=True)
class SummaryRow:
    """One ``usage_daily`` row's exact totals, before markup and conversion."""

    client_org_id: str
    user_id: str
    model: str
    usage_date: str
    input_tokens: int
    output_tokens: int
    requests: int
    estimated_requests: int
    raw_cost_nano: int

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.client_org_id, self.user_id, self.model, self.usage_date)


@dataclass(frozen=True, slots=True)
class DayRollup:
    usage_date: str
    records: int
    summaries_written: int
    clients: int
    late_rewrite: bool


def _chunks(items: Sequence[str], size: int = _IN_CHUNK) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def _existing(conn: aiosqlite.Connection, sql: str, values: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for chunk in _chunks(values):
        marks = ",".join("?" * len(chunk))
        async with conn.execute(sql.format(marks=marks), chunk) as cursor:
            found.update(row[0] for row in await cursor.fetchall())
    return found


async def record_events(conn: aiosqlite.Connection, entries: Sequence[LedgerEntry]) -> LedgerResult:
    """Add unique events to the ledger and mark their summary keys pending, atomically.

    Entries whose request_id is already in the ledger are skipped and counted as duplicates;
    entries for a day that has already closed are counted as late.
    """
    if not entries:
        return LedgerResult([], 0, 0)
    recorded_at = utc_now_text()
    async with write_transaction(conn):
        ids = [entry.event.request_id for entry in entries]
        known = await _existing(
            conn, "SELECT request_id FROM usage_events WHERE request_id IN ({marks})", ids
        )
        fresh: list[LedgerEntry] = []
        for entry in entries:
            if entry.event.request_id not in known:
                known.add(entry.event.request_id)
                fresh.append(entry)
        await conn.executemany(
            "INSERT INTO usage_events VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [(*e.row(), recorded_at) for e in fresh],
        )
        await conn.executemany(
            "INSERT OR IGNORE INTO rollup_pending VALUES (?,?,?,?)",
            {(e.usage_date, e.event.client_org_id, e.event.user_id, e.event.model) for e in fresh},
        )
        closed = await _existing(
            conn,
            "SELECT usage_date FROM closed_days WHERE usage_date IN ({marks})",
            sorted({e.usage_date for e in fresh}),
        )
    late = sum(1 for e in fresh if e.usage_date in closed)
    return LedgerResult(fresh, len(entries) - len(fresh), late)


async def pending_dates(conn: aiosqlite.Connection) -> list[str]:
    async with conn.execute("SELECT DISTINCT usage_date FROM rollup_pending ORDER BY 1") as cur:
        return [row[0] for row in await cur.fetchall()]


async def closed_days(conn: aiosqlite.Connection, dates: Sequence[str]) -> set[str]:
    return await _existing(
        conn, "SELECT usage_date FROM closed_days WHERE usage_date IN ({marks})", list(dates)
    )


async def summary_rows(
    conn: aiosqlite.Connection, usage_date: str, only_pending: bool
) -> list[SummaryRow]:
    """Exact totals per (client, user, model) of one date, from the ledger."""
    join = (
        "JOIN rollup_pending p ON p.usage_date = e.usage_date"
        " AND p.client_org_id = e.client_org_id AND p.user_id = e.user_id AND p.model = e.model"
        if only_pending
        else ""
    )
    sql = f"""
        SELECT e.client_org_id, e.user_id, e.model, e.usage_date,
               SUM(e.input_tokens), SUM(e.output_tokens), COUNT(*),
               SUM(e.cost_estimated), SUM(e.cost_nano)
        FROM usage_events e {join}
        WHERE e.usage_date = ?
        GROUP BY e.client_org_id, e.user_id, e.model
    """
    async with conn.execute(sql, (usage_date,)) as cursor:
        return [SummaryRow(*row) for row in await cursor.fetchall()]


# Columns a rollup recomputes; a row is re-written (revision + 1) only when one differs.
_VALUE_COLUMNS = (
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "requests",
    "estimated_requests",
    "raw_cost_nano",
    "markup_cost_nano",
    "markup_cost_pln_nano",
    "raw_cost_usd",
    "markup_cost_usd",
    "markup_cost_pln",
    "usd_pln_rate",
    "nbp_table_no",
)
_UPSERT = f"""
INSERT INTO usage_daily (
    client_org_id, user_id, model, usage_date, {", ".join(_VALUE_COLUMNS)}, revision, updated_at
) VALUES (?,?,?,?,{",".join("?" * len(_VALUE_COLUMNS))},1,?)
ON CONFLICT (client_org_id, user_id, model, usage_date) DO UPDATE SET
    {", ".join(f"{c} = excluded.{c}" for c in _VALUE_COLUMNS)},
    revision = usage_daily.revision + 1,
    updated_at = excluded.updated_at
WHERE {" OR ".join(f"usage_daily.{c} IS NOT excluded.{c}" for c in _VALUE_COLUMNS)}
"""


def _summary_values(
    row: SummaryRow, markup: Decimal, rate: Rate | None, updated_at: str
) -> tuple[object, ...]:
    """The ``usage_daily`` values of one row (key, then ``_VALUE_COLUMNS`` order, then
    ``updated_at``): markup and PLN applied per row, half-even."""
    markup_nano = scale_nano(row.raw_cost_nano, markup)
    pln_nano = scale_nano(markup_nano, rate.mid) if rate is not None else None
    return (
        row.client_org_id,
        row.user_id,
        row.model,
        row.usage_date,
        row.input_tokens,
        row.output_tokens,
        row.input_tokens + row.output_tokens,
        row.requests,
        row.estimated_requests,
        row.raw_cost_nano,
        markup_nano,
        pln_nano,
        nano_to_float(row.raw_cost_nano),
        nano_to_float(markup_nano),
        nano_to_float(pln_nano),
        str(rate.mid) if rate is not None else None,
        rate.table_no if rate is not None else None,
        updated_at,
    )


async def write_summaries(
    conn: aiosqlite.Connection,
    rows: Sequence[SummaryRow],
    markup: Decimal,
    rate: Rate | None,
) -> int:
    """Upsert rows inside the caller's transaction; returns rows inserted or changed.

    Unchanged rows are left alone (same ``revision``), so re-running a rollup or a replay
    over the same events changes nothing.
    """
    before = conn.total_changes
    updated_at = utc_now_text()
    await conn.executemany(_UPSERT, [_summary_values(r, markup, rate, updated_at) for r in rows])
    return conn.total_changes - before


RateLookup = Callable[[aiosqlite.Connection, date], Awaitable[Rate | None]]


async def rollup_day(
    conn: aiosqlite.Connection,
    usage_date: date | str,
    markup: Decimal,
    rate_lookup: RateLookup,
) -> DayRollup:
    """Write the pending summary keys of one date from the ledger, in one transaction.

    The rate is looked up inside the transaction, so a concurrent PLN fill by the refresh
    is never overwritten with a stale "no rate yet". Marks the date closed (so later events
    for it count as late) and clears its pending keys.
    """
    day = usage_date if isinstance(usage_date, str) else usage_date.isoformat()
    async with write_transaction(conn):
        rate = await rate_lookup(conn, date.fromisoformat(day))
        was_closed = bool(await closed_days(conn, [day]))
        rows = await summary_rows(conn, day, only_pending=True)
        written = await write_summaries(conn, rows, markup, rate)
        await conn.execute("DELETE FROM rollup_pending WHERE usage_date = ?", (day,))
        await conn.execute(
            "INSERT OR IGNORE INTO closed_days VALUES (?, ?, ?)", (day, utc_now_text(), _WORKER)
        )
    return DayRollup(
        usage_date=day,
        records=sum(row.requests for row in rows),
        summaries_written=written,
        clients=len({row.client_org_id for row in rows}),
        late_rewrite=was_closed,
    )
