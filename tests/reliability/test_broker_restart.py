"""The broker process dies mid-run and comes back (issue 10, item 6: a real restart).

``test_broker_outage.py`` freezes the broker (SIGSTOP), which keeps Tansu's in-memory
data. A real restart needs storage that outlives the process: this Tansu build compiles in
only ``memory://`` and ``s3://``, so the broker here runs on ``s3://tansu/`` against
moto's standalone S3 server (a test extra; a missing moto must FAIL this test, never skip
it, so the restart guarantee cannot silently go untested).

Under load (events with duplicate copies on other partitions, published in chunks by a
producer that keeps retrying through the outage), the broker is stopped twice and started
again on the same port and storage after a few seconds:

1. ``SIGKILL``: a crash, nothing flushed or closed by the broker;
2. ``SIGTERM``: an orderly stop, as a deploy or a host reboot does it.

Expected: the same worker process rides both out (same PID, no crash or restart loop, no
traceback in its log), ``/ready`` is 503 while the broker is down and 200 after, and in
the end every unique request is billed exactly once (and its raw point written) and the
daily bills equal the independent Decimal ground truth of
``tests/rollup/test_rollup_e2e.py``. The topic read from offset 0 afterwards still holds
every published request: that is what makes this a restart test and not a fresh broker
(run on ``memory://`` instead, it fails: the bills never settle).

Measured here (2 cores): ~40 s in all, of which ~13 s are the worker's two group joins;
Tansu on S3 answers at once after a restart (``/ready`` 200 within the first 0.5 s poll,
billing growing again within ~1 s); Tansu takes ~5 s to exit on SIGTERM. While the
broker refuses connections, aiokafka retries reconnects and metadata ~150 times a second
and logs each at ERROR; the worker summarises repeated client lines
(``streams/log_throttle.py``), so the whole log of an outage stays short.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import random
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from agents.web.health import PROBE_TIMEOUT_SECONDS
from agents.web.readiness import PROBE_SECONDS
from streams.kafka.broker import EmbeddedBroker, die_with_parent, free_port, stop_process
from tests.harness import Stack, Worker, consume_all, http_get, point_request_id, wait_for
from tests.reliability.test_broker_outage import stack_env
from tests.reliability.waits import billed, billed_count
from tests.rollup.test_rollup_e2e import actual, ground_truth, make_events, seed_rates

DOWN_SECONDS = 6.0  # how long the broker stays dead (no process) each time
UNIQUE = 8_000
COPIES = 2_000  # duplicates of earlier requests, on other partitions
CHUNK = 500
CHUNK_PAUSE = 0.4  # spreads publishing over both outages


class MotoS3:
    """moto's standalone S3 server on a free port, with Tansu's bucket created.

    Its state lives in the moto process, so it outlives every broker restart; the child
    gets ``die_with_parent`` so a crashed test run orphans nothing."""

    BUCKET = "tansu"

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def broker_env(self) -> dict[str, str]:
        """What Tansu's ``s3://`` engine reads (object_store's AWS settings)."""
        return {
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "eu-west-2",
            "AWS_ALLOW_HTTP": "true",
        }

    def start(self, timeout: float = 30.0) -> MotoS3:
        # fail loudly: the suite installs moto[server] (test extra); a skip would hide
        # that the broker restart guarantee went untested
        assert importlib.util.find_spec("moto.server") is not None, (
            "moto[server] is not installed: the broker restart test needs its S3 server"
        )
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )

        def bucket_created() -> bool:
            assert self.process is not None and self.process.poll() is None, (
                f"moto server exited: {self.log_path.read_text(errors='replace')[-2000:]}"
            )
            request = urllib.request.Request(f"{self.endpoint}/{self.BUCKET}", method="PUT")
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    return response.status == 200
            except OSError:  # not listening yet
                return False

        wait_for(bucket_created, timeout, "moto's S3 server and the tansu bucket", step=0.2)
        return self

    def stop(self) -> None:
        process, self.process = self.process, None
        stop_process(process)


@pytest.fixture
def s3_stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack on its own broker backed by its own S3 server; all killed at the end."""
    s3 = MotoS3(tmp_path / "moto.log")
    broker: EmbeddedBroker | None = None
    created: Stack | None = None
    try:
        s3.start()
        broker = EmbeddedBroker(
            log_path=tmp_path / "tansu.log", storage=f"s3://{MotoS3.BUCKET}/", env=s3.broker_env()
        ).start()
        created = Stack(broker, tmp_path, stack_env(broker, tmp_path, f"restart-{os.getpid()}"))
        yield created
    finally:
        if created is not None:
            for worker in created.workers:
                if worker.alive():
                    worker.kill()
        if broker is not None:
            broker.stop()
        s3.stop()


