"""The HTTP clients against the fake NBP/OpenRouter over real localhost HTTP."""

from __future__ import annotations

import socket
from datetime import date, timedelta
from decimal import Decimal

import pytest

from streams.clients.http import MalformedResponse, RequestRejected, SourceUnavailable
from streams.clients.nbp import MAX_RANGE_DAYS, NbpClient, NbpRate, day_chunks
from streams.clients.openrouter import ModelPrice, OpenRouterClient, parse_models

from .conftest import FAST_RETRY, TIMEOUT_SECONDS, FakeApis, Fault


def nbp_client(fake: FakeApis) -> NbpClient:
    return NbpClient(fake.nbp_url, timeout_seconds=TIMEOUT_SECONDS, retry=FAST_RETRY)


def openrouter_client(fake: FakeApis) -> OpenRouterClient:
    return OpenRouterClient(fake.openrouter_url, timeout_seconds=TIMEOUT_SECONDS, retry=FAST_RETRY)


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/api"


async def test_range_parses_exact_decimals(fake_apis: FakeApis) -> None:
    async with nbp_client(fake_apis) as nbp:
        rates = await nbp.rates(date(2025, 11, 6), date(2025, 11, 20))
    assert len(rates) == 10
    by_day = {rate.effective_date: rate for rate in rates}
    assert by_day[date(2025, 11, 14)] == NbpRate(
        "USD", date(2025, 11, 14), "221/A/NBP/2025", Decimal("3.6376")
    )
    assert str(by_day[date(2025, 11, 12)].mid) == "3.6620"  # trailing zero kept
    assert date(2025, 11, 11) not in by_day  # Independence Day
    assert fake_apis.nbp_queries == [{"format": "json"}]


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (date(2025, 11, 15), date(2025, 11, 16)),  # weekend
        (date(2025, 11, 11), date(2025, 11, 11)),  # holiday
    ],
)
async def test_no_table_404_is_empty_not_error(fake_apis: FakeApis, start, end) -> None:
    async with nbp_client(fake_apis) as nbp:
        assert await nbp.rates(start, end) == []
    assert len(fake_apis.nbp.requests) == 1  # an answer, not retried


async def test_404_without_nbp_text_is_an_error(fake_apis: FakeApis) -> None:
    """A wrong base URL must not look like "no tables, ever"."""
    client = NbpClient(fake_apis.base_url + "/wrong", timeout_seconds=0.3, retry=FAST_RETRY)
    async with client as nbp:
        with pytest.raises(RequestRejected, match="404"):
            await nbp.rates(date(2025, 11, 6), date(2025, 11, 7))


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        (date(2025, 11, 20), date(2025, 11, 6), "Invalid date range"),
        (date(2024, 1, 1), date(2025, 11, 20), "Limit of 367 days"),
    ],
)
async def test_bad_range_400_is_a_clear_error(fake_apis: FakeApis, start, end, message) -> None:
    async with nbp_client(fake_apis) as nbp:
        with pytest.raises(RequestRejected, match=message) as caught:
            await nbp.fetch_range(start, end)
    assert caught.value.status == 400
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith("nbp: GET http://127.0.0.1:")
    assert len(fake_apis.nbp.requests) == 1  # 4xx is never retried


async def test_inverted_range_is_refused_before_any_request(fake_apis: FakeApis) -> None:
    async with nbp_client(fake_apis) as nbp:
        with pytest.raises(ValueError, match="empty date range"):
            await nbp.rates(date(2025, 11, 20), date(2025, 11, 6))
    assert fake_apis.nbp.requests == []


async def test_long_range_is_paged_by_93_days(fake_apis: FakeApis) -> None:
    start, end = date(2025, 1, 1), date(2025, 11, 20)
    async with nbp_client(fake_apis) as nbp:
        rates = await nbp.rates(start, end)
    assert [rate.table_no for rate in rates][0] == "216/A/NBP/2025"
    assert len(rates) == 10
    seen = fake_apis.nbp_ranges
    assert len(seen) == 4
    assert all((last - first).days + 1 <= MAX_RANGE_DAYS for first, last in seen)
    assert seen[0][0] == start and seen[-1][1] == end
    assert all(b[0] == a[1] + timedelta(days=1) for a, b in zip(seen, seen[1:], strict=False))


def test_day_chunks_boundaries() -> None:
    day = date(2025, 1, 1)
    assert day_chunks(day, day) == [(day, day)]
    assert day_chunks(day, day + timedelta(days=92)) == [(day, day + timedelta(days=92))]
    assert len(day_chunks(day, day + timedelta(days=93))) == 2


async def test_5xx_then_success_is_retried(fake_apis: FakeApis) -> None:
    fake_apis.nbp.script = [Fault(500, "boom"), Fault(502, "bad gateway")]
    async with nbp_client(fake_apis) as nbp:
        rates = await nbp.rates(date(2025, 11, 14), date(2025, 11, 14))
    assert [rate.mid for rate in rates] == [Decimal("3.6376")]
    assert len(fake_apis.nbp.requests) == 3


