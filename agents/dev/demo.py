"""Synthetic usage events for ``usage-stream dev --demo``: a few clients, users and models,
with retried duplicates and the occasional broken line, as a real gateway would send.

Besides the live stream (event time = now) the demo backfills the last few local days
(:func:`backfill_lines`): today's date stays open until after midnight, so without
past-day events a new user would see no closed day, and no bill, until tomorrow. Past days
close by the wall clock within one rollup interval, so ``usage_daily`` fills at once.
"""

from __future__ import annotations

import functools
import random
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta
from datetime import time as clock_time
from itertools import islice
from zoneinfo import ZoneInfo

import orjson

__all__ = ["MODELS", "backfill_days", "backfill_lines", "demo_lines"]

MODELS = ("openai/gpt-4o-mini", "anthropic/claude-3.5-sonnet", "google/gemini-2.0-flash-001")


def _now_ms() -> int:
    return int(time.time() * 1000)


def demo_lines(
    rng: random.Random | None = None, timestamp: Callable[[], int] = _now_ms
) -> Iterator[bytes]:
    """An endless stream of JSON lines: ~2% duplicates, ~1% invalid.

    ``timestamp`` gives each new event's time in epoch ms (default: now)."""
    rng = rng or random.Random()
    recent: list[bytes] = []
    while True:
        roll = rng.random()
        if recent and roll < 0.02:
            yield rng.choice(recent)
            continue
        if roll < 0.03:
            yield b'{"request_id": "broken", "input_tokens": -1}'
            continue
        prompt, completion = rng.randint(10, 4000), rng.randint(1, 1500)
        line = orjson.dumps(
            {
                "request_id": f"gen-{uuid.UUID(int=rng.getrandbits(128)).hex}",
                "client_org_id": f"org-{rng.randint(1, 3)}",
                "user_id": f"user-{rng.randint(1, 10)}",
                "model": rng.choice(MODELS),
                "input_tokens": prompt,
                "output_tokens": completion,
                "cost_usd": f"{(prompt * 15 + completion * 60) / 1e8:.9f}",
                "timestamp": timestamp(),
            }
        )
        recent = (recent + [line])[-100:]
        yield line


def backfill_days(tz: ZoneInfo, days: int, today: date | None = None) -> list[date]:
    """The ``days`` local dates before today, oldest first."""
    today = today or datetime.now(tz).date()
    return [today - timedelta(days=back) for back in range(days, 0, -1)]


def _day_span_ms(day: date, tz: ZoneInfo) -> tuple[int, int]:
    """[local midnight, next local midnight) in epoch ms: 23 or 25 hours on DST days."""
    start = datetime.combine(day, clock_time(0), tz)
    end = datetime.combine(day + timedelta(days=1), clock_time(0), tz)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def backfill_lines(
    tz: ZoneInfo,
    days: int,
    per_day: int,
    rng: random.Random | None = None,
    today: date | None = None,
) -> Iterator[bytes]:
    """About ``per_day`` events at random times of each of the ``days`` local dates before
    today (the same mix of duplicates and broken lines as the live stream), oldest first."""
    rng = rng or random.Random()
    for day in backfill_days(tz, days, today):
        start, end = _day_span_ms(day, tz)
        yield from islice(demo_lines(rng, functools.partial(rng.randrange, start, end)), per_day)
