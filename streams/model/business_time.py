"""Usage dates: the calendar date of the event time in the business time zone.

Faust's tumbling windows are aligned to multiples of the window size since the UTC
epoch, so a 24 h window can never follow Warsaw days (23 h in spring, 25 h in autumn).
The pipeline therefore keys its aggregates by the local date computed here.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

__all__ = ["UsageDates", "day_close_ms", "local_midnight_ms", "usage_date"]

_QUARTER_HOUR_MS = 900_000  # every UTC offset in use is a multiple of 15 minutes


def usage_date(event_ms: int, tz: ZoneInfo) -> date:
    """The local calendar date of an epoch-milliseconds event time."""
    return datetime.fromtimestamp(event_ms / 1000, tz=UTC).astimezone(tz).date()


def local_midnight_ms(day: date, tz: ZoneInfo) -> int:
    """Epoch ms of 00:00 local time on ``day`` (zoneinfo resolves DST offsets)."""
    return int(datetime.combine(day, time(0), tzinfo=tz).timestamp() * 1000)


def day_close_ms(day: date, tz: ZoneInfo, grace_seconds: int) -> int:
    """When ``day`` closes: the next local midnight plus the grace period."""
    return local_midnight_ms(day + timedelta(days=1), tz) + grace_seconds * 1000


class UsageDates:
    """``usage_date`` as (ISO text, ordinal), cached per quarter hour of event time.

    The hot path asks once per event; a batch spans few quarter hours, and every UTC
    offset in use (also across DST changes, which happen on the hour or half hour) is a
    multiple of 15 minutes, so all events of one quarter hour share a local date."""

    def __init__(self, tz: ZoneInfo) -> None:
        self.tz = tz
        self._cache: dict[int, tuple[str, int]] = {}

    def __call__(self, event_ms: int) -> tuple[str, int]:
        slot = event_ms // _QUARTER_HOUR_MS
        found = self._cache.get(slot)
        if found is None:
            if len(self._cache) > 100_000:
                self._cache.clear()
            day = usage_date(event_ms, self.tz)
            found = self._cache[slot] = (day.isoformat(), day.toordinal())
        return found
