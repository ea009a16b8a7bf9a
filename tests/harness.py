"""Test harness: ``usage-stream worker`` processes, an isolated stack per test, Kafka I/O."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import itertools
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from streams.kafka.broker import EmbeddedBroker, free_port

REPO = Path(__file__).resolve().parents[1]
_ids = itertools.count(1)


def wait_for(predicate: Callable[[], object], timeout: float, what: str, step: float = 0.2):
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def event_ms(event: dict) -> int:
    """A test event's time in epoch ms, from either timestamp form the contract allows."""
    stamp = event["timestamp"]
    if isinstance(stamp, int):
        return stamp
    return int(datetime.fromisoformat(stamp).timestamp() * 1000)


def point_request_id(line: str) -> str:
    """The ``request_id`` field of a raw point (line protocol, as the tests' ids need no
    escaping)."""
    return line.rsplit('request_id="', 1)[1].split('"', 1)[0]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (urllib.error.URLError, OSError):  # not listening (yet)
        return 0, b""


@dataclass
class Worker:
    """One ``usage-stream worker`` child process."""

    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def web(self) -> str:
        return f"http://127.0.0.1:{self.env['WEB_PORT']}"

    def start(self) -> Worker:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agents", "worker", "--loglevel", "info"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def status(self) -> dict:
        code, body = http_get(self.web + "/status")
        return orjson.loads(body) if code == 200 else {}

    def wait_assigned(self, timeout: float = 90.0) -> list[int]:
        def assigned() -> list[int]:
            if not self.alive():
                raise AssertionError(f"worker died; log:\n{self.log_tail()}")
            try:
                return self.status().get("assigned_partitions", [])
            except OSError:
                return []

        return wait_for(assigned, timeout, "the worker to be assigned partitions", 0.5)

    def wait_ready(self, timeout: float = 90.0) -> dict:
        """Until ``/ready`` answers 200 (phase ``consuming``); returns its JSON."""

        def ready() -> dict:
            if not self.alive():
                raise AssertionError(f"worker died; log:\n{self.log_tail()}")
            code, body = http_get(self.web + "/ready")
            return orjson.loads(body) if code == 200 else {}

        return wait_for(ready, timeout, "/ready 200", 0.2)

    def metrics(self) -> dict[str, float]:
        """Flat ``name{label=value,...}`` → value of the worker's /metrics."""
        code, body = http_get(self.web + "/metrics")
        assert code == 200, body
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return values

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait: a clean stop."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Stack:
    """One test's isolated pipeline: topic, group, data dir, and its workers."""

    broker: EmbeddedBroker
    root: Path
    env: dict[str, str]
    workers: list[Worker] = field(default_factory=list)

    @property
    def topic(self) -> str:
        return self.env["USAGE_TOPIC"]

    @property
    def db_path(self) -> Path:
        return Path(self.env["DATA_DIR"]) / "usage.db"

    def worker(self, **overrides: str) -> Worker:
        """A new worker process (not started) sharing this stack's topic, group and DB."""
        index = len(self.workers)
        env = {**self.env, "WEB_PORT": str(free_port()), **overrides}
        if "WORKER_ID" not in overrides:
            # a worker's name is its place: the same DATA_DIR and role is the same worker
            # come back (a restart keeps its static group membership and, as the summary
            # writer, its claim); two workers running at once need two places
            role = "writer" if env.get("SUMMARY_WRITER", "true") != "false" else "worker"
            place = hashlib.sha1(env["DATA_DIR"].encode()).hexdigest()[:8]
            env["WORKER_ID"] = f"{role}-{place}"
        worker = Worker(env, self.root / f"worker-{index}.log")
        self.workers.append(worker)
        return worker

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        conn = sqlite3.connect(self.db_path, timeout=30)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def billed_requests(self) -> int:
        """Unique requests billed so far, closed days and open ones, in one snapshot.

        Replaces ``COUNT(*) FROM ledger`` (per-event rows are no longer written): the
        summary writer folds each batch's requests into ``daily_pending`` and the rollup
        moves them into ``usage_daily`` in one transaction, so the sum never counts a
        request twice or loses one in between."""
        ((total,),) = self.query(
            "SELECT (SELECT COALESCE(SUM(requests), 0) FROM usage_daily)"
            " + (SELECT COALESCE(SUM(requests), 0) FROM daily_pending)"
        )
        return int(total)

    def records_committed(self) -> int:
        """Usage-topic records read and committed (every partition): the chain heads'
        ``usage_next`` the summary writer stored (was ``SUM(next_offset) FROM
        source_offsets``)."""
        ((total,),) = self.query("SELECT COALESCE(SUM(usage_next), 0) FROM batch_log_heads")
        return int(total)

    def raw_points(self) -> list[str]:
        """The file raw sink's distinct points (``DATA_DIR/raw``, ``.lp`` and gzipped
        ``.lp.gz``): a redelivered or retried batch appends identical lines again, the
        same point on import, so distinct lines are what was written."""
        raw = Path(self.env["DATA_DIR"]) / "raw"
        lines: set[str] = set()
        for path in raw.glob("usage_tracking-*.lp*"):
            if path.name.endswith(".lp"):
                text = path.read_text()
            elif path.name.endswith(".lp.gz"):
                text = gzip.decompress(path.read_bytes()).decode()
            else:
                continue
            lines.update(line for line in text.splitlines() if line and not line.startswith("#"))
        return sorted(lines)

    def publish(
        self,
        values: list[bytes],
        keys: list[bytes | None] | None = None,
        partitions: list[int | None] | None = None,
        topic: str | None = None,
    ) -> None:
        asyncio.run(produce(self.broker, topic or self.topic, values, keys, partitions))

    def cli(
        self, *args: str, input: bytes | None = None, timeout: float = 120, **env: str
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "agents", *args],
            env={**self.env, **env},
            input=input,
            capture_output=True,
            timeout=timeout,
            cwd=REPO,
        )


