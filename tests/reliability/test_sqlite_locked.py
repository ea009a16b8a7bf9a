"""The summary DB locked by another process for 10 s while events flow (issue 10, item 4).

Another process (a business application, a careless ``sqlite3`` shell) holds SQLite's
write lock with ``BEGIN IMMEDIATE``. The worker must wait and retry (its busy timeout is
60 s), lose nothing, stay alive (``/health`` 200 throughout), and say why it is not
ready (``/ready`` 503 naming the locked DB) until the lock is released (200 again).
Totals are checked against the independent ground truth of ``tests/rollup``.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import orjson

from tests.harness import Stack, http_get, wait_for
from tests.rollup.test_rollup_e2e import actual, ground_truth, make_events, seed_rates

LOCK_SECONDS = 10.0

_HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
print("released", flush=True)
"""


def settled(stack: Stack, unique: int) -> bool:
    """Every unique event billed, and billed into usage_daily (days are closed)."""
    try:
        count = stack.billed_requests()
        committed = stack.records_committed()  # every record published here is unique
        (pending,) = stack.query("SELECT COUNT(*) FROM daily_pending")[0]
        (billed,) = stack.query("SELECT COALESCE(SUM(requests), 0) FROM usage_daily")[0]
    except Exception:  # noqa: BLE001 - DB not created yet
        return False
    return committed == count == unique and pending == 0 and billed == unique


def test_a_write_lock_held_by_another_process_delays_but_loses_nothing(stack: Stack) -> None:
    events = make_events(6_000, seed=41)
    seed_rates(stack)
    worker = stack.worker().start()
    worker.wait_assigned()
    stack.publish([orjson.dumps(event) for event in events[:2_000]])
    wait_for(lambda: settled(stack, 2_000), 90, "the first 2,000 events billed")
    assert http_get(worker.web + "/ready")[0] == 200

    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(stack.db_path), str(LOCK_SECONDS)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        locked_at = time.monotonic()
        # events keep flowing while the lock is held
        publisher = threading.Thread(
            target=stack.publish, args=([orjson.dumps(event) for event in events[2_000:]],)
        )
        publisher.start()
        health: list[int] = []
        ready: list[tuple[int, dict]] = []
        while holder.poll() is None and time.monotonic() - locked_at < LOCK_SECONDS - 1:
            health.append(http_get(worker.web + "/health")[0])
            code, body = http_get(worker.web + "/ready", timeout=10)
            ready.append((code, orjson.loads(body) if body else {}))
            time.sleep(0.5)
        publisher.join()
        assert holder.wait(30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()

    assert health and set(health) == {200}, health
    not_ready = [body for code, body in ready if code == 503]
    assert not_ready, f"/ready never said 503 during the lock: {ready}"
    reasons = " ".join(" ".join(body["reasons"]) for body in not_ready)
    assert str(stack.db_path) in reasons and "locked" in reasons, reasons

    # released: ready again, and every event billed exactly
    wait_for(lambda: http_get(worker.web + "/ready", timeout=10)[0] == 200, 30, "/ready 200")
    wait_for(lambda: settled(stack, len(events)), 120, "all events billed after the lock")
    assert actual(stack) == ground_truth(events)
    assert worker.alive()
    assert "Traceback" not in worker.log_path.read_text(errors="replace")
