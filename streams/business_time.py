"""Usage dates: the calendar date of the event time in the business time zone.

Faust's tumbling windows are aligned to multiples of the window size since the UTC
epoch, so a 24 h window can never follow Warsaw days (23 h in spring, 25 h in autumn).
The pipeline therefore keys its aggregates by the local date computed here.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

__all__ = ["day_close_ms", "local_midnight_ms", "usage_date"]


def usage_date(event_ms: int, tz: ZoneInfo) -> date:
    """The local calendar date of an epoch-milliseconds event time."""
    return datetime.fromtimestamp(event_ms / 1000, tz=UTC).astimezone(tz).date()


def local_midnight_ms(day: date, tz: ZoneInfo) -> int:
    """Epoch ms of 00:00 local time on ``day`` (zoneinfo resolves DST offsets)."""
    return int(datetime.combine(day, time(0), tzinfo=tz).timestamp() * 1000)


def day_close_ms(day: date, tz: ZoneInfo, grace_seconds: int) -> int:
    """When ``day`` closes: the next local midnight plus the grace period."""
    return local_midnight_ms(day + timedelta(days=1), tz) + grace_seconds * 1000
