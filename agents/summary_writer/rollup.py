"""Rollup: move closed days' (and re-opened days') increments into ``usage_daily``.

Runs on every worker every ``ROLLUP_INTERVAL_SECONDS``. A date with pending increments is
written when it is due (see tables.watermarks) or, if it closed before, at once: late events
re-open their day and its affected rows are re-written (``revision`` + 1). Concurrent
workers are safe: each day is one ``BEGIN IMMEDIATE`` transaction that adds the pending
increments and deletes them (tables.summary_db.summary_store). The provisional rows of the days
still open (``usage_daily_live``) are rewritten at the end of every pass.

While the hot path catches up on a backlog (it reads full batches), each date is merged
at most every ``CATCH_UP_MERGE_SECONDS``: every merge rewrites the rows its increments
touch, and merging a backfilled day every few seconds would rewrite the same rows again
and again while the day's events are still streaming in. Nothing is lost meanwhile: the
increments wait in ``daily_pending``.

After the merges, every month due and complete closes into ``statements``
(tables/summary_db/statements.py), except while catching up: a backlog's months close once it is
applied, not with half of it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime

import aiosqlite

from streams.metrics import OPEN_DAYS, ROLLUP_SECONDS, SUMMARIES_WRITTEN
from streams.settings import Settings
from tables.summary_db.connection import SharedSummaryDb
from tables.summary_db.reference import rate_for_date, record_batch_run
from tables.summary_db.schema import utc_now_text
from tables.summary_db.statements import close_due_months
from tables.summary_db.summary_store import (
    DayRollup,
    closed_days,
    pending_dates,
    refresh_open_days,
    rollup_day,
)
from tables.watermarks import DayCloser

__all__ = ["CATCH_UP_MERGE_SECONDS", "Rollup", "RollupPass"]

log = logging.getLogger(__name__)


CATCH_UP_MERGE_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class RollupPass:
    written: list[DayRollup]
    still_open: list[str]


class Rollup:
    """The rollup of one worker: :meth:`tick` is its timer (every
    ``ROLLUP_INTERVAL_SECONDS``, agents/wiring.py), on the shared connection ``db``,
    with the ``closer`` the summary writer feeds."""

    def __init__(
        self,
        settings: Settings,
        db: SharedSummaryDb,
        closer: DayCloser,
        stopping: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self.db = db
        self.closer = closer
        #: True once the worker is stopping (the shared connection may close under a pass)
        self.stopping = stopping
        #: usage date -> monotonic time of its last merge (or of its first sight during a
        #: catch-up, which defers its first merge alike)
        self.last_merge: dict[str, float] = {}
        #: the last reason a due month did not close
        self.waiting: str | None = None

    async def tick(self) -> None:
        if not self.settings.SUMMARY_WRITER:  # the summary writer closes days; others have no DB
            return
        try:
            await self.run(await self.db.get())
        except Exception:  # the next tick retries; pending keys stay pending
            if self.stopping():  # the shared connection was closed under the pass
                log.info("rollup pass cut short by the shutdown; the next start does it again")
                return
            log.exception("rollup pass failed")

    def _deferred(self, day: str) -> bool:
        """True while the hot path is catching up and ``day`` was merged, or first seen,
        less than ``CATCH_UP_MERGE_SECONDS`` ago. (A date first seen during a catch-up waits
        too: merged at once, the three closed dates of a backlog took one pass of 12-17 s
        in bench/worker_profile.py, holding the write lock the summary writer needs.)"""
        if not self.closer.behind:
            return False
        last = self.last_merge.setdefault(day, time.monotonic())
        return time.monotonic() - last < CATCH_UP_MERGE_SECONDS

    async def run(self, conn: aiosqlite.Connection) -> RollupPass:
        """One pass: roll up every pending date that is due or already closed."""
        multiplier = self.settings.USAGE_MARKUP_MULTIPLIER
        dates = await pending_dates(conn)
        closed = await closed_days(conn, dates)
        written: list[DayRollup] = []
        still_open: list[str] = []
        for day in dates:
            if day not in closed and not self.closer.is_due(date.fromisoformat(day)):
                still_open.append(day)
                continue
            if self._deferred(day):
                continue
            self.last_merge[day] = time.monotonic()
            started = utc_now_text()
            begin = time.monotonic()
            result = await rollup_day(conn, day, multiplier, rate_for_date)
            ROLLUP_SECONDS.observe(time.monotonic() - begin)
            SUMMARIES_WRITTEN.inc(result.summaries_written)
            await record_batch_run(
                conn,
                "rollup",
                day,
                started,
                utc_now_text(),
                True,
                records_processed=result.records,
                summaries_written=result.summaries_written,
                clients_processed=result.clients,
                data_corrections=result.summaries_written if result.late_rewrite else 0,
                late_events=result.late_events,
            )
            log.info(
                "rollup %s: %d summaries written from %d records%s",
                day,
                result.summaries_written,
                result.records,
                " (late events)" if result.late_rewrite else "",
            )
            written.append(result)
        if not self._deferred("open days"):
            self.last_merge["open days"] = time.monotonic()
            await refresh_open_days(conn, still_open, multiplier, rate_for_date)
        OPEN_DAYS.set(len(still_open))
        if not self.closer.behind:
            await self.close_statements(conn)
        return RollupPass(written, still_open)

    async def close_statements(self, conn: aiosqlite.Connection) -> list[str]:
        """Close the months that are due and complete; log each, and a month's reason to
        wait once (not at every pass)."""
        today = datetime.now(self.settings.tz).date()
        result = await close_due_months(conn, today, self.settings.STATEMENT_GRACE_DAYS)
        for month in result.closed:
            log.info("statement %s closed", month)
        if result.waiting != self.waiting and result.waiting is not None:
            log.info("%s", result.waiting)
        self.waiting = result.waiting
        return result.closed
