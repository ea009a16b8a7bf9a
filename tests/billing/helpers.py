"""Shared pieces of the billing tests: events on chosen local dates, a real webhook
receiver (an aiohttp server in its own thread), waiting for the pipeline to settle, and
NBP rates seeded into the summary DB as the refresh stores them."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from aiohttp import web

from streams.kafka.broker import free_port
from tests.ground_truth import WARSAW, local_midnight_ms
from tests.harness import Stack, wait_for

__all__ = [
    "Receiver",
    "event",
    "local_today",
    "one_line_error",
    "publish",
    "seed_rates",
    "settled",
]


def local_today() -> date:
    """Today in Europe/Warsaw, waiting out the last minutes before midnight: a test's
    "today" must not close under it. (Yesterday may still be open in the first hour of
    a day, WINDOW_GRACE_SECONDS: the tests' closed dates are two days back or older.)"""
    now = datetime.now(WARSAW)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), WARSAW)
    if (left := (midnight - now).total_seconds()) < 300:
        time.sleep(left + 5)
    return datetime.now(WARSAW).date()


def event(
    request_id: str,
    client: str,
    day: date,
    cost_usd: str,
    *,
    user: str = "user-1",
    model: str = "openai/gpt-4o-mini",
    tokens: tuple[int, int] = (100, 20),
    second: int = 0,
) -> dict[str, Any]:
    """A valid usage event on local date ``day``: at 00:00:01 + ``second`` local, or, for
    today, a few seconds ago (never in the future)."""
    moment = local_midnight_ms(day) + 1000 + second * 1000
    now_ms = int(time.time() * 1000)
    if moment > now_ms - 5000:
        moment = now_ms - 5000 - second
    return {
        "request_id": request_id,
        "client_org_id": client,
        "user_id": user,
        "model": model,
        "input_tokens": tokens[0],
        "output_tokens": tokens[1],
        "cost_usd": cost_usd,
        "timestamp": datetime.fromtimestamp(moment / 1000, UTC).isoformat(timespec="milliseconds"),
    }


def publish(stack: Stack, events: list[dict[str, Any]]) -> None:
    stack.publish(
        [orjson.dumps(e) for e in events], keys=[e["request_id"].encode() for e in events]
    )


def settled(stack: Stack, unique: int, timeout: float = 90) -> None:
    """Every one of ``unique`` requests applied and every closed date merged: nothing
    pending but open days' increments, the live view counting them all."""

    def done() -> bool:
        try:
            ((live,),) = stack.query("SELECT COALESCE(SUM(requests), 0) FROM usage_daily_live")
            ((billed,),) = stack.query(
                "SELECT (SELECT COALESCE(SUM(requests), 0) FROM usage_daily)"
                " + (SELECT COALESCE(SUM(requests), 0) FROM daily_pending)"
            )
        except Exception:  # noqa: BLE001 - the DB is not created yet
            return False
        return live == billed == unique

    wait_for(done, timeout, f"{unique} requests billed and shown live", 0.2)


def seed_rates(stack: Stack, first: date, last: date) -> dict[date, tuple[str, Decimal]]:
    """A synthetic NBP table for every day of [first - 7, last], stored as the refresh
    stores them (so every usage date in [first, last] has a certain rate: the previous
    day's); returns usage date -> (table, mid) that applies."""
    from streams.clients.nbp import NbpRate
    from tables.summary_db.reference import store_nbp_rates
    from tables.summary_db.schema import connect

    start = first - timedelta(days=7)
    tables = {
        start + timedelta(days=k): (
            f"{k + 1:03d}/A/NBP/{(start + timedelta(days=k)).year}",
            (Decimal("3.6") + Decimal(k % 17) / 97).quantize(Decimal("0.0001")),
        )
        for k in range((last - start).days + 1)
    }

    async def store() -> None:
        conn = await connect(stack.db_path)
        try:
            await store_nbp_rates(
                conn,
                [NbpRate("USD", day, no, mid) for day, (no, mid) in tables.items()],
                covered=(start, last),
            )
        finally:
            await conn.close()

    asyncio.run(store())
    return {day + timedelta(days=1): rate for day, rate in tables.items()}


def one_line_error(result: Any) -> str:
    """The single ``usage-stream: …`` line of a failed command (no traceback)."""
    err = result.stderr.decode()
    assert result.returncode != 0, result
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("usage-stream: "), err
    return lines[0]


class Receiver:
    """A real webhook receiver on a fixed localhost port: records every POST (time and
    JSON body), answers 200; can be stopped and started again on the same port.

    While ``hang_seconds`` > 0 it accepts each POST and reads it, then answers only after
    that many seconds (a hung receiver): such POSTs go to ``hung``, not ``received``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[tuple[float, dict[str, Any]]] = []
        self.hung: list[dict[str, Any]] = []
        self.hang_seconds = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/budget/s3cr3t-token"

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [body for _, body in self.received]

    async def _handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        assert request.headers["Content-Type"].startswith("application/json")
        if (hang := self.hang_seconds) > 0:
            self.hung.append(body)
            await asyncio.sleep(hang)
            return web.json_response({"ok": "too late"})
        self.received.append((time.time(), body))
        return web.json_response({"ok": True})

    def start(self) -> Receiver:
        started = threading.Event()

        async def serve() -> None:
            app = web.Application()
            app.router.add_post("/hooks/budget/s3cr3t-token", self._handle)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
            await site.start()
            self._stopping = asyncio.Event()
            started.set()
            await self._stopping.wait()
            await runner.cleanup()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(serve())
            self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert started.wait(10), "the receiver did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = self._thread = self._stopping = None
