"""The demo's billing setup for ``usage-stream dev --demo``: a budget with alerts, a price
book rule, and a local webhook receiver that prints the alerts it gets.

* ``org-1`` gets a budget of :data:`DEMO_BUDGET_USD` marked-up USD a month with alerts at
  50, 80 and 100 %: at the default rate (200 events/s, a third of them org-1's) it
  crosses 50 % within about a minute and a half.
* ``org-2`` is marked up by :data:`DEMO_MARKUP` from today on (the default stays
  ``USAGE_MARKUP_MULTIPLIER`` for the others, and for org-2's past days: rules apply
  forward only). Added once: a run on a later day finds the rule already in force.
* The receiver listens on a free localhost port and prints each alert as a log line of
  the dev stack; the budget's webhook points at it (set again at every start, since the
  port changes).

The same code paths as ``usage-stream budget set`` and ``markup set`` write them.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal

import orjson
from aiohttp import web

from streams.kafka.broker import free_port
from streams.settings import Settings

__all__ = ["DEMO_BUDGET_USD", "DEMO_MARKUP", "AlertPrinter", "set_up_demo_billing"]

DEMO_CLIENT_BUDGET = "org-1"
DEMO_BUDGET_USD = "10"
DEMO_THRESHOLDS = (50, 80, 100)
DEMO_CLIENT_MARKUP = "org-2"
DEMO_MARKUP = Decimal("1.5")


class AlertPrinter:
    """The demo's webhook receiver: prints every budget alert POSTed to it."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/budget-alerts"

    async def _receive(self, request: web.Request) -> web.Response:
        try:
            alert = orjson.loads(await request.read())
            self.log(
                f"budget alert received: {alert['client_org_id']} reached"
                f" {alert['threshold_pct']}% of {alert['limit_usd']} USD in"
                f" {alert['usage_month']} (spent {alert['spent_usd']} USD)"
            )
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return web.Response(status=400, text="not a budget alert")
        return web.json_response({"received": True})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/budget-alerts", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def set_up_demo_billing(settings: Settings, webhook_url: str) -> list[str]:
    """Write the demo's budget and rule into the summary DB; the banner lines."""
    from tables.summary_db.budgets import Budget, parse_limit, set_budget
    from tables.summary_db.command_db import open_read_write
    from tables.summary_db.pricebook import add_rule, load_rules_sync, multiplier_text

    today = datetime.now(settings.tz).date()
    conn = open_read_write(settings.summary_db_path)
    try:
        set_budget(
            conn,
            Budget(DEMO_CLIENT_BUDGET, parse_limit(DEMO_BUDGET_USD), DEMO_THRESHOLDS, webhook_url),
        )
        in_force = load_rules_sync(conn, settings.USAGE_MARKUP_MULTIPLIER).for_day(today)
        if in_force.by_client.get(DEMO_CLIENT_MARKUP) != DEMO_MARKUP:
            add_rule(
                conn,
                client_org_id=DEMO_CLIENT_MARKUP,
                model=None,
                multiplier=DEMO_MARKUP,
                effective_from=today,
                note="demo: org-2's contract",
                tz=settings.tz,
                grace_seconds=settings.WINDOW_GRACE_SECONDS,
            )
    finally:
        conn.close()
    thresholds = ",".join(str(p) for p in DEMO_THRESHOLDS)
    return [
        f"budget:      {DEMO_CLIENT_BUDGET} {DEMO_BUDGET_USD} USD a month, alerts at {thresholds} %"
        " printed here (usage-stream budget list)",
        f"markup:      {DEMO_CLIENT_MARKUP} x{multiplier_text(DEMO_MARKUP)} from {today},"
        f" others x{multiplier_text(settings.USAGE_MARKUP_MULTIPLIER)}"
        " (usage-stream markup list)",
    ]
