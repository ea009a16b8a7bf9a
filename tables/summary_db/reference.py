"""Reference data in the summary DB: NBP rates, model prices, batch runs, refresh status.

Money stays exact: rates and prices are stored as TEXT decimals exactly as the source wrote
them, and PLN amounts are integer nano-PLN computed with Decimal (half-even), never floats.

Every writer here runs in one ``BEGIN IMMEDIATE`` transaction of its own, or joins the
caller's when one is already open on ``conn`` (the caller then commits). Give the refresh a
connection of its own rather than sharing one with other coroutines that open transactions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import aiosqlite

from streams.clients.nbp import NbpRate
from streams.clients.openrouter import ModelPrice
from streams.model.money import nano_to_float, plain_decimal_text, scale_nano
from tables.summary_db.schema import utc_now_text, write_transaction

__all__ = [
    "BATCH_COUNTS",
    "BATCH_KINDS",
    "AppliedRate",
    "fill_waiting_pln",
    "last_batch_run",
    "latest_model_prices",
    "latest_nbp_rate",
    "rate_for_date",
    "record_batch_run",
    "record_refresh_status",
    "refresh_status",
    "store_model_prices",
    "store_nbp_rates",
    "waiting_rate_dates",
    "write_transaction",
]

BATCH_KINDS = frozenset({"rollup", "replay", "refresh"})
BATCH_COUNTS = (
    "records_processed",
    "summaries_written",
    "clients_processed",
    "data_corrections",
    "late_events",
)


@dataclass(frozen=True, slots=True)
class AppliedRate:
    """The NBP rate that converts a usage date's USD costs to PLN."""

    mid: Decimal
    table_no: str
    effective_date: date


def _aware(moment: datetime | str) -> datetime:
    """A timezone-aware datetime from a datetime or RFC 3339 text (``...Z`` allowed)."""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return moment


def _utc_text(moment: datetime) -> str:
    """The ``*_at`` column format of :func:`tables.summary_db.schema.utc_now_text`."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


async def _fetchall(conn: aiosqlite.Connection, sql: str, args: Sequence[Any] = ()) -> list[Any]:
    async with conn.execute(sql, args) as cursor:
        return list(await cursor.fetchall())


async def _fetchone(conn: aiosqlite.Connection, sql: str, args: Sequence[Any] = ()) -> Any:
    async with conn.execute(sql, args) as cursor:
        return await cursor.fetchone()


# NBP rates ------------------------------------------------------------------------------

_UPSERT_RATE = """
INSERT INTO nbp_rates (currency, effective_date, table_no, mid, fetched_at)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT (currency, effective_date) DO UPDATE SET
    table_no = excluded.table_no, mid = excluded.mid, fetched_at = excluded.fetched_at
