"""When a usage date closes: event-time watermarks per partition, or the wall clock.

A date D closes at local midnight after D plus ``WINDOW_GRACE_SECONDS``, once either
- the event-time watermark (the lowest, over the partitions this worker has seen events
  on, of each partition's newest event time) passes it, or
- the wall clock passes it, so a quiet partition or key still closes its day (the
  classic pitfall of windowed stream processors, which only close on new events).

Usage dates are local calendar dates in ``BUSINESS_TIMEZONE`` (see streams.model.business_time).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import date
from zoneinfo import ZoneInfo

from streams.model.business_time import day_close_ms

__all__ = ["DayCloser", "wall_clock_ms"]


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class DayCloser:
    """Tracks watermarks and decides which dates are due. The clock is injectable.

    A worker has one, made by its wiring (agents/wiring.py): the summary writer feeds it
    the watermarks it applies, the rollup timer asks it which dates are due."""

    def __init__(
        self, tz: ZoneInfo, grace_seconds: int, clock: Callable[[], int] = wall_clock_ms
    ) -> None:
        self.tz = tz
        self.grace_seconds = grace_seconds
        self.clock = clock
        self._partition_max: dict[int, int] = {}
        #: True while the hot path reads full batches (it is catching up on a backlog)
        self.behind = False

    def observe(self, partition: int, event_ms: int) -> None:
        if event_ms > self._partition_max.get(partition, -1):
            self._partition_max[partition] = event_ms

    @property
    def watermark_ms(self) -> int | None:
        return min(self._partition_max.values()) if self._partition_max else None

    def close_ms(self, day: date) -> int:
        return day_close_ms(day, self.tz, self.grace_seconds)

    def is_due(self, day: date) -> bool:
        close = self.close_ms(day)
        watermark = self.watermark_ms
        return self.clock() >= close or (watermark is not None and watermark >= close)
