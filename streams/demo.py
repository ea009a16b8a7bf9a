"""Synthetic usage events for ``usage-stream dev --demo``: a few clients, users and models,
with retried duplicates and the occasional broken line, as a real gateway would send."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator

import orjson

MODELS = ("openai/gpt-4o-mini", "anthropic/claude-3.5-sonnet", "google/gemini-2.0-flash-001")


def demo_lines(rng: random.Random | None = None) -> Iterator[bytes]:
    """An endless stream of JSON lines: ~2% duplicates, ~1% invalid."""
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
                "timestamp": int(time.time() * 1000),
            }
        )
        recent = (recent + [line])[-100:]
        yield line
