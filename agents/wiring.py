"""The composition root: everything a ``usage-stream`` process runs, registered on its
Faust app in one place, :func:`wire`.

No module registers itself when imported: modules define their services, views, timers,
tasks and commands plainly, and :func:`wire` makes the objects they share (the summary
DB connection, the day closer), hands each service what it reads, and registers every
service, page, timer, task, command, preflight check, after-topics step and shutdown
hook. The console script (:func:`agents.main.main`) calls it once, before Faust's CLI
runs; tests/unit/agents/test_wiring.py holds it to the list below.

Services are made here, not by Faust (``app.service`` is given instances, which Faust
starts as it would the ones it makes): each takes its collaborators in its constructor.
Constructing them starts, connects or opens nothing: that is their ``on_start``, which
only a worker reaches.
"""

from __future__ import annotations

from dataclasses import dataclass

import faust
import mode
from faust.cli.faust import cli

from agents.budgets import BudgetAlerts
from agents.commands import backup, budget, markup
from agents.commands.publish_dev import DEV_OPTIONS, PUBLISH_OPTIONS, dev, publish
from agents.commands.raw import OPTIONS as RAW_RESEND_OPTIONS
from agents.commands.raw import raw_resend
from agents.commands.report import OPTIONS as REPORT_OPTIONS
from agents.commands.report import report
from agents.hot_path.service import HotPath
from agents.prices_feed import PricesFeed
from agents.refresh import RETRY_INTERVAL_SECONDS, RefreshSchedule, refresh
from agents.replay.command import DirectCommand, replay
from agents.replay.run import OPTIONS as REPLAY_OPTIONS
from agents.summary_writer.claim import claim_summary_writer
from agents.summary_writer.log_guard import guard_batch_log
from agents.summary_writer.rollup import Rollup
from agents.summary_writer.writer import SummaryWriter, carry_over_offsets
from agents.web.readiness import Readiness
from agents.web.server import health, metrics, ready_page, status_page, usage_page
from agents.web.usage_query import usage_query_page
from streams.cli import AfterTopics, Preflight
from streams.settings import Settings
from tables.summary_db.connection import SharedSummaryDb
from tables.summary_db.preflight import summary_db_writable
from tables.watermarks import DayCloser

__all__ = ["Wiring", "wire"]


@dataclass(frozen=True, slots=True)
class Wiring:
    """What :func:`wire` made: the objects the services share, the services, and the
    steps :func:`streams.cli.prepare_worker` runs before a worker starts."""

    db: SharedSummaryDb
    closer: DayCloser
    hot_path: HotPath
    summary_writer: SummaryWriter | None
    budget_alerts: BudgetAlerts | None
    readiness: Readiness
    rollup: Rollup
    refresh: RefreshSchedule
    preflight: tuple[Preflight, ...]
    after_topics: tuple[AfterTopics, ...]


def wire(app: faust.App, settings: Settings) -> Wiring:
    """Register everything on ``app`` (module docstring), once per app."""
    db = SharedSummaryDb(settings.summary_db_path)  # rollup, pages, prices, /ready
    closer = DayCloser(settings.tz, settings.WINDOW_GRACE_SECONDS)  # writer feeds, rollup asks

    # Services, started in this order. Only the summary writer (SUMMARY_WRITER=true)
    # has the summary DB: the writer and the budget alerts run there alone.
    hot_path = HotPath(PricesFeed(settings, db))
    writer = SummaryWriter(closer) if settings.SUMMARY_WRITER else None
    budget_alerts = BudgetAlerts() if settings.SUMMARY_WRITER else None
    readiness = Readiness(settings, hot_path, writer, db)
    for service in (budget_alerts, hot_path, writer, readiness):
        if service is not None:
            _start_with(app, service)

    # Pages on the worker's web server (docs/contract.md §6)
    app.page("/metrics")(metrics)
    app.page("/health")(health)
    app.page("/ready")(ready_page(readiness))
    app.page("/status")(status_page(hot_path, db))
    app.page("/usage")(usage_page(db))
    app.page("/v1/usage/query")(usage_query_page(db))

    # Tasks and timers (each returns at once where SUMMARY_WRITER is false)
    schedule = RefreshSchedule(app, settings)
    rollup = Rollup(settings, db, closer, stopping=lambda: app.should_stop)
    app.task(schedule.on_schedule)
    app.timer(interval=RETRY_INTERVAL_SECONDS)(schedule.retry_failed)
    app.task(schedule.at_start)
    app.timer(interval=settings.ROLLUP_INTERVAL_SECONDS)(rollup.tick)

    # Commands of Faust's CLI (the name is the handler's, ``_`` as ``-``)
    app.command(*PUBLISH_OPTIONS)(publish)
    app.command(*DEV_OPTIONS)(dev)
    app.command(*REPLAY_OPTIONS, base=DirectCommand)(replay)
    app.command(*RAW_RESEND_OPTIONS)(raw_resend)
    app.command(*REPORT_OPTIONS)(report)
    app.command()(refresh)
    # click commands that run without the app (agents/main.py), listed in Faust's CLI too
    for name, command in (
        ("backup", backup.standalone),
        ("budget", budget.standalone),
        ("markup", markup.standalone),
    ):
        cli.add_command(command, name)

    # At shutdown: aiosqlite's thread would otherwise keep the process up
    async def close_summary_db(sender: faust.App, **signal: object) -> None:
        await db.close()

    # mode types a handler with mypy_extensions' VarArg/NamedArg, which no handler matches
    app.on_before_shutdown.connect(close_summary_db)  # type: ignore[arg-type]

    return Wiring(
        db=db,
        closer=closer,
        hot_path=hot_path,
        summary_writer=writer,
        budget_alerts=budget_alerts,
        readiness=readiness,
        rollup=rollup,
        refresh=schedule,
        # before Faust starts a worker: the first problem is one line (streams.cli)
        preflight=(summary_db_writable,),
        # once the topics exist, in this order: the writer's claim before anything reads
        # the summary DB's positions
        after_topics=(claim_summary_writer, carry_over_offsets, guard_batch_log),
    )


def _start_with(app: faust.App, service: mode.Service) -> None:
    """Have ``app`` start ``service`` with it. ``app.service`` is typed for a class,
    which Faust instantiates with no arguments of ours; given an instance it starts that
    one (``App._prepare_subservice``), so the service gets its collaborators here."""
    app.service(service)  # type: ignore[arg-type]
