"""tables.summary_db.reference on a real SQLite file: rates, the cost-date rule, prices, runs."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import aiosqlite
import pytest

from streams.clients.nbp import NbpRate
from streams.clients.openrouter import ModelPrice
from tables.summary_db.reference import (
    AppliedRate,
    latest_model_prices,
    rate_for_date,
    record_batch_run,
    record_refresh_status,
    refresh_status,
    store_model_prices,
    store_nbp_rates,
)
from tables.summary_db.schema import utc_now_text

from .conftest import rows

D = date.fromisoformat

# The fixture's table numbers and dates (rates_a_usd_range.json); 11-11 is a holiday.
NOVEMBER = [
    NbpRate("USD", D("2025-11-06"), "216/A/NBP/2025", Decimal("3.6871")),
    NbpRate("USD", D("2025-11-07"), "217/A/NBP/2025", Decimal("3.6793")),
    NbpRate("USD", D("2025-11-10"), "218/A/NBP/2025", Decimal("3.6692")),
    NbpRate("USD", D("2025-11-12"), "219/A/NBP/2025", Decimal("3.6620")),
    NbpRate("USD", D("2025-11-13"), "220/A/NBP/2025", Decimal("3.6458")),
    NbpRate("USD", D("2025-11-14"), "221/A/NBP/2025", Decimal("3.6376")),
    NbpRate("USD", D("2025-11-17"), "222/A/NBP/2025", Decimal("3.6445")),
]
COVERED = (D("2025-11-06"), D("2025-11-17"))


async def test_rates_stored_as_exact_text_and_upsert_is_idempotent(
    db: aiosqlite.Connection,
) -> None:
    assert await store_nbp_rates(db, NOVEMBER, covered=COVERED) == 7
    assert await store_nbp_rates(db, NOVEMBER, covered=COVERED) == 0
    stored = await rows(db, "SELECT effective_date, table_no, mid FROM nbp_rates")
    assert ("2025-11-12", "219/A/NBP/2025", "3.6620") in stored
    assert ("2025-11-14", "221/A/NBP/2025", "3.6376") in stored
    assert await rows(db, "SELECT typeof(mid) FROM nbp_rates GROUP BY 1") == [("text",)]


@pytest.mark.parametrize(
    ("usage_date", "table_no", "mid"),
    [
        ("2025-11-12", "218/A/NBP/2025", "3.6692"),  # Wed after the 11-11 holiday -> Mon
        ("2025-11-17", "221/A/NBP/2025", "3.6376"),  # Mon -> Fri
        ("2025-11-15", "221/A/NBP/2025", "3.6376"),  # Sat -> Fri
        ("2025-11-13", "219/A/NBP/2025", "3.6620"),  # never the same day's table (220)
        ("2025-11-18", "222/A/NBP/2025", "3.6445"),
    ],
)
async def test_rate_is_the_last_business_day_strictly_before(
    db: aiosqlite.Connection, usage_date: str, table_no: str, mid: str
) -> None:
    await store_nbp_rates(db, NOVEMBER, covered=COVERED)
    rate = await rate_for_date(db, D(usage_date))
    assert rate is not None
    assert (rate.table_no, str(rate.mid)) == (table_no, mid)
    assert rate.effective_date < D(usage_date)


async def test_no_rate_while_days_before_the_date_are_unknown(db: aiosqlite.Connection) -> None:
    """Rates up to Mon 11-10 known, nothing fetched after: 11-17 must not take 11-10."""
    await store_nbp_rates(db, NOVEMBER[:3], covered=(D("2025-11-06"), D("2025-11-10")))
    assert await rate_for_date(db, D("2025-11-17")) is None
    assert await rate_for_date(db, D("2025-11-12")) is None  # was 11-11 a holiday? unknown
    assert await rate_for_date(db, D("2025-11-11")) == AppliedRate(
        Decimal("3.6692"), "218/A/NBP/2025", D("2025-11-10")
    )
    assert await rate_for_date(db, D("2025-11-06")) is None  # nothing before at all
    # A later fetch confirms 11-11 had no table: now 11-12 has its rate.
    await store_nbp_rates(db, [], covered=(D("2025-11-11"), D("2025-11-11")))
    assert (await rate_for_date(db, D("2025-11-12"))).table_no == "218/A/NBP/2025"


def price(model: str, prompt: str, completion: str, request: str = "0") -> ModelPrice:
    return ModelPrice(model, Decimal(prompt), Decimal(completion), Decimal(request))


async def test_price_history_only_on_change(db: aiosqlite.Connection) -> None:
    first = [price("openai/gpt-4o-mini", "0.00000015", "0.0000006"), price("m/b", "0", "0")]
    assert await store_model_prices(db, first) == 2
    assert await store_model_prices(db, first) == 0
    changed = [price("openai/gpt-4o-mini", "0.0000002", "0.0000006"), price("m/b", "0", "0")]
    assert await store_model_prices(db, changed) == 1
    history = await rows(
        db,
        "SELECT prompt_usd_per_token, completion_usd_per_token, request_usd FROM model_pricing"
        " WHERE model_id = 'openai/gpt-4o-mini' ORDER BY fetched_at",
    )
    assert history == [("0.00000015", "0.0000006", "0"), ("0.0000002", "0.0000006", "0")]
    latest = await latest_model_prices(db)
    assert latest["openai/gpt-4o-mini"].prompt_usd_per_token == Decimal("0.0000002")
    assert set(latest) == {"openai/gpt-4o-mini", "m/b"}


async def test_batch_run_row(db: aiosqlite.Connection) -> None:
    started = datetime(2025, 11, 20, 12, 0, tzinfo=UTC)
    run_id = await record_batch_run(
        db,
        "rollup",
        D("2025-11-19"),
        started,
        started + timedelta(seconds=2.5),
        True,
        records_processed=10,
        summaries_written=3,
        clients_processed=2,
        late_events=1,
    )
    text_id = await record_batch_run(db, "replay", "2025-11-18", utc_now_text(), None, False, "x")
    got = await rows(
        db,
        "SELECT kind, processing_date, started_at, duration_seconds, success, records_processed,"
        " summaries_written, clients_processed, data_corrections, late_events, error"
        " FROM batch_runs WHERE id = ?",
        (run_id,),
    )
    assert got == [
        ("rollup", "2025-11-19", "2025-11-20T12:00:00.000000Z", 2.5, 1, 10, 3, 2, 0, 1, None)
    ]
    assert text_id == run_id + 1
    with pytest.raises(TypeError, match="bogus"):
        await record_batch_run(db, "refresh", None, started, started, True, bogus=1)
    with pytest.raises(ValueError, match="unknown batch kind"):
        await record_batch_run(db, "cleanup", None, started, started, True)


async def test_refresh_status_keeps_last_success(db: aiosqlite.Connection) -> None:
    await record_refresh_status(db, "nbp", True, None)
    success = (await refresh_status(db))["nbp"]["last_success_at"]
    await record_refresh_status(db, "nbp", False, "nbp: down")
    status = (await refresh_status(db))["nbp"]
    assert status["last_success_at"] == success
    assert status["last_error"] == "nbp: down"
    assert status["last_attempt_at"] >= success
