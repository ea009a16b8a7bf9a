"""run_refresh end to end: fake APIs over localhost HTTP, a real SQLite file, real metrics."""

from __future__ import annotations

import logging
import socket
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from zoneinfo import ZoneInfo

import aiosqlite
import pytest

from agents.refresh import (
    next_refresh_run,
    refresh_needed_at_start,
    retry_due,
    run_refresh,
)
from streams.clients.nbp import NbpRate
from streams.clients.openrouter import ModelPrice
from streams.metrics import REGISTRY
from streams.settings import Settings, load_settings
from tables.summary_db.reference import store_model_prices, store_nbp_rates

from .conftest import FAST_RETRY, TIMEOUT_SECONDS, FakeApis, Fault, rows

D = date.fromisoformat
TODAY = D("2025-11-20")  # the fixture range ends on this Thursday
WARSAW = ZoneInfo("Europe/Warsaw")


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def runs(source: str, result: str) -> float:
    return metric("usage_stream_refresh_runs_total", source=source, result=result)


async def refresh(settings: Settings, db: aiosqlite.Connection, today: date = TODAY):
    return await run_refresh(settings, db, today=today, retry=FAST_RETRY)


async def batch_runs(db: aiosqlite.Connection) -> list[tuple]:
    return await rows(
        db,
        "SELECT kind, processing_date, success, records_processed, summaries_written, error,"
        " duration_seconds >= 0 FROM batch_runs ORDER BY id",
    )


async def test_happy_path_stores_exact_rates_and_prices(
    settings: Settings, db: aiosqlite.Connection, fake_apis: FakeApis
) -> None:
    before = {source: runs(source, "success") for source in ("nbp", "openrouter")}
    fake_apis.nbp.default = fake_apis.openrouter.default = Fault(delay=0.1)

    result = await refresh(settings, db)

    assert result.ok, result.errors
    assert fake_apis.max_in_flight == 2  # both sources fetched concurrently
    assert result.nbp_ranges == [(D("2025-11-06"), TODAY)]  # no stored rate: today-14
    stored = await rows(db, "SELECT effective_date, table_no, mid FROM nbp_rates ORDER BY 1")
    assert len(stored) == 10
    assert ("2025-11-12", "219/A/NBP/2025", "3.6620") in stored
    assert ("2025-11-14", "221/A/NBP/2025", "3.6376") in stored
    prices = await rows(
        db,
        "SELECT prompt_usd_per_token, completion_usd_per_token, request_usd FROM model_pricing"
        " WHERE model_id = 'openai/gpt-4o-mini'",
    )
    assert prices == [("0.00000015", "0.0000006", "0")]
    assert (await rows(db, "SELECT COUNT(*) FROM model_pricing")) == [(6,)]
    assert await batch_runs(db) == [("refresh", "2025-11-20", 1, 16, 0, None, 1)]
    status = await rows(db, "SELECT source, last_error FROM refresh_status ORDER BY 1")
    assert status == [("nbp", None), ("openrouter", None)]
    for source in ("nbp", "openrouter"):
        assert runs(source, "success") == before[source] + 1
        assert metric(
            "usage_stream_refresh_last_success_timestamp_seconds", source=source
        ) == pytest.approx(datetime.now(UTC).timestamp(), abs=60)
    assert metric("usage_stream_usd_pln_rate") == pytest.approx(3.6734)


async def test_next_run_fetches_from_the_latest_stored_rate(
    settings: Settings, db: aiosqlite.Connection, fake_apis: FakeApis
) -> None:
    await refresh(settings, db, today=D("2025-11-14"))
    fake_apis.nbp_ranges.clear()
    result = await refresh(settings, db, today=D("2025-11-18"))
    assert result.nbp_ranges == [(D("2025-11-14"), D("2025-11-18"))]
    assert result.prices_stored == 0  # same prices: no new history rows
    assert (result.rates_fetched, result.rates_stored) == (3, 2)


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/api"


