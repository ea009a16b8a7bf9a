"""Usage dates are local dates in the business time zone, DST included."""

from __future__ import annotations

from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import pytest

from streams.model.business_time import day_close_ms, local_midnight_ms, usage_date

WARSAW = ZoneInfo("Europe/Warsaw")


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).astimezone(UTC).timestamp() * 1000)


@pytest.mark.parametrize(
    ("utc", "local_date"),
    [
        # spring forward 2026-03-29: 02:00 CET -> 03:00 CEST (01:00 UTC)
        ("2026-03-28T22:59:59.999+00:00", "2026-03-28"),
        ("2026-03-28T23:00:00+00:00", "2026-03-29"),
        ("2026-03-29T00:59:59+00:00", "2026-03-29"),
        ("2026-03-29T01:00:00+00:00", "2026-03-29"),
        ("2026-03-29T03:00:00+00:00", "2026-03-29"),
        ("2026-03-29T21:59:59.999+00:00", "2026-03-29"),
        ("2026-03-29T22:00:00+00:00", "2026-03-30"),
        # fall back 2026-10-25: 03:00 CEST -> 02:00 CET (01:00 UTC)
        ("2026-10-24T21:59:59.999+00:00", "2026-10-24"),
        ("2026-10-24T22:00:00+00:00", "2026-10-25"),
        ("2026-10-25T00:30:00+00:00", "2026-10-25"),
        ("2026-10-25T01:30:00+00:00", "2026-10-25"),
        ("2026-10-25T22:59:59.999+00:00", "2026-10-25"),
        ("2026-10-25T23:00:00+00:00", "2026-10-26"),
        # 23:30 local on 2026-11-20 is 22:30 UTC, still the 20th
        ("2026-11-20T22:30:00+00:00", "2026-11-20"),
        ("2026-11-20T23:00:00+00:00", "2026-11-21"),
    ],
)
def test_usage_date_is_the_local_date(utc: str, local_date: str) -> None:
    assert usage_date(ms(utc), WARSAW) == date.fromisoformat(local_date)


def test_days_are_23_and_25_hours_long_on_dst_changes() -> None:
    def hours(day: date) -> float:
        start = local_midnight_ms(day, WARSAW)
        end = local_midnight_ms(date.fromordinal(day.toordinal() + 1), WARSAW)
        return (end - start) / 3_600_000

    assert hours(date(2026, 3, 29)) == 23
    assert hours(date(2026, 10, 25)) == 25
    assert hours(date(2026, 11, 20)) == 24


def test_day_closes_at_next_local_midnight_plus_grace() -> None:
    assert day_close_ms(date(2026, 11, 20), WARSAW, 3600) == ms("2026-11-21T00:00:00+00:00")
    assert day_close_ms(date(2026, 10, 24), WARSAW, 0) == ms("2026-10-24T22:00:00+00:00")
