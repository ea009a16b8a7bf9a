"""The 13:00 refresh: NBP table A USD rates and OpenRouter prices, then the PLN backfill.

NBP publishes table A on Polish business days between 11:45 and 12:15 Warsaw time; the
refresh runs at ``REFRESH_CRON`` (13:00 local by default). The two sources are fetched
concurrently and independently: one failing does not stop the other. Afterwards every
``usage_daily`` row still without PLN whose date now has a certain rate is converted.

:func:`run_refresh` is plain asyncio (the CLI and tests call it with explicit settings and
connection); :class:`RefreshSchedule` at the bottom only schedules it in a worker, and
:func:`refresh` is the ``usage-stream refresh`` command (agents/wiring.py registers both).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

import aiosqlite
from croniter import croniter

from streams.clients.http import RetryPolicy, SourceError, one_line
from streams.clients.nbp import NBP_FIRST_DATE, NbpClient, NbpRate
from streams.clients.openrouter import ModelPrice, OpenRouterClient
from streams.metrics import REFRESH_LAST_SUCCESS, REFRESH_RUNS, USD_PLN_RATE
from streams.settings import Settings, get_settings
from tables.summary_db.reference import (
    fill_waiting_pln,
    last_batch_run,
    latest_model_prices,
    latest_nbp_rate,
    rate_for_date,
    record_batch_run,
    record_refresh_status,
    refresh_status,
    store_model_prices,
    store_nbp_rates,
    waiting_rate_dates,
)
from tables.summary_db.schema import connect

if TYPE_CHECKING:
    import faust

__all__ = [
    "RETRY_INTERVAL_SECONDS",
    "SOURCES",
    "RefreshResult",
    "RefreshSchedule",
    "last_business_day_before",
    "nbp_ranges",
    "next_refresh_run",
    "refresh",
    "refresh_needed_at_start",
    "restore_refresh_metrics",
    "retry_due",
    "run_refresh",
]

log = logging.getLogger(__name__)

SOURCES = ("nbp", "openrouter")
CURRENCY = "USD"
DEFAULT_LOOKBACK_DAYS = 14
"""With no stored rate, fetch this many days back (covers any run of holidays)."""
WAITING_LOOKBACK_DAYS = 10
"""For a usage date D still without PLN, fetch [D-10, D-1] (Christmas + a weekend fit)."""
RETRY_INTERVAL_SECONDS = 15 * 60
"""After a failed run, try again this often for the rest of the (local) day."""

DateRange = tuple[date, date]


@dataclass
class RefreshResult:
    """What one refresh did; ``errors`` maps a source (or "backfill") to a one-line reason."""

    started_at: datetime
    finished_at: datetime
    rates_fetched: int = 0
    rates_stored: int = 0
    prices_fetched: int = 0
    prices_stored: int = 0
    pln_filled: int = 0
    nbp_ranges: list[DateRange] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    batch_run_id: int | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def error_text(self) -> str | None:
        return "; ".join(self.errors.values()) or None


# Planning -------------------------------------------------------------------------------


def nbp_ranges(latest: date | None, needing: Sequence[date], today: date) -> list[DateRange]:
    """Inclusive ranges to fetch: [latest stored (or today-14), today] plus, for each usage
    date D still needing a rate, [D-10, D-1]; clamped to NBP's history, merged, sorted."""
    wanted = [(latest or today - timedelta(days=DEFAULT_LOOKBACK_DAYS), today)]
    wanted += [(d - timedelta(days=WAITING_LOOKBACK_DAYS), d - timedelta(days=1)) for d in needing]
    clamped = sorted(
        (max(start, NBP_FIRST_DATE), min(end, today))
        for start, end in wanted
        if max(start, NBP_FIRST_DATE) <= min(end, today)
    )
    merged: list[DateRange] = []
    for start, end in clamped:
        if merged and start <= merged[-1][1] + timedelta(days=1):
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def final_coverage(span: DateRange, rates: Sequence[NbpRate], today: date) -> DateRange | None:
    """The part of ``span`` whose table status is final: days before today, and today only
    once its table is out (before ~12:15 "no table today" just means "not yet")."""
    start, end = span
    if end >= today and not any(rate.effective_date == today for rate in rates):
        end = today - timedelta(days=1)
    return (start, end) if start <= end else None