@pytest.mark.parametrize("outage", ["503", "closed port"])
async def test_nbp_down_openrouter_up(
    settings: Settings, db: aiosqlite.Connection, fake_apis: FakeApis, outage: str
) -> None:
    if outage == "503":
        fake_apis.nbp.default = Fault(503, "Service Unavailable")
    else:
        settings = settings.model_copy(update={"NBP_API_URL": closed_port_url()})
    nbp_failures, or_successes = runs("nbp", "failure"), runs("openrouter", "success")

    result = await refresh(settings, db)

    assert set(result.errors) == {"nbp"}
    assert (await rows(db, "SELECT COUNT(*) FROM model_pricing")) == [(6,)]
    assert (await rows(db, "SELECT COUNT(*) FROM nbp_rates")) == [(0,)]
    [(kind, day, success, _, _, error, _)] = await batch_runs(db)
    assert (kind, day, success) == ("refresh", "2025-11-20", 0)
    assert error.startswith("nbp: GET ") and "openrouter" not in error and "\n" not in error
    assert runs("nbp", "failure") == nbp_failures + 1
    assert runs("openrouter", "success") == or_successes + 1
    status = dict(await rows(db, "SELECT source, last_error FROM refresh_status"))
    assert status["nbp"] == error and status["openrouter"] is None


async def test_transient_5xx_then_success(
    settings: Settings, db: aiosqlite.Connection, fake_apis: FakeApis
) -> None:
    fake_apis.nbp.script = [Fault(500, "oops")]
    fake_apis.openrouter.script = [Fault(503, "busy"), Fault(502, "busy")]
    result = await refresh(settings, db)
    assert result.ok, result.errors
    assert (await rows(db, "SELECT COUNT(*) FROM nbp_rates")) == [(10,)]
    assert len(fake_apis.openrouter.requests) == 3


async def test_timeout_is_recorded_and_retried_later(
    settings: Settings, db: aiosqlite.Connection, fake_apis: FakeApis
) -> None:
    fake_apis.nbp.default = Fault(delay=2.0)
    assert not await retry_due(db, TODAY)

    failed = await refresh(settings, db)

    assert "timed out" in failed.errors["nbp"]
    [(_, _, success, _, _, error, _)] = await batch_runs(db)
    assert success == 0 and f"timed out after {TIMEOUT_SECONDS} s" in error
    assert len(fake_apis.nbp.requests) == FAST_RETRY.attempts
    assert await retry_due(db, TODAY)
    assert not await retry_due(db, D("2025-11-21"))  # a new day: the schedule takes over

    fake_apis.nbp.default = None
    retried = await refresh(settings, db)
    assert retried.ok
    assert not await retry_due(db, TODAY)
    assert [run[2] for run in await batch_runs(db)] == [0, 1]


async def snapshot(db: aiosqlite.Connection) -> list[list[tuple]]:
    return [
        await rows(db, f"SELECT * FROM {table} ORDER BY 1, 2")
        for table in ("nbp_rates", "nbp_coverage", "usage_daily")
    ]


