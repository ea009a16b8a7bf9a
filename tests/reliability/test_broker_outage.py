"""The broker frozen for 30 s under load (issue 10, item 6).

``SIGSTOP`` on the broker process is a network-partition stand-in that keeps Tansu's
in-memory data: the kernel still completes TCP handshakes from the listen backlog, but
nothing answers. That is exactly the case a TCP-connect readiness probe gets wrong, so
``/ready`` must be 503 while frozen and 200 again after ``SIGCONT``.

The test uses its OWN broker (the session broker is shared by every test) and keeps a
producer publishing through the freeze (its requests hang and complete afterwards).
Expected: the same worker process rides it out (no crash, no restart loop, no traceback),
it logs the outage in a handful of lines (not one per message or per retry), ``/health``
stays 200, and the bills are exact against the independent ground truth.

A broker *restart* (rather than a freeze) needs persistent storage: see
tests/reliability/test_broker_restart.py (Tansu on ``s3://`` storage served by moto).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from streams.kafka.broker import EmbeddedBroker, free_port
from tests.harness import Stack, http_get, wait_for
from tests.reliability.waits import billed, billed_count
from tests.rollup.test_rollup_e2e import actual, ground_truth, make_events, seed_rates

FREEZE_SECONDS = 30.0


def stack_env(broker: EmbeddedBroker, root: Path, name: str) -> dict[str, str]:
    """The environment tests/conftest.py's ``stack`` fixture builds, on ``broker``."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("INFLUXDB_", "KAFKA_"))},
        "APP_ID": f"usage-stream-{name}",
        "KAFKA_BROKER": broker.url,
        "USAGE_TOPIC": f"usage-events-{name}",
        "USAGE_TOPIC_PARTITIONS": "4",
        "DATA_DIR": str(root / "data"),
        "WEB_PORT": str(free_port()),
        "KAFKA_SESSION_TIMEOUT_SECONDS": "10",
        "KAFKA_REBALANCE_TIMEOUT_SECONDS": "10",
        "KAFKA_HEARTBEAT_INTERVAL_SECONDS": "1",
        "ROLLUP_INTERVAL_SECONDS": "0.5",
        "RECOVERY_CONSISTENCY_CHECK": "false",
        "KAFKA_STATIC_MEMBERSHIP": "false",  # wedges Tansu groups (streams/settings.py)
        "RAW_BATCH_SECONDS": "0.2",
        "NBP_API_URL": "http://127.0.0.1:9/api",
        "OPENROUTER_API_URL": "http://127.0.0.1:9/api/v1",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack on a broker of its own, so freezing it disturbs no other test."""
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
    created = Stack(broker, tmp_path, stack_env(broker, tmp_path, f"outage-{os.getpid()}"))
    try:
        yield created
    finally:
        for worker in created.workers:
            if worker.alive():
                worker.kill()
        process = broker._process
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
        broker.stop()


async def publish_through(broker: EmbeddedBroker, topic: str, values: list[bytes]) -> None:
    """Publish in chunks with pauses, riding out a freeze: generous request timeout, and
    retries (a retried send may duplicate a record: the pipeline must drop the copy)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=f"127.0.0.1:{broker.port}",
        linger_ms=5,
        request_timeout_ms=120_000,
        retry_backoff_ms=500,
    )
    await producer.start()
    try:
        for start in range(0, len(values), 2_000):
            futures = [
                await producer.send(topic, value, key=orjson.loads(value)["request_id"].encode())
                for value in values[start : start + 2_000]
            ]
            await asyncio.gather(*futures)
            await asyncio.sleep(0.3)
    finally:
        await producer.stop()


def test_broker_frozen_30s_under_load_is_ridden_out(own_stack: Stack) -> None:
    stack = own_stack
    events = make_events(40_000, seed=61)
    seed_rates(stack)
    worker = stack.worker().start()
    worker.wait_assigned()
    pid = worker.process.pid if worker.process else None
    wait_for(lambda: http_get(worker.web + "/ready", timeout=10)[0] == 200, 30, "/ready 200")

    values = [orjson.dumps(event) for event in events]
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            asyncio.run(publish_through(stack.broker, stack.topic, values))
        except BaseException as error:  # noqa: BLE001 - reported by the test
            failure.append(error)

    publisher = threading.Thread(target=produce)
    publisher.start()
    wait_for(lambda: billed_count(stack) >= 2_000, 60, "the worker to be busy")
    broker_process = stack.broker._process
    assert broker_process is not None
    log_before = len(worker.log_path.read_text(errors="replace").splitlines())
    os.kill(broker_process.pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    billed_at_freeze = stack.billed_requests()
    try:
        health: list[int] = []
        ready: list[tuple[int, bytes]] = []
        while time.monotonic() - frozen_at < FREEZE_SECONDS:
            health.append(http_get(worker.web + "/health")[0])
            ready.append(http_get(worker.web + "/ready", timeout=10))
            time.sleep(1.0)
    finally:
        os.kill(broker_process.pid, signal.SIGCONT)
    log_during = worker.log_path.read_text(errors="replace").splitlines()[log_before:]

    assert billed_at_freeze < len(events), "the freeze came after the load"
    assert set(health) == {200}, health
    # after the first probes: a check times out after 2 s and runs every second
    frozen_ready = [(code, body) for code, body in ready[4:]]
    assert frozen_ready and all(code == 503 for code, _ in frozen_ready), ready
    assert all(b"does not answer" in body for _, body in frozen_ready), frozen_ready[-1]

    wait_for(lambda: http_get(worker.web + "/ready", timeout=10)[0] == 200, 60, "/ready 200")
    publisher.join(180)
    assert not publisher.is_alive() and not failure, failure
    wait_for(lambda: billed(stack, len(events)), 180, "every event billed", step=1.0)
    assert actual(stack) == ground_truth(events)

    # the same process throughout, and a handful of log lines about the outage
    assert worker.alive() and worker.process is not None and worker.process.pid == pid
    log = worker.log_path.read_text(errors="replace")
    assert "Traceback" not in log
    ours = [line for line in log_during if "hot path:" in line]
    assert len(ours) <= 6, "\n".join(ours)
    # aiokafka's own lines are per request (heartbeats, fetches, /ready probes), never
    # per message: 30 polls of /ready and a 1 s heartbeat bound them
    assert len(log_during) <= 200, "\n".join(log_during[-40:])
