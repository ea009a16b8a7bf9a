"""Every record the worker produces fits Apache Kafka's default ``max.message.bytes``.

A backlog with tens of thousands of distinct (client, user, model) keys in one date makes
batches whose sums would be several megabytes as one batch-log record: Apache Kafka
refuses those (1,048,588 B by default) and the partition would stop. The test broker
accepts any size, so the sizes are asserted here: the batch log holds parts and entries,
none over ``MAX_RECORD_BYTES``, and the bills are exact.
"""

from __future__ import annotations

import asyncio
import time

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.kafka.batch_log import MAX_RECORD_BYTES, BatchEntry, BatchPart, decode
from tests.harness import Stack, wait_for

EVENTS = 24_000


def backlog() -> tuple[list[bytes], list[bytes | None]]:
    """Every event its own key: a user id of 200 characters makes each sum row ~300 B."""
    at = int(time.time() * 1000) - 3_600_000
    values = [
        orjson.dumps(
            {
                "request_id": f"wide-{i}",
                "client_org_id": f"org-{i % 5}",
                "user_id": f"user-{i:06d}-" + "x" * 188,
                "model": "openai/gpt-4o-mini",
                "input_tokens": i % 1000,
                "output_tokens": 7,
                "cost_usd": "0.000001",
                "timestamp": at + i,
            }
        )
        for i in range(EVENTS)
    ]
    return values, [f"wide-{i}".encode() for i in range(EVENTS)]


async def record_sizes(port: int, topic: str) -> list[tuple[int, object]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=f"127.0.0.1:{port}", enable_auto_commit=False)
    await consumer.start()
    found: list[tuple[int, object]] = []
    try:
        await consumer.topics()
        for partition in sorted(consumer.partitions_for_topic(topic) or ()):
            tp = TopicPartition(topic, partition)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            while consumer.highwater(tp) is None or await consumer.position(tp) < (
                consumer.highwater(tp) or 0
            ):
                for record in (await consumer.getmany(tp, timeout_ms=300)).get(tp, []):
                    found.append((len(record.value or b""), decode(record.value)))
    finally:
        await consumer.stop()
    return found


def test_a_high_cardinality_backlog_writes_no_record_over_one_mebibyte(stack: Stack) -> None:
    values, keys = backlog()
    stack.publish(values, keys)  # a backlog: published before the worker starts
    worker = stack.worker().start()
    worker.wait_assigned()
    wait_for(lambda: stack.billed_requests() == EVENTS, 240, "the backlog billed")
    ((rows, tokens),) = stack.query(
        "SELECT COUNT(*), SUM(input_tokens) FROM (SELECT k.user_id, p.input_tokens"
        " FROM daily_pending p JOIN summary_keys k USING (key_id)"
        " UNION ALL SELECT user_id, input_tokens FROM usage_daily)"
    )
    assert tokens == sum(i % 1000 for i in range(EVENTS))
    assert rows >= EVENTS  # every key its own row (pending, or merged into usage_daily)
    found = asyncio.run(record_sizes(stack.broker.port, f"{stack.env['APP_ID']}-batch-log"))
    sizes = [size for size, _ in found]
    assert max(sizes) <= MAX_RECORD_BYTES, max(sizes)
    parts = [record for _, record in found if isinstance(record, BatchPart)]
    named = [r for _, r in found if isinstance(r, BatchEntry) and r.parts]
    assert parts and named, "the backlog's batches were split"
    # a batch's own parts between the head and its entry are no lost race
    assert "another record came first" not in worker.log_path.read_text()
    assert worker.stop() == 0