async def test_always_503_gives_up_as_unavailable(fake_apis: FakeApis) -> None:
    fake_apis.nbp.default = Fault(503, "Service Unavailable")
    async with nbp_client(fake_apis) as nbp:
        with pytest.raises(SourceUnavailable, match=r"HTTP 503.*after 3 attempts"):
            await nbp.rates(date(2025, 11, 14), date(2025, 11, 14))
    assert len(fake_apis.nbp.requests) == FAST_RETRY.attempts


async def test_slow_response_times_out_then_retry_succeeds(fake_apis: FakeApis) -> None:
    fake_apis.openrouter.script = [Fault(delay=2.0)]
    async with openrouter_client(fake_apis) as openrouter:
        prices = await openrouter.model_prices()
    assert len(prices) == 6
    assert len(fake_apis.openrouter.requests) == 2


async def test_always_slow_is_unavailable(fake_apis: FakeApis) -> None:
    fake_apis.openrouter.default = Fault(delay=2.0)
    async with openrouter_client(fake_apis) as openrouter:
        with pytest.raises(SourceUnavailable, match="timed out"):
            await openrouter.model_prices()


async def test_closed_port_is_unavailable() -> None:
    async with NbpClient(closed_port_url(), timeout_seconds=0.3, retry=FAST_RETRY) as nbp:
        with pytest.raises(SourceUnavailable, match="ClientConnectorError"):
            await nbp.rates(date(2025, 11, 14), date(2025, 11, 14))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("<html>maintenance</html>", "not JSON"),
        ('{"table":"A","code":"USD"}', "missing 'rates'"),
        (
            '{"table":"A","code":"USD","rates":[{"no":"221/A/NBP/2025",'
            '"effectiveDate":"2025-11-14","mid":"3.6376"}]}',
            "mid is not a decimal",
        ),
        (
            '{"table":"A","code":"EUR","rates":[{"no":"221/A/NBP/2025",'
            '"effectiveDate":"2025-11-14","mid":4.2}]}',
            "currency code 'EUR'",
        ),
        (
            '{"table":"A","code":"USD","rates":[{"no":"221/A/NBP/2025",'
            '"effectiveDate":"2025-11-14","mid":NaN}]}',
            "not JSON",
        ),
        (
            '{"table":"A","code":"USD","rates":[{"no":"221/A/NBP/2025",'
            '"effectiveDate":"2025-12-01","mid":3.6}]}',
            "outside",
        ),
    ],
)
async def test_malformed_nbp_answer_is_rejected(fake_apis: FakeApis, body, message) -> None:
    fake_apis.nbp.default = Fault(body=body)
    async with nbp_client(fake_apis) as nbp:
        with pytest.raises(MalformedResponse, match=message) as caught:
            await nbp.rates(date(2025, 11, 14), date(2025, 11, 14))
    assert "\n" not in str(caught.value)
    assert len(fake_apis.nbp.requests) == 1  # a wrong answer is not retried


async def test_openrouter_prices_exact(fake_apis: FakeApis) -> None:
    async with openrouter_client(fake_apis) as openrouter:
        prices = {price.model_id: price for price in await openrouter.model_prices()}
    assert prices["openai/gpt-4o-mini"] == ModelPrice(
        "openai/gpt-4o-mini", Decimal("0.00000015"), Decimal("0.0000006"), Decimal("0")
    )
    assert prices["anthropic/claude-3.5-sonnet"].completion_usd_per_token == Decimal("0.000015")
    assert set(prices) == {
        "openai/gpt-4o-mini",
        "anthropic/claude-3.5-sonnet",
        "google/gemini-2.0-flash-001",
        "meta-llama/llama-3.1-8b-instruct",
        "meta-llama/llama-3.3-70b-instruct:free",
        "microsoft/phi-4-multimodal-instruct",
    }


def test_openrouter_shape_drift() -> None:
    """Missing price keys read as 0; "-1" (variable price) models are skipped."""
    payload = {
        "data": [
            {"id": "old/model", "pricing": {"prompt": "0.000001", "completion": "0.000002"}},
            {"id": "openrouter/auto", "pricing": {"prompt": "-1", "completion": "-1"}},
        ]
    }
    assert parse_models(payload) == [
        ModelPrice("old/model", Decimal("0.000001"), Decimal("0.000002"), Decimal(0))
    ]
    with pytest.raises(MalformedResponse, match="is not a decimal"):
        parse_models({"data": [{"id": "x", "pricing": {"prompt": "cheap"}}]})
    with pytest.raises(MalformedResponse, match="'data' list"):
        parse_models({"models": []})


async def test_openrouter_4xx_not_retried(fake_apis: FakeApis) -> None:
    fake_apis.openrouter.default = Fault(403, "forbidden")
    async with openrouter_client(fake_apis) as openrouter:
        with pytest.raises(RequestRejected, match="HTTP 403"):
            await openrouter.model_prices()
    assert len(fake_apis.openrouter.requests) == 1
