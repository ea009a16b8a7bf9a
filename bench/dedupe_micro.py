"""The hot path's dedupe step alone, per event, before and after the numpy seen set.

    .venv/bin/python bench/dedupe_micro.py [--tracked 1000000 5000000] [--batch 5000]
                                           [--before COMMIT]

A home partition tracking N ids in 8 time buckets (the default retention's), batches of
``--batch`` events of which half are new and half copies of tracked ids (the worst case
for the old sets: a new id is looked for in every bucket). Measures, per event:

* **before**: ``tables/dedupe/seen_requests.py`` of ``--before`` (default: the commit before
  this module's, read with ``git show``), and the dedupe loop of ``HotPath.prepare`` as
  it was then (``compact`` and a set lookup per bucket, per event);
* **after**: :func:`agents.hot_path.dedupe.judge` (keys, billing fingerprints, the vectorised
  lookup, the verdicts) and the ``add_keys`` of a committed batch.

Memory per tracked id is measured the same way for both (tracemalloc of the state).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agents.hot_path.dedupe import NO_FENCE, judge, ranks  # noqa: E402
from streams.model.event import UsageEvent  # noqa: E402
from streams.model.fingerprint import billing_fingerprints  # noqa: E402
from tables.dedupe.seen_requests import Keys, SeenRequests  # noqa: E402

DAY = 86_400_000
TTL = 7 * DAY


def _events(ids: list[str]) -> list[UsageEvent]:
    return [
        UsageEvent(rid, f"org-{i % 50}", f"user-{i % 977}", "m", 100 + i % 1000, 10, 123, 0)
        for i, rid in enumerate(ids)
    ]


def _old_module(commit: str):
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{commit}:tables/dedupe/seen_requests.py"],
        capture_output=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "old_seen_requests.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("old_seen_requests", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed(work, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


def before(commit: str, tracked: list[str], batch: list[str], repeat: int) -> dict:
    old = _old_module(commit)
    tracemalloc.start()
    seen = old.SeenRequests(TTL)
    for bucket in range(8):
        seen.add(tracked[bucket::8], bucket * TTL // 8)
    memory = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    compact = old.compact

    def loop() -> None:
        sets = seen.sets()
        candidates: dict = {}
        for rid in batch:
            key = compact(rid)
            if key in candidates:
                continue
            for ids in sets:
                if key in ids:
                    break
            else:
                candidates[key] = rid

    seconds = _timed(loop, repeat)
    return {
        "dedupe_ns_per_event": round(seconds / len(batch) * 1e9),
        "memory_bytes_per_id": round(memory / len(tracked), 1),
    }


def after(tracked: list[str], batch: list[str], repeat: int) -> dict:
    tracemalloc.start()
    seen = SeenRequests(TTL)
    fps = billing_fingerprints(_events(tracked))
    for bucket in range(8):
        keys = Keys.of(tracked[bucket::8], fps[bucket::8])
        for start in range(0, len(keys), 5_000):  # as committed batches would add them
            part = np.arange(start, min(start + 5_000, len(keys)))
            seen.add_keys(keys.take(part), bucket * TTL // 8)
    del fps, keys
    events = _events(batch)
    rank = ranks(
        np.zeros(len(batch), dtype=np.int64),
        np.zeros(len(batch), dtype=bool),
        np.arange(len(batch), dtype=np.int64),
        (NO_FENCE, NO_FENCE),
    )
    seconds = _timed(lambda: judge(events, rank, seen), repeat)
    memory = tracemalloc.get_traced_memory()[0]  # (with the bitmaps the lookups made)
    tracemalloc.stop()
    verdicts = judge(events, rank, seen)
    assert len(verdicts.new) == len(batch) // 2, len(verdicts.new)
    add = _timed(lambda: SeenRequests(TTL).add_keys(verdicts.new_keys, 0), repeat)
    keys = _timed(lambda: Keys.of(batch), repeat)
    fingerprints = _timed(lambda: billing_fingerprints(events), repeat)
    return {
        "dedupe_ns_per_event": round(seconds / len(batch) * 1e9),
        "of_which_keys_ns": round(keys / len(batch) * 1e9),
        "of_which_fingerprints_ns": round(fingerprints / len(batch) * 1e9),
        "add_committed_ns_per_new_id": round(add / len(verdicts.new) * 1e9),
        "runs_searched": len(seen.runs()),
        "memory_bytes_per_id": round(memory / len(tracked), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracked", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--before", default="dcdf342")
    args = parser.parse_args()
    for count in args.tracked:
        tracked = [str(uuid.uuid4()) for _ in range(count)]
        half = args.batch // 2
        rng = np.random.default_rng(7)
        batch = [str(uuid.uuid4()) for _ in range(half)] + [
            tracked[i] for i in rng.choice(count, half, replace=False).tolist()
        ]
        result = {
            "tracked": count,
            "batch": args.batch,
            "before": before(args.before, tracked, batch, args.repeat),
            "after": after(tracked, batch, args.repeat),
        }
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