async def publish_through(
    port: int,
    topic: str,
    values: list[bytes],
    partitions: list[int],
    held_back: threading.Event | None = None,
) -> None:
    """Publish in chunks with pauses, riding out broker restarts: a long request timeout
    keeps batches queued while nothing listens, and retries resend them afterwards (a
    retried send may duplicate a record: the pipeline must drop the copy). The last
    quarter of the values waits for ``held_back`` (when given), so that some of the load
    is certainly sent into the last outage, whatever the worker's pace before it."""
    producer = AIOKafkaProducer(
        bootstrap_servers=f"127.0.0.1:{port}",
        linger_ms=5,
        request_timeout_ms=120_000,
        retry_backoff_ms=500,
    )
    await producer.start()
    try:
        for start in range(0, len(values), CHUNK):
            if held_back is not None and start >= len(values) * 3 // 4:
                await asyncio.to_thread(held_back.wait, 300)
            futures = [
                await producer.send(topic, values[index], partition=partitions[index])
                for index in range(start, min(start + CHUNK, len(values)))
            ]
            await asyncio.gather(*futures)
            await asyncio.sleep(CHUNK_PAUSE)
    finally:
        await producer.stop()


def log_lines(worker: Worker) -> list[str]:
    return worker.log_path.read_text(errors="replace").splitlines()


def restart_broker(
    stack: Stack,
    worker: Worker,
    publisher: threading.Thread,
    stop: Callable[[], None],
    how: str,
) -> dict[str, Any]:
    """Stop the broker with ``stop``, keep it down ``DOWN_SECONDS`` while probing the
    worker, start it again on the same port and storage, and wait for ``/ready`` 200 and
    for billing to grow again (the producer is still sending).

    Returns what was observed, for the assertions and the timing report."""
    log_before = len(log_lines(worker))
    billed_at_stop = billed_count(stack)
    stopped_at = time.monotonic()
    stop()
    gone_at = time.monotonic()  # Tansu takes ~5 s to exit on SIGTERM
    assert stack.broker.pid is None
    ready: list[tuple[int, bytes]] = []
    health: list[int] = []
    while time.monotonic() - gone_at < DOWN_SECONDS:
        answer = http_get(worker.web + "/ready", timeout=10)
        # /ready answers from a background probe (agents/web/readiness.py): it may say 200
        # until the next probe has failed
        if time.monotonic() - gone_at > PROBE_SECONDS + PROBE_TIMEOUT_SECONDS:
            ready.append(answer)
        health.append(http_get(worker.web + "/health", timeout=10)[0])
        assert worker.alive(), f"worker died with the broker ({how}); log:\n{worker.log_tail()}"
        time.sleep(0.5)
    producing = publisher.is_alive()
    stack.broker.start()
    started_at = time.monotonic()
    billed_at_start = billed_count(stack)
    wait_for(
        lambda: http_get(worker.web + "/ready", timeout=10)[0] == 200,
        60,
        f"/ready 200 after the {how} restart",
        step=0.5,
    )
    ready_at = time.monotonic()
    wait_for(
        lambda: billed_count(stack) > billed_at_start,
        60,
        f"billing to grow after the {how} restart",
        step=0.5,
    )
    return {
        "how": how,
        "billed_at_stop": billed_at_stop,
        "producing_at_restart": producing,
        "ready": ready,
        "health": health,
        "log": log_lines(worker)[log_before:],
        "stop_took_s": gone_at - stopped_at,
        "down_s": started_at - stopped_at,
        "ready_after_s": ready_at - started_at,
        "progress_after_s": time.monotonic() - started_at,
    }


