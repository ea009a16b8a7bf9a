"""One summary writer per batch log (streams/kafka/writer_claim.py, agents/summary_writer/claim.py).

A second writer refuses to start with one line naming the first; a second process on the
same summary DB is refused by the DB's lock; a writer that stopped cleanly, or that was
killed and comes back with the same summary DB, takes the log back at once; a writer
frozen past its claim's expiry while another took over steps down when it wakes.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import orjson

from tests.harness import Stack, Worker, http_get, wait_for


def events(tag: str, count: int) -> tuple[list[bytes], list[bytes | None]]:
    now = int(time.time() * 1000)
    values = [
        orjson.dumps(
            {
                "request_id": f"{tag}-{i}",
                "client_org_id": "org-1",
                "user_id": f"user-{i % 5}",
                "model": "m",
                "input_tokens": 1,
                "output_tokens": 1,
                "cost_usd": "0.001",
                "timestamp": now - i,
            }
        )
        for i in range(count)
    ]
    return values, [f"{tag}-{i}".encode() for i in range(count)]


def refusal(worker: Worker) -> str:
    assert worker.process is not None
    assert worker.process.wait(timeout=90) != 0
    text = worker.log_path.read_text()
    assert "Traceback" not in text, text[-3000:]
    (line,) = [line for line in text.splitlines() if line.startswith("usage-stream: ")]
    return line


def test_a_second_writer_is_refused_and_the_first_bills_on(stack: Stack, tmp_path: Path) -> None:
    first = stack.worker(WORKER_ID="writer-a").start()
    first.wait_assigned()
    second = stack.worker(WORKER_ID="writer-b", DATA_DIR=str(tmp_path / "other")).start()
    line = refusal(second)
    assert "has another summary writer: writer-a" in line and "SUMMARY_WRITER=false" in line
    # a second process on the same summary DB (same host, same name) is refused by its lock
    same = stack.worker(WORKER_ID="writer-a").start()
    assert "is in use by another summary writer on this host" in refusal(same)
    stack.publish(*events("on", 50))
    wait_for(lambda: stack.billed_requests() == 50, 60, "the first writer billing")

    # a clean stop releases the claim: another writer may start at once
    assert first.stop() == 0
    other = stack.worker(WORKER_ID="writer-b", DATA_DIR=str(tmp_path / "other")).start()
    other.wait_assigned()
    assert other.alive()
    assert other.stop() == 0


def test_a_killed_writer_restarts_at_once_with_its_own_db(stack: Stack) -> None:
    first = stack.worker(WORKER_ID="writer-a").start()
    first.wait_assigned()
    first.kill()  # no release: the claim stays live for its expiry
    again = stack.worker(WORKER_ID="writer-a").start()
    again.wait_assigned()  # the same worker with the same summary DB: its own claim
    stack.publish(*events("back", 20))
    wait_for(lambda: stack.billed_requests() == 20, 60, "the restarted writer billing")
    assert again.stop() == 0


def test_a_writer_frozen_past_its_expiry_steps_down(stack: Stack, tmp_path: Path) -> None:
    frozen = stack.worker(WORKER_ID="writer-a").start()
    frozen.wait_assigned()
    assert frozen.process is not None
    os.kill(frozen.process.pid, signal.SIGSTOP)
    try:
        # refused while the frozen writer's claim is live: start it again until it runs
        deadline = time.monotonic() + 150
        while True:
            taker = stack.worker(WORKER_ID="writer-b", DATA_DIR=str(tmp_path / "b")).start()
            up = wait_for(
                lambda taker=taker: (not taker.alive()) or bool(taker.status()),
                90,
                "the second writer to start or be refused",
            )
            if up and taker.alive():
                break
            assert time.monotonic() < deadline, taker.log_tail()
            time.sleep(3)
    finally:
        os.kill(frozen.process.pid, signal.SIGCONT)

    def stepped_down() -> bytes:
        code, body = http_get(frozen.web + "/ready")
        return body if code == 503 and b"stepped down" in body else b""

    body = wait_for(stepped_down, 60, "the frozen writer to step down")
    assert b"writer-b" in body
    assert taker.stop() == 0
    frozen.kill()