async def test_malformed_nbp_changes_nothing(
    settings: Settings,
    db: aiosqlite.Connection,
    fake_apis: FakeApis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await insert_usage(db, "2025-11-17", 1000)
    fake_apis.nbp.default = Fault(body='{"table":"A","code":"USD","rates":[{"no":"x"}]}')
    before = await snapshot(db)

    with caplog.at_level(logging.ERROR, logger="agents.refresh"):
        result = await refresh(settings, db)

    assert await snapshot(db) == before
    assert "rates[0].no is not a table A number" in result.errors["nbp"]
    [record] = [r for r in caplog.records if r.name == "agents.refresh"]
    assert record.getMessage().startswith("refresh nbp failed: nbp: GET http://127.0.0.1:")
    assert "\n" not in record.getMessage()
    assert (await rows(db, "SELECT COUNT(*) FROM model_pricing")) == [(6,)]


async def test_malformed_openrouter_changes_nothing(
    settings: Settings, db: aiosqlite.Connection, fake_apis: FakeApis
) -> None:
    await refresh(settings, db)
    fake_apis.openrouter.default = Fault(body="{not json")
    before = await rows(db, "SELECT * FROM model_pricing ORDER BY 1, 5")
    result = await refresh(settings, db)
    assert set(result.errors) == {"openrouter"} and "not JSON" in result.errors["openrouter"]
    assert await rows(db, "SELECT * FROM model_pricing ORDER BY 1, 5") == before


# PLN backfill ---------------------------------------------------------------------------


async def insert_usage(
    db: aiosqlite.Connection,
    usage_date: str,
    markup_nano: int,
    user: str = "u1",
    pln_nano: int | None = None,
    revision: int = 1,
) -> None:
    """A usage_daily row as the rollup writes it before a rate is known (PLN NULL)."""
    await db.execute(
        "INSERT INTO usage_daily (client_org_id, user_id, model, usage_date, input_tokens,"
        " output_tokens, total_tokens, requests, estimated_requests, raw_cost_nano,"
        " markup_cost_nano, markup_cost_pln_nano, raw_cost_usd, markup_cost_usd,"
        " markup_cost_pln, usd_pln_rate, nbp_table_no, revision, updated_at)"
        " VALUES ('org', ?, 'openai/gpt-4o-mini', ?, 10, 5, 15, 1, 0, ?, ?, ?, 0, 0,"
        " NULL, ?, ?, ?, '2025-01-01T00:00:00.000000Z')",
        (
            user,
            usage_date,
            markup_nano,
            markup_nano,
            pln_nano,
            "9.9999" if pln_nano is not None else None,
            "000/A/NBP/2025" if pln_nano is not None else None,
            revision,
        ),
    )


def expected_pln(markup_nano: int, mid: str) -> int:
    """Independent of streams.model.money: Decimal product, rounded half-even to an integer."""
    return int((Decimal(markup_nano) * Decimal(mid)).quantize(Decimal(1), ROUND_HALF_EVEN))


# (usage_date, user, markup_nano) -> (table_no, mid)
BACKFILL = {
    ("2025-11-12", "u1", 1250): ("218/A/NBP/2025", "3.6692"),  # 4586.5 -> 4586 (even)
    ("2025-11-12", "u2", 3750): ("218/A/NBP/2025", "3.6692"),  # 13759.5 -> 13760
    ("2025-11-17", "u1", 625): ("221/A/NBP/2025", "3.6376"),  # 2273.5 -> 2274
    ("2025-11-17", "u2", 1875): ("221/A/NBP/2025", "3.6376"),  # 6820.5 -> 6820
    ("2025-11-17", "u3", 123_456_789_012): ("221/A/NBP/2025", "3.6376"),
    ("2025-03-10", "u1", 987_654_321): ("046/A/NBP/2025", "3.8521"),  # months old
    ("2025-11-21", "u1", 1000): ("225/A/NBP/2025", "3.6734"),  # tomorrow: today's table
}


async def test_pln_backfill_exact(
    settings: Settings, db: aiosqlite.Connection, fake_apis: FakeApis
) -> None:
    # ILLUSTRATIVE extra table (numbering real: 046 = Fri 2025-03-07), not in the fixtures.
    fake_apis.add_rate("046/A/NBP/2025", "2025-03-07", "3.8521")
    for day, user, nano in BACKFILL:
        await insert_usage(db, day, nano, user)
    await insert_usage(db, "2025-11-14", 5000, "u9", pln_nano=999, revision=3)

    result = await refresh(settings, db)

    assert result.ok and result.pln_filled == len(BACKFILL)
    # The old waiting date was fetched too: [D-10, D-1] besides the default range.
    assert result.nbp_ranges == [(D("2025-02-28"), D("2025-03-09")), (D("2025-11-02"), TODAY)]
    for (day, user, nano), (table_no, mid) in BACKFILL.items():
        [row] = await rows(
            db,
            "SELECT markup_cost_pln_nano, markup_cost_pln, usd_pln_rate, nbp_table_no,"
            " revision, updated_at FROM usage_daily WHERE usage_date = ? AND user_id = ?",
            (day, user),
        )
        pln = expected_pln(nano, mid)
        assert row[0] == pln, (day, user)
        assert row[1] == pytest.approx(pln / 1e9)
        assert row[2:5] == (mid, table_no, 2)
        assert row[5] > "2025-01-01T00:00:00.000000Z"
    untouched = await rows(
        db, "SELECT markup_cost_pln_nano, revision FROM usage_daily WHERE user_id = 'u9'"
    )
    assert untouched == [(999, 3)]
    assert await batch_runs(db) == [("refresh", "2025-11-20", 1, 17, 7, None, 1)]


async def test_today_before_publication_is_not_final(
    settings: Settings, db: aiosqlite.Connection, fake_apis: FakeApis
) -> None:
    """Before ~12:15 "no table today" means "not yet": tomorrow's usage must wait."""
    fake_apis.published_through = D("2025-11-19")
    await insert_usage(db, "2025-11-20", 1000)
    await insert_usage(db, "2025-11-21", 1000)

    first = await refresh(settings, db)

    assert first.ok and first.pln_filled == 1
    filled = dict(await rows(db, "SELECT usage_date, nbp_table_no FROM usage_daily"))
    assert filled == {"2025-11-20": "224/A/NBP/2025", "2025-11-21": None}

    fake_apis.published_through = None  # NBP publishes today's table
    second = await refresh(settings, db)

    assert second.pln_filled == 1
    filled = dict(await rows(db, "SELECT usage_date, nbp_table_no FROM usage_daily"))
    assert filled["2025-11-21"] == "225/A/NBP/2025"


# Scheduling -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cron", "after_local", "expected_utc"),
    [
        # DST starts Sun 2026-03-29: 13:00 CEST = 11:00 UTC (the day before: 12:00 UTC).
        ("0 13 * * *", "2026-03-28T14:00", "2026-03-29T11:00"),
        ("0 13 * * *", "2026-03-28T12:59", "2026-03-28T12:00"),
        # DST ends Sun 2026-10-25: 13:00 CET = 12:00 UTC.
        ("0 13 * * *", "2026-10-24T14:00", "2026-10-25T12:00"),
        ("0 13 * * *", "2026-10-24T12:00", "2026-10-24T11:00"),
        ("0 13 * * *", "2026-01-15T13:00", "2026-01-16T12:00"),  # strictly after
        ("0 13 * * *", "2026-07-01T12:00", "2026-07-01T11:00"),
        ("30 2 * * *", "2026-03-28T14:00", "2026-03-29T01:30"),  # in the spring gap
        ("30 2 * * *", "2026-10-24T14:00", "2026-10-25T00:30"),  # repeated: first one
    ],
)
def test_next_refresh_run_is_dst_correct(cron: str, after_local: str, expected_utc: str) -> None:
    after = datetime.fromisoformat(after_local).replace(tzinfo=WARSAW)
    expected = datetime.fromisoformat(expected_utc).replace(tzinfo=UTC)
    got = next_refresh_run(cron, WARSAW, after)
    assert got == expected and got.tzinfo == UTC


