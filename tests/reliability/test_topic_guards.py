"""Topic guards at start (streams/kafka/topic_guards.py), on the real broker: a worker whose
topics would lose or double-count refuses to start with one line naming the setting; a
setting that only weakens a guarantee is logged and shown as a metric; the topics the
worker creates carry the configs the guarantees need."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from tests.harness import Stack

DAY_MS = 86_400_000


async def _admin(stack: Stack, step):  # type: ignore[no-untyped-def]
    admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{stack.broker.port}")
    await admin.start()
    try:
        return await step(admin)
    finally:
        await admin.close()


def create(stack: Stack, name: str, partitions: int = 4, **configs: str) -> None:
    topic = NewTopic(name, partitions, 1, topic_configs=configs)
    asyncio.run(_admin(stack, lambda admin: admin.create_topics([topic])))


def delete(stack: Stack, name: str) -> None:
    asyncio.run(_admin(stack, lambda admin: admin.delete_topics([name])))


def configs_of(stack: Stack, name: str) -> dict[str, str]:
    async def describe(admin: AIOKafkaAdminClient) -> dict[str, str]:
        (answer,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
        ((*_, entries),) = answer.resources
        return {entry[0]: entry[1] for entry in entries}

    return asyncio.run(_admin(stack, describe))


def refused(stack: Stack, **env: str) -> str:
    worker = stack.worker(**env).start()
    assert worker.process is not None
    assert worker.process.wait(timeout=90) != 0
    text = worker.log_path.read_text()
    assert "Traceback" not in text, text[-3000:]
    (line,) = [line for line in text.splitlines() if line.startswith("usage-stream: ")]
    return line


@pytest.mark.parametrize(
    ("configs", "words"),
    [
        ({"retention.ms": str(DAY_MS)}, "LEDGER_RETENTION_DAYS=7"),
        ({"cleanup.policy": "compact"}, "cleanup.policy=compact"),
    ],
)
def test_a_usage_topic_that_would_double_count_is_refused(
    stack: Stack, configs: dict[str, str], words: str
) -> None:
    create(stack, stack.topic, **configs)
    line = refused(stack)
    assert stack.topic in line and words in line


def test_a_batch_log_with_a_retention_is_refused(stack: Stack) -> None:
    create(stack, f"{stack.env['APP_ID']}-batch-log", **{"retention.ms": str(30 * DAY_MS)})
    line = refused(stack)
    assert "batch-log has retention.ms" in line and "retention.ms=-1" in line


def test_a_usage_topic_with_another_partition_count_is_refused(stack: Stack) -> None:
    worker = stack.worker().start()
    worker.wait_assigned()
    assert worker.stop() == 0
    delete(stack, stack.topic)
    create(stack, stack.topic, partitions=6)
    line = refused(stack)
    assert "has 4 partitions" in line and "has 6" in line


def test_a_size_bound_is_a_warning_and_a_metric(stack: Stack) -> None:
    create(stack, stack.topic, **{"retention.bytes": "500000000"})
    worker = stack.worker().start()
    worker.wait_assigned()
    problems = worker.metrics()
    key = f"usage_stream_topic_config_problems{{check=retention_bytes,topic={stack.topic}}}"
    assert problems[key] == 1
    ok = f"usage_stream_topic_config_problems{{check=retention_ms,topic={stack.topic}}}"
    assert problems[ok] == 0
    assert "retention.bytes=500000000" in worker.log_path.read_text()


def test_the_worker_creates_its_topics_with_the_configs_the_guarantees_need(
    stack: Stack,
) -> None:
    worker = stack.worker().start()
    worker.wait_assigned()
    app = stack.env["APP_ID"]
    assert configs_of(stack, stack.topic)["retention.ms"] == str(8 * DAY_MS)
    assert configs_of(stack, stack.topic)["cleanup.policy"] == "delete"
    assert configs_of(stack, f"{app}-rerouted")["retention.ms"] == str(8 * DAY_MS)
    batch_log = configs_of(stack, f"{app}-batch-log")
    assert batch_log["retention.ms"] == "-1" and batch_log["max.message.bytes"] == "1048588"
    assert worker.stop() == 0