WHERE nbp_rates.table_no IS NOT excluded.table_no OR nbp_rates.mid IS NOT excluded.mid
"""


async def store_nbp_rates(
    conn: aiosqlite.Connection,
    rates: Sequence[NbpRate],
    *,
    covered: tuple[date, date] | None = None,
    currency: str = "USD",
) -> int:
    """Upsert rates; returns rows inserted or changed.

    ``covered`` (inclusive) declares that ``rates`` is NBP's complete answer for those days
    of ``currency``, so the days without a rate are known to have no table. Only pass days
    that are final (before today, or today once its table is in ``rates``).
    """
    now = utc_now_text()
    days = {(rate.currency, rate.effective_date.isoformat()) for rate in rates}
    if covered is not None:
        first, last = covered
        days.update(
            (currency, (first + timedelta(days=n)).isoformat())
            for n in range((last - first).days + 1)
        )
    async with write_transaction(conn):
        before = conn.total_changes
        await conn.executemany(
            _UPSERT_RATE,
            [
                (
                    r.currency,
                    r.effective_date.isoformat(),
                    r.table_no,
                    plain_decimal_text(r.mid),
                    now,
                )
                for r in rates
            ],
        )
        changed = conn.total_changes - before
        await conn.executemany(
            "INSERT OR IGNORE INTO nbp_coverage (currency, day, checked_at) VALUES (?, ?, ?)",
            [(cur, day, now) for cur, day in sorted(days)],
        )
    return changed


async def latest_nbp_rate(conn: aiosqlite.Connection, currency: str = "USD") -> NbpRate | None:
    """The stored rate with the latest effective date."""
    row = await _fetchone(
        conn,
        "SELECT effective_date, table_no, mid FROM nbp_rates WHERE currency = ?"
        " ORDER BY effective_date DESC LIMIT 1",
        (currency,),
    )
    if row is None:
        return None
    return NbpRate(currency, date.fromisoformat(row[0]), row[1], Decimal(row[2]))


async def rate_for_date(
    conn: aiosqlite.Connection, usage_date: date, currency: str = "USD"
) -> AppliedRate | None:
    """The rate with the latest effective date strictly before ``usage_date``, if certain.

    Certain means every day after that rate up to ``usage_date - 1`` is covered by a fetch
    (weekend or holiday); otherwise a newer table may exist that we have not fetched yet,
    and the answer is None (PLN stays NULL until a refresh).
    """
    row = await _fetchone(
        conn,
        "SELECT effective_date, table_no, mid FROM nbp_rates"
        " WHERE currency = ? AND effective_date < ? ORDER BY effective_date DESC LIMIT 1",
        (currency, usage_date.isoformat()),
    )
    if row is None:
        return None
    effective = date.fromisoformat(row[0])
    gap_days = (usage_date - effective).days - 1
    if gap_days > 0:
        known = await _fetchone(
            conn,
            "SELECT COUNT(*) FROM nbp_coverage WHERE currency = ? AND day > ? AND day < ?",
            (currency, row[0], usage_date.isoformat()),
        )
        if known[0] != gap_days:
            return None
    return AppliedRate(mid=Decimal(row[2]), table_no=row[1], effective_date=effective)


# Model prices ---------------------------------------------------------------------------


def _price_from_row(row: Sequence[str]) -> ModelPrice:
    return ModelPrice(row[0], Decimal(row[1]), Decimal(row[2]), Decimal(row[3]))


_LATEST_PRICES = """
SELECT p.model_id, p.prompt_usd_per_token, p.completion_usd_per_token, p.request_usd
FROM model_pricing AS p
JOIN (SELECT model_id, MAX(fetched_at) AS fetched_at FROM model_pricing GROUP BY model_id)
    AS latest USING (model_id, fetched_at)
"""


async def latest_model_prices(conn: aiosqlite.Connection) -> dict[str, ModelPrice]:
    """The current price of every model ever seen, by model id."""
    return {row[0]: _price_from_row(row) for row in await _fetchall(conn, _LATEST_PRICES)}


async def store_model_prices(conn: aiosqlite.Connection, prices: Sequence[ModelPrice]) -> int:
    """Insert a row per model whose price differs from its latest row (history kept)."""
    now = utc_now_text()
    async with write_transaction(conn):
        current = await latest_model_prices(conn)
        fresh = [price for price in prices if current.get(price.model_id) != price]
        await conn.executemany(
            "INSERT INTO model_pricing (model_id, prompt_usd_per_token,"
            " completion_usd_per_token, request_usd, fetched_at) VALUES (?, ?, ?, ?, ?)",
            [
                (
                    p.model_id,
                    plain_decimal_text(p.prompt_usd_per_token),
                    plain_decimal_text(p.completion_usd_per_token),
                    plain_decimal_text(p.request_usd),
                    now,
                )
                for p in fresh
            ],
        )
    return len(fresh)


# PLN backfill ---------------------------------------------------------------------------


async def waiting_rate_dates(conn: aiosqlite.Connection) -> list[date]:
    """Usage dates with at least one row still without a PLN amount, oldest first."""
    rows = await _fetchall(
        conn,
        "SELECT DISTINCT usage_date FROM usage_daily"
        " WHERE markup_cost_pln_nano IS NULL ORDER BY usage_date",
    )
    return [date.fromisoformat(row[0]) for row in rows]


_FILL_PLN = """
UPDATE usage_daily SET
    markup_cost_pln_nano = ?, markup_cost_pln = ?, usd_pln_rate = ?, nbp_table_no = ?,
    revision = revision + 1, updated_at = ?
WHERE client_org_id = ? AND user_id = ? AND model = ? AND usage_date = ?
  AND markup_cost_pln_nano IS NULL
