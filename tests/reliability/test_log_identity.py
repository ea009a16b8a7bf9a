"""Positions are tied to the log they were read in (agents/summary_writer/log_guard.py, home_state).

* A fresh broker under an existing summary DB (what a second ``usage-stream dev`` in the
  same folder does, or a cluster migration): the writer adopts the new log and bills
  every event in it, keeping the bills it had.
* A batch log that lost its first records (recreated with them missing: the test broker
  has no DeleteRecords): the summary writer refuses with one line, a new summary DB
  refuses to be rebuilt from it, and a worker holds the partition instead of starting a
  new chain on top of it.
* A recreated usage topic under a kept batch log: the worker holds the partitions.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streams.kafka.broker import EmbeddedBroker, free_port
from tests.harness import Stack, http_get, wait_for

BASE_MS = int(time.time() * 1000) - 3_600_000


def events(tag: str, count: int) -> tuple[list[bytes], list[bytes | None]]:
    values = [
        orjson.dumps(
            {
                "request_id": f"{tag}-{i}",
                "client_org_id": f"org-{i % 3}",
                "user_id": f"user-{i % 7}",
                "model": "openai/gpt-4o-mini",
                "input_tokens": 10 + i % 5,
                "output_tokens": 3,
                "cost_usd": "0.000001",
                "timestamp": BASE_MS + i,
            }
        )
        for i in range(count)
    ]
    return values, [f"{tag}-{i}".encode() for i in range(count)]


def publish(stack: Stack, tag: str, count: int) -> None:
    values, keys = events(tag, count)
    stack.publish(values, keys)


async def _admin(port: int, step) -> object:  # type: ignore[no-untyped-def]
    admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
    await admin.start()
    try:
        return await step(admin)
    finally:
        await admin.close()


def create_topic(stack: Stack, name: str, partitions: int = 4) -> None:
    asyncio.run(
        _admin(stack.broker.port, lambda a: a.create_topics([NewTopic(name, partitions, 1)]))
    )


def read_topic(stack: Stack, topic: str) -> dict[int, list[tuple[bytes | None, bytes | None]]]:
    """Every record of ``topic``, per partition, in order (key, value)."""

    async def read() -> dict[int, list[tuple[bytes | None, bytes | None]]]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=f"127.0.0.1:{stack.broker.port}", enable_auto_commit=False
        )
        await consumer.start()
        found: dict[int, list[tuple[bytes | None, bytes | None]]] = {}
        try:
            await consumer.topics()
            for partition in sorted(consumer.partitions_for_topic(topic) or ()):
                tp = TopicPartition(topic, partition)
                consumer.assign([tp])
                await consumer.seek_to_beginning(tp)
                found[partition] = []
                while consumer.highwater(tp) is None or (
                    await consumer.position(tp) < (consumer.highwater(tp) or 0)
                ):
                    batch = await consumer.getmany(tp, timeout_ms=200)
                    found[partition] += [(r.key, r.value) for r in batch.get(tp, [])]
        finally:
            await consumer.stop()
        return found

    return asyncio.run(read())


def rewrite_topic(
    stack: Stack, topic: str, records: dict[int, list[tuple[bytes | None, bytes | None]]]
) -> None:
    """Delete ``topic`` and create it again holding ``records`` (offsets start at 0)."""

    async def rewrite() -> None:
        await _admin(stack.broker.port, lambda a: a.delete_topics([topic]))
        await asyncio.sleep(0.5)
        await _admin(
            stack.broker.port, lambda a: a.create_topics([NewTopic(topic, len(records), 1)])
        )
        producer = AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{stack.broker.port}")
        await producer.start()
        try:
            for partition, items in records.items():
                for key, value in items:
                    await producer.send_and_wait(topic, value, key=key, partition=partition)
        finally:
            await producer.stop()

    asyncio.run(rewrite())


def batch_log(stack: Stack) -> str:
    return f"{stack.env['APP_ID']}-batch-log"


def bill_in_rounds(stack: Stack, tag: str, rounds: int, per_round: int) -> None:
    """Publish and bill ``rounds`` times, so each batch-log partition gets several records."""
    for n in range(rounds):
        publish(stack, f"{tag}{n}", per_round)
        wait_for(
            lambda n=n: stack.billed_requests() == (n + 1) * per_round,
            90,
            f"round {n} billed",
        )


def test_a_fresh_broker_under_an_existing_summary_db_bills_everything_once(
    tmp_path: Path,
) -> None:
    first = EmbeddedBroker(log_path=tmp_path / "first.log").start()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("INFLUXDB_", "KAFKA_"))},
        "APP_ID": "usage-stream-fresh",
        "KAFKA_BROKER": first.url,
        "USAGE_TOPIC": "usage-events",
        "USAGE_TOPIC_PARTITIONS": "4",
        "DATA_DIR": str(tmp_path / "data"),
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
    stack = Stack(first, tmp_path, env)
    try:
        worker = stack.worker().start()
        worker.wait_assigned()
        publish(stack, "old", 400)
        wait_for(lambda: stack.billed_requests() == 400, 90, "the first broker's events")
        assert worker.stop() == 0
    finally:
        first.stop()

    # the same DATA_DIR, a new broker with nothing in it: its topics' offsets start at 0
    second = EmbeddedBroker(log_path=tmp_path / "second.log").start()
    try:
        stack.broker = second
        stack.env["KAFKA_BROKER"] = second.url
        create_topic(stack, "usage-events")
        # more events than the old positions, published before the writer looks
        publish(stack, "new", 600)
        worker = stack.worker().start()
        wait_for(lambda: stack.billed_requests() == 1000, 120, "the new broker's events")
        time.sleep(2)  # and nothing more
        assert stack.billed_requests() == 1000
        adopted = worker.metrics().get("usage_stream_batch_log_guard_total{action=adopt}", 0)
        assert adopted >= 1
        assert "following the new log from its start" in worker.log_path.read_text()
        assert worker.stop() == 0
    finally:
        second.stop()


def test_a_batch_log_missing_its_first_records_is_never_followed_as_if_whole(
    stack: Stack, tmp_path: Path
) -> None:
    worker = stack.worker().start()
    worker.wait_assigned()
    bill_in_rounds(stack, "cut", rounds=3, per_round=80)
    assert worker.stop() == 0
    log = read_topic(stack, batch_log(stack))
    assert all(len(items) >= 2 for items in log.values()), {p: len(v) for p, v in log.items()}
    rewrite_topic(stack, batch_log(stack), {p: items[1:] for p, items in log.items()})
    before = stack.billed_requests()

    # the summary writer: one line, non-zero exit, nothing changed
    refused = stack.worker().start()
    assert refused.process is not None
    assert refused.process.wait(timeout=90) != 0
    text = refused.log_path.read_text()
    assert f"usage-stream: batch log {batch_log(stack)} partition" in text, text[-2000:]
    assert "Traceback" not in text
    assert stack.billed_requests() == before

    # a new summary DB cannot be rebuilt from the cut log either
    fresh = stack.worker(DATA_DIR=str(tmp_path / "fresh")).start()
    assert fresh.process is not None and fresh.process.wait(timeout=90) != 0
    assert "the start of its chain was deleted" in fresh.log_path.read_text()

    # a worker without the DB holds the partitions: no new chain on top of the old one
    ends = {p: len(items) for p, items in read_topic(stack, batch_log(stack)).items()}
    hot = stack.worker(SUMMARY_WRITER="false").start()
    hot.wait_assigned()

    def held() -> bytes:
        code, body = http_get(hot.web + "/ready")
        return body if code == 503 and b"held" in body else b""

    body = wait_for(held, 90, "/ready naming the held partitions")
    assert b"the start of its chain was deleted" in body
    publish(stack, "after", 40)
    time.sleep(3)
    assert {p: len(v) for p, v in read_topic(stack, batch_log(stack)).items()} == ends


def test_a_recreated_usage_topic_under_a_kept_batch_log_is_held(stack: Stack) -> None:
    worker = stack.worker().start()
    worker.wait_assigned()
    bill_in_rounds(stack, "kept", rounds=2, per_round=60)
    assert worker.stop() == 0
    # the usage topic deleted and made again, with new events already in it
    rewrite_topic(stack, stack.topic, {p: [] for p in range(4)})
    publish(stack, "newtopic", 400)
    hot = stack.worker(SUMMARY_WRITER="false", WEB_PORT=str(free_port())).start()
    hot.wait_assigned()

    def held() -> bytes:
        code, body = http_get(hot.web + "/ready")
        wrong = b"is not the topic the batch log's chain read"
        return body if code == 503 and wrong in body else b""

    ends = {p: len(items) for p, items in read_topic(stack, batch_log(stack)).items()}
    wait_for(held, 90, "/ready naming the recreated topic")
    time.sleep(2)
    assert {p: len(v) for p, v in read_topic(stack, batch_log(stack)).items()} == ends