async def _nbp_plan(conn: aiosqlite.Connection, today: date) -> list[DateRange]:
    latest = await latest_nbp_rate(conn, CURRENCY)
    needing = [
        day
        for day in await waiting_rate_dates(conn)
        if await rate_for_date(conn, day, CURRENCY) is None
    ]
    return nbp_ranges(latest.effective_date if latest else None, needing, today)


# Fetching -------------------------------------------------------------------------------


@dataclass
class _NbpFetch:
    """Ranges fetched completely (stored even when a later range fails) and the failure."""

    done: list[tuple[DateRange, list[NbpRate]]]
    error: Exception | None = None


async def _fetch_nbp(client: NbpClient, ranges: Sequence[DateRange]) -> _NbpFetch:
    fetched = _NbpFetch(done=[])
    for span in ranges:
        try:
            fetched.done.append((span, await client.rates(*span, currency=CURRENCY)))
        except Exception as error:
            fetched.error = error
            break
    return fetched


def _describe(source: str, error: BaseException) -> str:
    """One line naming the source: SourceErrors already read well, anything else gets its type."""
    text = str(error) if isinstance(error, SourceError) else f"{type(error).__name__}: {error}"
    return one_line(text if text.startswith(f"{source}:") else f"{source}: {text}")


def _reraise_fatal(outcome: object) -> None:
    """gather(return_exceptions=True) also returns cancellations; those must propagate."""
    if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
        raise outcome


# Storing --------------------------------------------------------------------------------


async def _store_nbp(
    conn: aiosqlite.Connection,
    fetched: _NbpFetch | BaseException,
    today: date,
    result: RefreshResult,
) -> None:
    if isinstance(fetched, BaseException):
        result.errors["nbp"] = _describe("nbp", fetched)
        return
    try:
        for span, rates in fetched.done:
            result.rates_fetched += len(rates)
            result.rates_stored += await store_nbp_rates(
                conn, rates, covered=final_coverage(span, rates, today), currency=CURRENCY
            )
    except Exception as error:
        log.exception("refresh: storing NBP rates failed")
        result.errors["nbp"] = _describe("nbp", error)
        return
    if fetched.error is not None:
        result.errors["nbp"] = _describe("nbp", fetched.error)


async def _store_prices(
    conn: aiosqlite.Connection,
    fetched: list[ModelPrice] | BaseException,
    result: RefreshResult,
) -> None:
    if isinstance(fetched, BaseException):
        result.errors["openrouter"] = _describe("openrouter", fetched)
        return
    result.prices_fetched = len(fetched)
    try:
        result.prices_stored = await store_model_prices(conn, fetched)
    except Exception as error:
        log.exception("refresh: storing model prices failed")
        result.errors["openrouter"] = _describe("openrouter", error)


async def _backfill(conn: aiosqlite.Connection, result: RefreshResult) -> None:
    try:
        result.pln_filled = await fill_waiting_pln(conn, CURRENCY)
    except Exception as error:
        log.exception("refresh: PLN backfill failed")
        result.errors["backfill"] = _describe("backfill", error)


# Reporting ------------------------------------------------------------------------------


async def _report(conn: aiosqlite.Connection, result: RefreshResult, today: date) -> None:
    """Metrics, refresh_status rows, one batch_runs row and one log line per outcome."""
    for source in SOURCES:
        error = result.errors.get(source)
        REFRESH_RUNS.labels(source=source, result="failure" if error else "success").inc()
        if error is None:
            REFRESH_LAST_SUCCESS.labels(source=source).set(time.time())
        else:
            log.error("refresh %s failed: %s", source, error)
        await record_refresh_status(conn, source, error is None, error)
    latest = await latest_nbp_rate(conn, CURRENCY)
    if latest is not None:
        USD_PLN_RATE.set(float(latest.mid))  # a gauge is a float; the exact mid is in the DB
    result.batch_run_id = await record_batch_run(
        conn,
        "refresh",
        today,
        result.started_at,
        result.finished_at,
        result.ok,
        result.error_text,
        records_processed=result.rates_fetched + result.prices_fetched,
        summaries_written=result.pln_filled,
    )
    log.info(
        "refresh %s: NBP %d rates (%d new), OpenRouter %d models (%d new prices),"
        " %d rows converted to PLN",
        "done" if result.ok else "partly failed",
        result.rates_fetched,
        result.rates_stored,
        result.prices_fetched,
        result.prices_stored,
        result.pln_filled,
    )