def test_broker_killed_and_terminated_mid_run_on_s3_storage(
    s3_stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    began = time.monotonic()
    stack = s3_stack
    events = make_events(UNIQUE, seed=67)
    rng = random.Random(68)
    copies = [dict(event) for event in rng.sample(events, COPIES)]
    values = [orjson.dumps(event) for event in events + copies]
    rng.shuffle(values)
    # random partitions: a copy mostly lands on another partition than its original
    partitions = [rng.randrange(4) for _ in values]

    seed_rates(stack)
    worker = stack.worker().start()
    worker.wait_ready()
    assert worker.process is not None
    pid = worker.process.pid
    joined_at = time.monotonic()

    failure: list[BaseException] = []
    last_outage = threading.Event()

    def produce() -> None:
        try:
            asyncio.run(
                publish_through(stack.broker.port, stack.topic, values, partitions, last_outage)
            )
        except BaseException as error:  # noqa: BLE001 - reported by the test
            failure.append(error)

    publisher = threading.Thread(target=produce, daemon=True)
    publisher.start()
    wait_for(lambda: billed_count(stack) >= 1_000, 60, "the worker to be busy", step=0.2)
    crash = restart_broker(stack, worker, publisher, stack.broker.kill, "SIGKILL")

    def terminate() -> None:
        stack.broker.stop()
        last_outage.set()  # the rest of the load goes out while the broker is down

    orderly = restart_broker(stack, worker, publisher, terminate, "SIGTERM")

    publisher.join(120)
    assert not publisher.is_alive(), "the producer did not finish within 120 s"
    assert not failure, failure
    published_at = time.monotonic()
    wait_for(lambda: billed(stack, UNIQUE), 120, f"{UNIQUE} unique events billed", step=0.5)
    settled_at = time.monotonic()

    unique_ids = {event["request_id"] for event in events}
    for observed in (crash, orderly):
        how = observed["how"]
        assert observed["billed_at_stop"] < UNIQUE, f"{how}: the restart came after the load"
        assert observed["producing_at_restart"], f"{how}: the producer finished before it"
        # the worker's own HTTP server never stops answering
        assert set(observed["health"]) == {200}, (how, observed["health"])
        # a dead broker refuses connections at once: /ready is 503 from the next probe
        ready = observed["ready"]
        assert ready and all(code == 503 for code, _ in ready), (how, ready)
        assert all(b"broker" in body for _, body in ready), (how, ready[-1])
        # our own lines about it are few, and nothing is logged per message
        ours = [line for line in observed["log"] if "hot path:" in line]
        assert len(ours) <= 6, "\n".join(ours)
        # and the Kafka client's retries are summarised, not one line each (~1,000 before)
        assert len(observed["log"]) <= 150, "\n".join(observed["log"][-80:])
        assert not any("req-67-" in line for line in observed["log"]), how

    # the broker kept what it had before the crash: the topic from offset 0 holds every
    # published request (retried sends may add copies)
    records = asyncio.run(consume_all(stack.broker, stack.topic, len(values), timeout=30))
    assert len(records) >= len(values)
    assert {orjson.loads(record.value)["request_id"] for record in records} == unique_ids

    # every unique request billed once (``billed`` above) and written as one raw point
    # (identical lines of a retried append are that same point), bills exact against the
    # ground truth
    points = stack.raw_points()
    ids = [point_request_id(line) for line in points]
    assert len(ids) == len(set(ids)) == UNIQUE
    assert set(ids) == unique_ids
    assert stack.billed_requests() == UNIQUE
    assert actual(stack) == ground_truth(events)
    assert worker.metrics().get("usage_stream_events_invalid_total", 0) == 0

    # the same process throughout, no restart loop, no traceback
    assert worker.alive() and worker.process.pid == pid
    log = worker.log_path.read_text(errors="replace")
    assert "Traceback" not in log, worker.log_tail(120)

    with capsys.disabled():
        print(
            f"\nbroker restart on S3: worker joined {joined_at - began:.1f}s; "
            + "; ".join(
                f"{o['how']}: stop {o['stop_took_s']:.1f}s, down {o['down_s']:.1f}s, "
                f"/ready 200 {o['ready_after_s']:.1f}s and billing growing "
                f"{o['progress_after_s']:.1f}s after start, {len(o['log'])} worker log lines"
                for o in (crash, orderly)
            )
            + f"; published {published_at - began:.1f}s, settled {settled_at - began:.1f}s,"
            f" total {time.monotonic() - began:.1f}s"
        )