"""


async def _fill_date(
    conn: aiosqlite.Connection, usage_date: date, rate: AppliedRate, updated_at: str
) -> int:
    rows = await _fetchall(
        conn,
        "SELECT client_org_id, user_id, model, markup_cost_nano FROM usage_daily"
        " WHERE usage_date = ? AND markup_cost_pln_nano IS NULL",
        (usage_date.isoformat(),),
    )
    updates = []
    for client_org_id, user_id, model, markup_nano in rows:
        pln_nano = scale_nano(markup_nano, rate.mid)
        updates.append(
            (
                pln_nano,
                nano_to_float(pln_nano),
                plain_decimal_text(rate.mid),
                rate.table_no,
                updated_at,
                client_org_id,
                user_id,
                model,
                usage_date.isoformat(),
            )
        )
    await conn.executemany(_FILL_PLN, updates)
    return len(updates)


async def fill_waiting_pln(conn: aiosqlite.Connection, currency: str = "USD") -> int:
    """Convert every row still without PLN whose date now has a certain rate; one transaction."""
    updated_at = utc_now_text()
    filled = 0
    async with write_transaction(conn):
        for usage_date in await waiting_rate_dates(conn):
            rate = await rate_for_date(conn, usage_date, currency)
            if rate is not None:
                filled += await _fill_date(conn, usage_date, rate, updated_at)
    return filled


# Batch runs and refresh status ----------------------------------------------------------


async def record_batch_run(
    conn: aiosqlite.Connection,
    kind: str,
    processing_date: date | str | None,
    started_at: datetime | str,
    finished_at: datetime | str | None,
    success: bool,
    error: str | None = None,
    **counts: int,
) -> int:
    """Append one ``batch_runs`` row (rollup, replay or refresh); returns its id.

    Times are aware datetimes or RFC 3339 text (e.g. :func:`utc_now_text`); ``counts`` are
    any of :data:`BATCH_COUNTS` (missing ones are 0).
    """
    started_at = _aware(started_at)
    finished_at = _aware(finished_at) if finished_at is not None else None
    if kind not in BATCH_KINDS:
        raise ValueError(f"unknown batch kind {kind!r}")
    unknown = set(counts) - set(BATCH_COUNTS)
    if unknown:
        raise TypeError(f"unknown batch_runs counts: {', '.join(sorted(unknown))}")
    if isinstance(processing_date, date):
        processing_date = processing_date.isoformat()
    duration = (finished_at - started_at).total_seconds() if finished_at else None
    async with write_transaction(conn):
        cursor = await conn.execute(
            f"INSERT INTO batch_runs (kind, processing_date, started_at, finished_at,"
            f" duration_seconds, success, error, {', '.join(BATCH_COUNTS)})"
            f" VALUES (?, ?, ?, ?, ?, ?, ?{', ?' * len(BATCH_COUNTS)})",
            (
                kind,
                processing_date,
                _utc_text(started_at),
                _utc_text(finished_at) if finished_at else None,
                duration,
                1 if success else 0,
                error,
                *(int(counts.get(name, 0)) for name in BATCH_COUNTS),
            ),
        )
        run_id = cursor.lastrowid
        await cursor.close()
    assert run_id is not None
    return run_id


async def last_batch_run(conn: aiosqlite.Connection, kind: str) -> dict[str, Any] | None:
    """The latest ``batch_runs`` row of ``kind`` as a column → value dict."""
    async with conn.execute(
        "SELECT * FROM batch_runs WHERE kind = ? ORDER BY id DESC LIMIT 1", (kind,)
    ) as cursor:
        row = await cursor.fetchone()
        names = [column[0] for column in cursor.description]
    return None if row is None else dict(zip(names, row, strict=True))


async def record_refresh_status(
    conn: aiosqlite.Connection, source: str, ok: bool, error: str | None
) -> None:
    """Remember the outcome of one source's refresh attempt (the last success is kept)."""
    now = utc_now_text()
    async with write_transaction(conn):
        await conn.execute(
            "INSERT INTO refresh_status (source, last_attempt_at, last_success_at, last_error)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (source) DO UPDATE SET"
            " last_attempt_at = excluded.last_attempt_at,"
            " last_success_at = COALESCE(excluded.last_success_at, last_success_at),"
            " last_error = excluded.last_error",
            (source, now, now if ok else None, None if ok else error),
        )


async def refresh_status(conn: aiosqlite.Connection) -> dict[str, dict[str, str | None]]:
    """``{source: {last_attempt_at, last_success_at, last_error}}`` for ``/status``."""
    rows = await _fetchall(
        conn,
        "SELECT source, last_attempt_at, last_success_at, last_error FROM refresh_status"
        " ORDER BY source",
    )
    return {
        source: {"last_attempt_at": attempt, "last_success_at": success, "last_error": error}
        for source, attempt, success, error in rows
    }
