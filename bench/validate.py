"""Events/s of ``streams.model.event.parse_event`` in a tight loop, against the JSON parsers alone.

    .venv/bin/python bench/validate.py [EVENTS] [--module PATH]   (default 50000)

Validation is the hot path's first cost after the framework, so this times it on its own:
the same pre-encoded events, several shapes (float or string cost, RFC 3339 or epoch-ms
timestamp, with or without unknown extra fields, a share of invalid ones). Each number is
the best of several rounds timed in *process CPU time*: on a shared machine a round's wall
time also counts the time other processes held the CPU, CPU time does not. ``--module`` times
another copy of the module (e.g. the previous version saved to a file) in the same run.
Prints events/s; no pass/fail.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import msgspec
import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NOW_MS = 1_795_169_472_123  # 2026-11-20T10:11:12.123Z
ROUNDS = 9


def events(count: int, *, iso: bool, string_cost: bool, extra: bool) -> list[bytes]:
    """Producer-like events: distinct ids, a few orgs/users, realistic token counts."""
    rng = random.Random(1)
    out = []
    for i in range(count):
        event_ms = NOW_MS - rng.randrange(3 * 86_400_000)
        body: dict[str, object] = {
            "request_id": f"gen-{rng.getrandbits(64):016x}-{i}",
            "client_org_id": f"org-{rng.randrange(50)}",
            "user_id": f"user-{rng.randrange(500)}",
            "model": "openai/gpt-4o-mini",
            "input_tokens": rng.randrange(5000),
            "output_tokens": rng.randrange(2000),
            "cost_usd": (
                f"0.{rng.randrange(10**9):09d}" if string_cost else rng.randrange(10**7) / 1e9
            ),
            "timestamp": (
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event_ms // 1000))
                + f".{event_ms % 1000:03d}Z"
                if iso
                else event_ms
            ),
        }
        if extra:
            body["provider"] = {"name": "openai", "latency_ms": rng.randrange(5000)}
            body["total_tokens"] = body["input_tokens"] + body["output_tokens"]  # type: ignore[operator]
        out.append(orjson.dumps(body))
    return out


def invalid_mix(valid: list[bytes]) -> list[bytes]:
    """One event in ten broken in a different way (the dead-letter path's cost)."""
    broken = [
        b"not json",
        b"[1, 2]",
        b'{"request_id": "x"}',
        orjson.dumps({**orjson.loads(valid[0]), "input_tokens": -1}),
        orjson.dumps({**orjson.loads(valid[0]), "timestamp": "yesterday"}),
    ]
    return [broken[i // 10 % len(broken)] if i % 10 == 0 else v for i, v in enumerate(valid)]


def rate(loop: Callable[[], object], count: int) -> float:
    """Best events/s over ROUNDS runs of ``loop`` (which handles ``count`` events)."""
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.process_time()
        loop()
        best = min(best, time.process_time() - start)
    return count / best


def show(name: str, per_s: float) -> None:
    print(f"{name:<40}{per_s:>12,.0f}/s")


def load(path: str | None) -> ModuleType:
    if path is None:
        import streams.model.event

        return streams.model.event
    spec = importlib.util.spec_from_file_location("event_under_test", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while decorating
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("count", nargs="?", type=int, default=50_000)
    parser.add_argument("--module", help="path of another event.py to time instead")
    args = parser.parse_args()
    module = load(args.module)
    parse_event = module.parse_event
    count = args.count

    shapes = {
        "float cost, RFC 3339 ts": events(count, iso=True, string_cost=False, extra=False),
        "string cost, epoch-ms ts": events(count, iso=False, string_cost=True, extra=False),
        "float cost, epoch-ms ts": events(count, iso=False, string_cost=False, extra=False),
        "extra fields + total_tokens": events(count, iso=True, string_cost=True, extra=True),
    }
    shapes["10% invalid (epoch-ms)"] = invalid_mix(shapes["string cost, epoch-ms ts"])
    for name, values in shapes.items():
        if "invalid" in name:
            continue
        bad = [v for v in values if not hasattr(parse_event(v, NOW_MS), "request_id")]
        assert not bad, f"{name}: bench events must be valid, got {parse_event(bad[0], NOW_MS)}"

    print(f"module: {module.__file__}   events per round: {count}, best of {ROUNDS} (CPU time)")
    sample = shapes["float cost, RFC 3339 ts"]
    show("orjson.loads alone", rate(lambda: [orjson.loads(v) for v in sample], count))
    untyped = msgspec.json.Decoder().decode
    show("msgspec.json untyped decode alone", rate(lambda: [untyped(v) for v in sample], count))
    for name, values in shapes.items():
        per_s = rate(lambda values=values: [parse_event(v, NOW_MS) for v in values], count)
        show(f"parse_event: {name}", per_s)
    batch = getattr(module, "parse_events", None)
    if batch is not None:
        show("parse_events: float cost, RFC 3339 ts", rate(lambda: batch(sample, NOW_MS), count))


if __name__ == "__main__":
    main()