async def run_refresh(
    settings: Settings,
    conn: aiosqlite.Connection,
    *,
    today: date | None = None,
    retry: RetryPolicy | None = None,
) -> RefreshResult:
    """Fetch NBP rates and OpenRouter prices concurrently, store them, backfill PLN.

    Never raises for a source failure: those are recorded (``batch_runs`` success 0 with
    the error, metrics, ``refresh_status``) and returned in :attr:`RefreshResult.errors`.
    ``today`` is the local business date (default: now in ``BUSINESS_TIMEZONE``).
    """
    started = datetime.now(UTC)
    today = today or datetime.now(settings.tz).date()
    result = RefreshResult(started_at=started, finished_at=started)
    result.nbp_ranges = await _nbp_plan(conn, today)
    timeout = settings.HTTP_TIMEOUT_SECONDS
    async with (
        NbpClient(settings.NBP_API_URL, timeout_seconds=timeout, retry=retry) as nbp,
        OpenRouterClient(settings.OPENROUTER_API_URL, timeout_seconds=timeout, retry=retry) as o,
    ):
        nbp_fetch, price_fetch = await asyncio.gather(
            _fetch_nbp(nbp, result.nbp_ranges), o.model_prices(), return_exceptions=True
        )
    _reraise_fatal(nbp_fetch)
    _reraise_fatal(price_fetch)
    # Stored one after the other: both write through the same connection.
    await _store_nbp(conn, nbp_fetch, today, result)
    await _store_prices(conn, price_fetch, result)
    await _backfill(conn, result)
    result.finished_at = datetime.now(UTC)
    await _report(conn, result, today)
    return result


# Scheduling -----------------------------------------------------------------------------


def next_refresh_run(cron: str, tz: ZoneInfo, after: datetime) -> datetime:
    """The first cron time strictly after ``after``, in local wall time of ``tz`` (UTC).

    The cron is matched against naive local wall-clock times and then localised, so
    "0 13 * * *" is 13:00 local on both sides of a DST change (croniter 5 with aware
    datetimes is off by the DST hour on change days). A time in the spring gap runs at
    the offset before the jump; a repeated autumn time runs once, at its first occurrence.
    """
    if after.tzinfo is None:
        raise ValueError("after must be timezone-aware")
    schedule = croniter(cron, after.astimezone(tz).replace(tzinfo=None))
    while True:
        candidate = schedule.get_next(datetime).replace(tzinfo=tz)
        if candidate > after:
            return candidate.astimezone(UTC)


def last_business_day_before(day: date) -> date:
    """The last weekday before ``day`` (holidays are not known here)."""
    previous = day - timedelta(days=1)
    while previous.weekday() >= 5:
        previous -= timedelta(days=1)
    return previous


async def refresh_needed_at_start(conn: aiosqlite.Connection, today: date) -> bool:
    """True when stored reference data is visibly stale: no prices, or no NBP rate for the
    last weekday before today (after a holiday this asks for one harmless extra refresh)."""
    latest = await latest_nbp_rate(conn, CURRENCY)
    if latest is None or latest.effective_date < last_business_day_before(today):
        return True
    return not await latest_model_prices(conn)


async def retry_due(conn: aiosqlite.Connection, today: date) -> bool:
    """True when today's latest refresh failed: retry it later the same day."""
    last = await last_batch_run(conn, "refresh")
    return last is not None and not last["success"] and last["processing_date"] == today.isoformat()


async def restore_refresh_metrics(conn: aiosqlite.Connection) -> None:
    """Seed the refresh gauges from the DB so they are meaningful right after a restart."""
    for source, status in (await refresh_status(conn)).items():
        if status["last_success_at"]:
            moment = datetime.fromisoformat(status["last_success_at"])
            REFRESH_LAST_SUCCESS.labels(source=source).set(moment.timestamp())
    latest = await latest_nbp_rate(conn, CURRENCY)
    if latest is not None:
        USD_PLN_RATE.set(float(latest.mid))