async def produce(
    broker: EmbeddedBroker,
    topic: str,
    values: list[bytes],
    keys: list[bytes | None] | None = None,
    partitions: list[int | None] | None = None,
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{broker.port}", linger_ms=5)
    await producer.start()
    try:
        futures = []
        for index, value in enumerate(values):
            key = keys[index] if keys else None
            partition = partitions[index] if partitions else None
            futures.append(await producer.send(topic, value, key=key, partition=partition))
        for future in futures:
            await future
    finally:
        await producer.stop()


async def consume_all(
    broker: EmbeddedBroker, topic: str, expected: int, timeout: float = 60.0
) -> list:
    """Read ``expected`` records of ``topic`` from the beginning (no group)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=f"127.0.0.1:{broker.port}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    records: list = []
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        await consumer.seek_to_beginning()
        deadline = time.monotonic() + timeout
        while len(records) < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for tp_records in batch.values():
                records.extend(tp_records)
        # a little longer, to catch records beyond the expected count
        for tp_records in (await consumer.getmany(timeout_ms=1000)).values():
            records.extend(tp_records)
    finally:
        await consumer.stop()
    return records


#: one batch of live traffic: its events, and its records (value, key, partition or None)
Batch = tuple[list[dict], list[tuple[bytes, bytes | None, int | None]]]


def live_traffic(
    broker: EmbeddedBroker,
    topic: str,
    batch: Callable[[int], Batch],
    stop: threading.Event,
    published: list[dict],
) -> threading.Thread:
    """Producers that keep working: in a thread, ``batch(n)``'s records for n = 0, 1, ...
    every 50 ms, until ``stop`` is set and at least three batches went out. Each batch's
    events are added to ``published`` once the broker acknowledged them."""

    async def loop() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{broker.port}", linger_ms=2)
        await producer.start()
        try:
            n = 0
            while not stop.is_set() or n < 3:
                events, records = batch(n)
                futures = [
                    await producer.send(topic, value, key=key, partition=partition)
                    for value, key, partition in records
                ]
                for future in futures:
                    await future
                published.extend(events)
                n += 1
                await asyncio.sleep(0.05)
        finally:
            await producer.stop()

    thread = threading.Thread(target=lambda: asyncio.run(loop()))
    thread.start()
    return thread