def test_next_refresh_run_after_a_repeated_hour_runs_once() -> None:
    second_0215 = datetime(2026, 10, 25, 1, 15, tzinfo=UTC)  # 02:15 CET, after 02:30 CEST
    assert next_refresh_run("30 2 * * *", WARSAW, second_0215) == datetime(
        2026, 10, 26, 1, 30, tzinfo=UTC
    )
    with pytest.raises(ValueError, match="timezone-aware"):
        next_refresh_run("0 13 * * *", WARSAW, datetime(2026, 1, 1))


def rate(day: str, table_no: str) -> NbpRate:
    return NbpRate("USD", D(day), table_no, Decimal("3.6"))


@pytest.mark.parametrize(
    ("latest", "today", "needed"),
    [
        ("2025-11-14", "2025-11-15", False),  # Sat: Fri's table is the last one
        ("2025-11-14", "2025-11-17", False),  # Mon: last business day is Fri
        ("2025-11-14", "2025-11-18", True),  # Tue: Monday's table is missing
        ("2025-11-17", "2025-11-18", False),
        ("2025-11-17", "2025-11-20", True),
        ("2025-11-10", "2025-11-12", True),  # 11-11 holiday: one harmless extra refresh
    ],
)
async def test_refresh_needed_at_start(
    db: aiosqlite.Connection, latest: str, today: str, needed: bool
) -> None:
    await store_model_prices(db, [ModelPrice("m", Decimal(0), Decimal(0), Decimal(0))])
    await store_nbp_rates(db, [rate(latest, "1/A/NBP/2025")])
    assert await refresh_needed_at_start(db, D(today)) is needed


async def test_refresh_needed_at_start_when_empty(db: aiosqlite.Connection) -> None:
    assert await refresh_needed_at_start(db, TODAY)
    await store_nbp_rates(db, [rate("2025-11-19", "224/A/NBP/2025")])
    assert await refresh_needed_at_start(db, TODAY)  # rates fresh, but no prices at all
    await store_model_prices(db, [ModelPrice("m", Decimal(0), Decimal(0), Decimal(0))])
    assert not await refresh_needed_at_start(db, TODAY)


def test_settings_fixture_points_at_the_fake(settings: Settings, fake_apis: FakeApis) -> None:
    assert settings == load_settings(
        NBP_API_URL=fake_apis.nbp_url,
        OPENROUTER_API_URL=fake_apis.openrouter_url,
        HTTP_TIMEOUT_SECONDS=TIMEOUT_SECONDS,
        DATA_DIR=settings.DATA_DIR,
        BUSINESS_TIMEZONE="Europe/Warsaw",
    )