# The worker's schedule and the command -----------------------------------------------
# The refresh uses a connection of its own (not the worker's shared one,
# tables/summary_db/connection.py): its transactions then never interleave with the
# rollup's on one connection; SQLite's write lock (BEGIN IMMEDIATE, busy timeout)
# serialises them across connections instead.


class RefreshSchedule:
    """When a worker refreshes: its tasks and timer (agents/wiring.py registers
    :meth:`on_schedule`, :meth:`retry_failed` and :meth:`at_start`), on the summary writer
    only, and never two runs at once in the process. ``app``: the worker's, which says
    when it stops and sleeps until then."""

    def __init__(self, app: faust.App, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._run_lock = asyncio.Lock()

    async def _refresh_now(self, reason: str) -> RefreshResult | None:
        """One guarded run: never two at once in this process, never crashes the worker."""
        if self._run_lock.locked():
            log.info("refresh (%s) skipped: a refresh is already running", reason)
            return None
        async with self._run_lock:
            log.info("refresh (%s) starting", reason)
            try:
                conn = await connect(self.settings.summary_db_path)
                try:
                    return await run_refresh(self.settings, conn)
                finally:
                    await conn.close()
            except Exception:
                log.exception("refresh (%s) crashed", reason)
                return None

    def _local_today(self) -> date:
        return datetime.now(self.settings.tz).date()

    async def _retry_due_now(self) -> bool:
        conn = await connect(self.settings.summary_db_path)
        try:
            return await retry_due(conn, self._local_today())
        finally:
            await conn.close()

    async def on_schedule(self) -> None:
        """``REFRESH_CRON`` in ``BUSINESS_TIMEZONE``, on the summary writer only (the one
        process that has the summary DB; several writers would only repeat idempotent
        upserts). A task of the app.

        Not ``app.crontab``: faust 0.15.3 computes the next time with croniter on an aware
        datetime, which fires an hour early/late on DST change days.
        """
        app, settings = self.app, self.settings
        wake = datetime.now(UTC)
        while not app.should_stop:
            # After the last wake-up, not just "now": a timer firing a hair early must not
            # schedule the same run twice.
            now = datetime.now(UTC)
            wake = next_refresh_run(settings.REFRESH_CRON, settings.tz, max(now, wake))
            await app.sleep((wake - now).total_seconds())
            if not app.should_stop and settings.SUMMARY_WRITER:
                await self._refresh_now("scheduled")

    async def retry_failed(self) -> None:
        """After a failed run, try again every :data:`RETRY_INTERVAL_SECONDS` (15 minutes,
        a timer of the app) for the rest of the local day."""
        if not self.settings.SUMMARY_WRITER:
            return
        try:
            due = await self._retry_due_now()
        except Exception:
            log.exception("refresh retry check failed")
            return
        if due:
            await self._refresh_now("retry")

    async def at_start(self) -> None:
        """At start-up, refresh at once when the stored data is stale (e.g. after
        downtime). A task of the app.

        Every worker runs this (leadership is not known yet at start-up); concurrent runs in
        several processes are harmless: every write is an idempotent upsert.
        """
        if not self.settings.SUMMARY_WRITER:
            return
        try:
            conn = await connect(self.settings.summary_db_path)
            try:
                await restore_refresh_metrics(conn)
                needed = await refresh_needed_at_start(conn, self._local_today())
            finally:
                await conn.close()
        except Exception:
            log.exception("refresh start-up check failed")
            return
        if needed:
            await self._refresh_now("start-up")


async def refresh(self: object) -> None:
    """Refresh the NBP USD/PLN rates and OpenRouter model prices now.

    \b
    Example:
      usage-stream refresh
    """
    import sqlite3

    from streams.cli import fail

    settings = get_settings()
    try:
        conn = await connect(settings.summary_db_path)
    except (sqlite3.Error, OSError) as error:
        fail(f"summary DB {settings.summary_db_path} is not writable: {error}")
    try:
        result = await run_refresh(settings, conn)
    finally:
        await conn.close()
    if not result.ok:
        fail(f"refresh failed: {result.error_text}")
    print(
        f"refresh ok: {result.rates_fetched} NBP rates ({result.rates_stored} new), "
        f"{result.prices_fetched} model prices ({result.prices_stored} new), "
        f"{result.pln_filled} rows converted to PLN"
    )
