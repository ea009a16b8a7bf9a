"""Budget alerts on the summary writer (its service, agents/wiring.py): fire thresholds,
deliver them to webhooks.

Two tasks of one service, beside the rollup and never in its way:

* **watch**: every ``ROLLUP_INTERVAL_SECONDS`` a pass of :class:`tables.summary_db.budget_watch.
  BudgetWatch` reads the live spend per client and month and records the thresholds
  crossed in ``budget_alerts`` (once per client, month and threshold, whatever restarts).
  A crossing shows in ``usage_daily_live`` within a rollup interval and the next pass
  fires it, so an alert fires within two intervals of the crossing (while the writer
  catches up on a backlog the rollup refreshes open days at most once a minute).
* **deliver**: POSTs each undelivered alert as JSON (``client_org_id``, ``usage_month``,
  ``threshold_pct``, ``limit_usd`` and ``spent_usd`` as exact decimal strings,
  ``fired_at``) to the budget's webhook, else ``BUDGET_WEBHOOK_URL``. A 2xx answer
  delivers it; anything else (an error status, a refused connection, a timeout of
  ``HTTP_TIMEOUT_SECONDS``, no webhook configured) is retried with backoff 1, 2, 4 … 60 s,
  for as long as it takes, also across restarts (the state is in ``budget_alerts``).
  Receivers should treat (client_org_id, usage_month, threshold_pct) as the alert's
  identity: a delivery whose answer was lost is sent again.

Billing never waits for either: they run in their own thread against their own SQLite
connection, in short transactions, and a failing webhook only fails its own attempts.
Webhook URLs may carry a token in their path, so logs name scheme, host and port only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sqlite3
import time
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import mode
import orjson

from streams.app import settings
from streams.metrics import BUDGET_ALERTS, BUDGET_ALERTS_UNDELIVERED, BUDGET_USED_RATIO
from streams.model.money import nano_text
from tables.summary_db.budget_watch import BudgetWatch, WatchPass
from tables.summary_db.budgets import AlertRow, mark_attempt, undelivered_alerts

__all__ = ["BudgetAlerts", "alert_payload", "redacted", "retry_delay"]

log = logging.getLogger(__name__)

BACKOFF_MAX_SECONDS = 60.0
NO_WEBHOOK = "no webhook: set BUDGET_WEBHOOK_URL or budget set ORG --webhook URL"


def retry_delay(attempts: int) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: 1, 2, 4 … 60."""
    return min(BACKOFF_MAX_SECONDS, 2.0 ** max(attempts - 1, 0))


def redacted(url: str) -> str:
    """``scheme://host[:port]/…``: what a log line may say about a webhook."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/…"


def alert_payload(alert: AlertRow) -> dict[str, Any]:
    """The webhook's JSON body (docs/contract.md §3): money as exact decimal strings."""
    return {
        "client_org_id": alert.client_org_id,
        "usage_month": alert.usage_month,
        "threshold_pct": alert.threshold_pct,
        "limit_usd": nano_text(alert.limit_nano),
        "spent_usd": nano_text(alert.spent_nano),
        "fired_at": alert.fired_at,
    }


