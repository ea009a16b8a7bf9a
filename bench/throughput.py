"""Throughput of the pipeline against two baselines measured in the same run, same broker,
same events: a raw aiokafka consumer with orjson (the ceiling) and a do-nothing Faust agent
(the framework's per-message floor). Prints events/s and ratios; no pass/fail.

    .venv/bin/python bench/throughput.py [EVENTS]   (default 100000)

The pipeline is timed from its first consumed event until every unique event is in the
ledger (file raw sink, so InfluxDB is not part of the measurement).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streams.broker import EmbeddedBroker, free_port  # noqa: E402


def events(count: int) -> list[bytes]:
    rng = random.Random(1)
    base = int(time.time() * 1000) - 3 * 86_400_000
    return [
        orjson.dumps(
            {
                "request_id": f"bench-{i}",
                "client_org_id": f"org-{rng.randrange(50)}",
                "user_id": f"user-{rng.randrange(500)}",
                "model": "openai/gpt-4o-mini",
                "input_tokens": rng.randrange(5000),
                "output_tokens": rng.randrange(2000),
                "cost_usd": f"0.{rng.randrange(10**9):09d}",
                "timestamp": base + rng.randrange(2 * 86_400_000),
            }
        )
        for i in range(count)
    ]


async def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 4, 1), NewTopic(topic + "-dlq", 4, 1)])
    await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=512_000)
    await producer.start()
    futures = [await producer.send(topic, v, key=v[15:30]) for v in values]
    for future in futures:
        await future
    await producer.stop()


async def raw_consumer(bootstrap: str, topic: str, count: int) -> float:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    consumer.assign([TopicPartition(topic, p) for p in range(4)])
    await consumer.seek_to_beginning()
    seen, started = 0, time.perf_counter()
    while seen < count:
        for records in (await consumer.getmany(timeout_ms=500, max_records=10_000)).values():
            for record in records:
                orjson.loads(record.value)
            seen += len(records)
    elapsed = time.perf_counter() - started
    await consumer.stop()
    return elapsed


def noop_faust(broker: EmbeddedBroker, topic: str, count: int, workdir: Path) -> float:
    env = {
        **os.environ,
        "BENCH_BROKER": broker.url,
        "BENCH_TOPIC": topic,
        "BENCH_COUNT": str(count),
        "BENCH_DATADIR": str(workdir / "noop"),
    }
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench/noop_faust.py"),
            "worker",
            "-l",
            "info",  # below WARN: no spinner, so Faust keeps the root logger at INFO
        ],
        env=env,
        capture_output=True,
        timeout=1800,
        cwd=workdir,
    )
    # Faust redirects print() into its log (stderr)
    match = re.search(rb"NOOP_RESULT (\d+) ([\d.]+)", result.stdout + result.stderr)
    if not match:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-2000:])
    return float(match.group(2))


def pipeline(broker: EmbeddedBroker, topic: str, count: int, workdir: Path) -> float:
    port = free_port()
    env = {
        **os.environ,
        "KAFKA_BROKER": broker.url,
        "USAGE_TOPIC": topic,
        "APP_ID": f"bench-pipeline-{os.getpid()}",
        "DATA_DIR": str(workdir / "data"),
        "WEB_PORT": str(port),
        "KAFKA_SESSION_TIMEOUT_SECONDS": "10",
        "KAFKA_REBALANCE_TIMEOUT_SECONDS": "10",
        "KAFKA_HEARTBEAT_INTERVAL_SECONDS": "1",
        "RECOVERY_CONSISTENCY_CHECK": "false",
        "NBP_API_URL": "http://127.0.0.1:9/api",
        "OPENROUTER_API_URL": "http://127.0.0.1:9/api/v1",
    }
    with (workdir / "worker.log").open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "streams", "worker", "-l", "warn"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        started = None
        db = workdir / "data" / "usage.db"
        while True:
            time.sleep(0.2)
            if started is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
                        text = r.read().decode()
                    if re.search(r"^usage_stream_events_consumed_total [1-9]", text, re.M):
                        started = time.perf_counter()
                except OSError:
                    pass
                continue
            conn = sqlite3.connect(db)
            (done,) = conn.execute("SELECT COUNT(*) FROM usage_events").fetchone()
            conn.close()
            if done >= count:
                return time.perf_counter() - started
    finally:
        worker.terminate()
        worker.wait(60)


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    values = events(count)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        workdir = Path(tmp)
        bootstrap = f"127.0.0.1:{broker.port}"
        topic = "bench-usage"
        asyncio.run(produce(bootstrap, topic, values))
        raw = asyncio.run(raw_consumer(bootstrap, topic, count))
        noop = noop_faust(broker, topic, count, workdir)
        ours = pipeline(broker, topic, count, workdir)
    rate = {
        name: count / seconds
        for name, seconds in (
            ("aiokafka+orjson", raw),
            ("faust no-op agent", noop),
            ("usage-stream", ours),
        )
    }
    for name, value in rate.items():
        print(f"{name:>18}: {value:>10,.0f} events/s")
    print(f"usage-stream / faust no-op = {rate['usage-stream'] / rate['faust no-op agent']:.2f}")
    print(f"usage-stream / aiokafka    = {rate['usage-stream'] / rate['aiokafka+orjson']:.3f}")


if __name__ == "__main__":
    main()
