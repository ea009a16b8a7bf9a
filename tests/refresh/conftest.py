"""Fake NBP and OpenRouter APIs on localhost, serving real-response fixtures (tests/fixtures/).

The fake NBP implements the real URL template and error behaviour
(tests/fixtures/nbp/ERRORS.md): a range answers the fixture tables inside it, 404 "Brak
danych" when none, 400 with NBP's body for an inverted range or one longer than 367 days.
Faults (5xx, slowness, bodies) are scripted per test. Everything goes over real HTTP
through the real client code.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from streams.clients.http import RetryPolicy
from streams.settings import Settings, load_settings
from tables.summary_db.schema import connect

#: Copies of the shared NBP and OpenRouter samples (tests/fixtures/README.md says which).
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

# Tests pass these instead of the production backoff: the whole module stays fast.
FAST_RETRY = RetryPolicy(attempts=3, initial_backoff_seconds=0.01, max_backoff_seconds=0.02)
TIMEOUT_SECONDS = 0.3


def fixture_path(relative: str) -> Path:
    """A fixture file; a missing one fails loudly, never skips."""
    path = FIXTURES / relative
    if not path.is_file():
        pytest.fail(
            f"fixture {relative} not found under {FIXTURES}: copy it from"
            " ../shared/fixtures/ (tests/fixtures/README.md)",
            pytrace=False,
        )
    return path


def fixture_text(relative: str) -> str:
    return fixture_path(relative).read_text(encoding="utf-8")


@dataclass
class Fault:
    """One scripted answer: delay, then either the normal response or ``status``/``body``."""

    status: int | None = None
    body: str = ""
    delay: float = 0.0


@dataclass
class FakeEndpoint:
    """Scripted faults (consumed in order), then ``default`` for every later request."""

    script: list[Fault] = field(default_factory=list)
    default: Fault | None = None
    requests: list[str] = field(default_factory=list)

    def next_fault(self) -> Fault | None:
        return self.script.pop(0) if self.script else self.default


@dataclass
class FakeApis:
    base_url: str
    nbp_rates: list[dict[str, Any]]
    models_json: str
    nbp: FakeEndpoint = field(default_factory=FakeEndpoint)
    openrouter: FakeEndpoint = field(default_factory=FakeEndpoint)
    nbp_ranges: list[tuple[date, date]] = field(default_factory=list)
    nbp_queries: list[dict[str, str]] = field(default_factory=list)
    published_through: date | None = None
    in_flight: int = 0
    max_in_flight: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def nbp_url(self) -> str:
        return f"{self.base_url}/nbp/api"

    @property
    def openrouter_url(self) -> str:
        return f"{self.base_url}/openrouter/api/v1"

    def add_rate(self, table_no: str, effective: str, mid: str) -> None:
        self.nbp_rates.append({"no": table_no, "effectiveDate": effective, "mid": Decimal(mid)})
        self.nbp_rates.sort(key=lambda rate: rate["effectiveDate"])


def _nbp_json(code: str, rates: list[dict[str, Any]]) -> str:
    """Compact JSON like NBP's, with ``mid`` written as the exact decimal text (3.6620)."""
    items = ",".join(
        f'{{"no":"{r["no"]}","effectiveDate":"{r["effectiveDate"]}","mid":{r["mid"]}}}'
        for r in rates
    )
    name = "dolar amerykański" if code == "USD" else code.lower()
    return f'{{"table":"A","currency":"{name}","code":"{code}","rates":[{items}]}}'


def _error(status: int, fixture: str) -> web.Response:
    body = fixture_text(fixture).strip()
    reason = "Not Found - Brak danych" if status == 404 else "Bad Request"
    return web.Response(status=status, reason=reason, text=body, content_type="text/plain")


def _nbp_range(fake: FakeApis, request: web.Request) -> web.Response:
    try:
        start = date.fromisoformat(request.match_info["start"])
        end = date.fromisoformat(request.match_info["end"])
    except ValueError:
        return _error(400, "nbp/error_400_invalid_range_body.txt")
    if start > end:
        return _error(400, "nbp/error_400_invalid_range_body.txt")
    if (end - start).days + 1 > 367:
        return _error(400, "nbp/error_400_range_367_body.txt")
    fake.nbp_ranges.append((start, end))
    last = min(end, fake.published_through or end)
    inside = [
        rate
        for rate in fake.nbp_rates
        if start.isoformat() <= rate["effectiveDate"] <= last.isoformat()
    ]
    if not inside:
        return _error(404, "nbp/error_404_body.txt")
    code = request.match_info["code"].upper()
    return web.Response(text=_nbp_json(code, inside), content_type="application/json")


async def _scripted(fake: FakeApis, endpoint: FakeEndpoint, request: web.Request, normal):
    endpoint.requests.append(str(request.rel_url))
    fake.in_flight += 1
    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
    try:
        fault = endpoint.next_fault()
        if fault and fault.delay:
            try:
                await asyncio.wait_for(fake.release.wait(), fault.delay)
            except TimeoutError:
                pass
        if fault and fault.status is not None:
            return web.Response(status=fault.status, text=fault.body)
        if fault and fault.body:
            return web.Response(text=fault.body, content_type="application/json")
        return normal()
    finally:
        fake.in_flight -= 1


def _app(fake: FakeApis) -> web.Application:
    async def nbp(request: web.Request) -> web.Response:
        fake.nbp_queries.append(dict(request.query))
        return await _scripted(fake, fake.nbp, request, lambda: _nbp_range(fake, request))

    async def models(request: web.Request) -> web.Response:
        return await _scripted(
            fake,
            fake.openrouter,
            request,
            lambda: web.Response(text=fake.models_json, content_type="application/json"),
        )

    app = web.Application()
    app.router.add_get("/nbp/api/exchangerates/rates/{table}/{code}/{start}/{end}/", nbp)
    app.router.add_get("/openrouter/api/v1/models", models)
    return app


def _fixture_rates() -> list[dict[str, Any]]:
    payload = json.loads(fixture_text("nbp/rates_a_usd_range.json"), parse_float=Decimal)
    return list(payload["rates"])


@pytest.fixture
async def fake_apis() -> AsyncIterator[FakeApis]:
    fake = FakeApis("", _fixture_rates(), fixture_text("openrouter/models.json"))
    server = TestServer(_app(fake), host="127.0.0.1", port=0)
    await server.start_server()
    fake.base_url = str(server.make_url("")).rstrip("/")
    try:
        yield fake
    finally:
        fake.release.set()  # let slow handlers finish so the server closes at once
        await server.close()


@pytest.fixture
def settings(fake_apis: FakeApis, tmp_path: Path) -> Settings:
    return load_settings(
        NBP_API_URL=fake_apis.nbp_url,
        OPENROUTER_API_URL=fake_apis.openrouter_url,
        HTTP_TIMEOUT_SECONDS=TIMEOUT_SECONDS,
        DATA_DIR=tmp_path / "data",
        BUSINESS_TIMEZONE="Europe/Warsaw",
    )


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[aiosqlite.Connection]:
    conn = await connect(tmp_path / "data" / "usage.db")
    try:
        yield conn
    finally:
        await conn.close()


async def rows(conn: aiosqlite.Connection, sql: str, args: tuple = ()) -> list[tuple]:
    async with conn.execute(sql, args) as cursor:
        return [tuple(row) for row in await cursor.fetchall()]