class BudgetAlerts(mode.Service):
    """The watch and the delivery (module docstring)."""

    def __post_init__(self) -> None:
        self.watch = BudgetWatch(settings.summary_db_path)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "budgets")
        self.wake = asyncio.Event()
        self.retry_at: dict[tuple[str, str, int], float] = {}
        self.session: aiohttp.ClientSession | None = None
        self.gauged: set[str] = set()  # clients with a budget_used_ratio series
        self._failing: str | None = None  # the watch's last error, logged once

    async def _in_db(self, function: Any, *args: object) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def on_start(self) -> None:
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=settings.HTTP_TIMEOUT_SECONDS),
            headers={"User-Agent": "usage-stream budget alerts"},
        )

    async def on_stop(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def on_shutdown(self) -> None:
        """After mode cancelled the tasks (as the summary writer's executor)."""
        self._executor.submit(self.watch.close)
        self._executor.shutdown(wait=False)

    @mode.Service.task
    async def _watch(self) -> None:
        while not self.should_stop:
            month = datetime.now(settings.tz).strftime("%Y-%m")
            try:
                result: WatchPass = await self._in_db(self.watch.run, month)
            except (sqlite3.Error, OSError) as error:
                if str(error) != self._failing:
                    log.warning("budget watch failed (retried every pass): %s", error)
                self._failing = str(error)
            else:
                if self._failing is not None:
                    log.info("budget watch recovered")
                    self._failing = None
                self._observe(result)
            await self.sleep(settings.ROLLUP_INTERVAL_SECONDS)

    def _observe(self, result: WatchPass) -> None:
        for alert in result.fired:
            BUDGET_ALERTS.labels(result="fired").inc()
            log.info(
                "budget alert: %s reached %d%% of %s USD in %s (spent %s USD)",
                alert.client_org_id,
                alert.threshold_pct,
                nano_text(alert.limit_nano),
                alert.usage_month,
                nano_text(alert.spent_nano),
            )
        if result.fired:
            self.wake.set()
        BUDGET_ALERTS_UNDELIVERED.set(result.undelivered)
        for client, ratio in result.used.items():
            BUDGET_USED_RATIO.labels(client_org_id=client).set(ratio)
        for client in self.gauged - set(result.used):  # budget removed
            BUDGET_USED_RATIO.remove(client)
        self.gauged = set(result.used)

    @mode.Service.task
    async def _deliver(self) -> None:
        while not self.should_stop:
            try:
                pending: list[AlertRow] = await self._in_db(undelivered_alerts, self.watch.conn)
            except (sqlite3.Error, OSError) as error:
                log.warning("budget alerts: cannot read undelivered alerts: %s", error)
                pending = []
            now = time.monotonic()
            for alert in pending:
                if self.should_stop:
                    return
                if self.retry_at.get(alert.key, 0.0) <= now:
                    await self._send(alert)
            self.retry_at = {a.key: self.retry_at[a.key] for a in pending if a.key in self.retry_at}
            waits = [at - time.monotonic() for at in self.retry_at.values()]
            self.wake.clear()
            timeout = min([*waits, settings.ROLLUP_INTERVAL_SECONDS, 5.0])
            try:
                await asyncio.wait_for(self.wake.wait(), max(timeout, 0.05))
            except TimeoutError:
                pass

    async def _send(self, alert: AlertRow) -> None:
        secret = settings.BUDGET_WEBHOOK_URL
        url = alert.webhook_url or (secret.get_secret_value() if secret else None)
        error: str | None
        if url is None:
            error = NO_WEBHOOK
        else:
            error = await self._post(url, orjson.dumps(alert_payload(alert)))
        try:
            await self._in_db(self._record, alert.key, error)
        except (sqlite3.Error, OSError) as failure:  # sent, not recorded: sent again later
            log.warning("budget alerts: cannot record a delivery attempt: %s", failure)
        attempts = alert.attempts + 1
        where = redacted(url) if url else "nowhere"
        if error is None:
            BUDGET_ALERTS.labels(result="delivered").inc()
            self.retry_at.pop(alert.key, None)
            log.info(
                "budget alert %s %s %d%% delivered to %s (attempt %d)",
                alert.client_org_id,
                alert.usage_month,
                alert.threshold_pct,
                where,
                attempts,
            )
            return
        BUDGET_ALERTS.labels(result="failed").inc()
        delay = retry_delay(attempts)
        self.retry_at[alert.key] = time.monotonic() + delay
        if alert.attempts == 0 or delay >= BACKOFF_MAX_SECONDS:  # first, then once a minute
            log.warning(
                "budget alert %s %s %d%% not delivered to %s (attempt %d: %s); retrying in %g s",
                alert.client_org_id,
                alert.usage_month,
                alert.threshold_pct,
                where,
                attempts,
                error,
                delay,
            )

    def _record(self, key: tuple[str, str, int], error: str | None) -> None:
        mark_attempt(self.watch.conn, key, error)

    async def _post(self, url: str, body: bytes) -> str | None:
        """None when the webhook answered 2xx, else the one-line reason (never the URL)."""
        assert self.session is not None
        try:
            async with self.session.post(
                url,
                data=body,
                headers={"Content-Type": "application/json"},
                allow_redirects=False,
            ) as response:
                await response.read()
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except TimeoutError:
            return f"no answer within {settings.HTTP_TIMEOUT_SECONDS:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as error:
            text = " ".join(str(error).split()).replace(url, redacted(url))
            return f"{type(error).__name__}: {text}"[:300]
