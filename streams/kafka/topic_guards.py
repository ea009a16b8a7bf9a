"""The topics' settings the pipeline's guarantees rest on, created explicitly and checked
at every start.

Deduplication after a rebuild lasts only as long as the usage and rerouted topics keep
their records: a worker that takes a home partition reads its request ids back from them
(agents/hot_path/home_state.py), ``LEDGER_RETENTION_DAYS`` into the past. The batch log is
followed from its start by a new summary DB and by rebuilds, so it is kept for ever. And
a compacted usage topic would drop copies and history the pipeline counts on. So:

* :func:`topic_configs` gives the configs the worker creates each topic with;
* :func:`check_topic_configs` compares what the broker reports for existing topics with
  what the guarantees need, and returns the problems: ``fatal`` ones stop the worker
  with one line (going on would lose or double-count), the others are logged once and
  shown by ``usage_stream_topic_config_problems{topic,check}``.

The usage topic's partition count is recorded by the batch log itself (created with it
at the first start, :func:`streams.kafka.broker.ensure_topics`): a usage topic with another
count later moves every request's home partition, and is refused the same way.

A broker that does not report a setting (the test broker reports only what a topic was
created with) is taken to use its default; Apache Kafka reports every setting, its
defaults included (``retention.ms`` 7 days, ``cleanup.policy`` delete).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from streams.settings import Settings

__all__ = ["BATCH_LOG_MAX_MESSAGE_BYTES", "TopicProblem", "check_topic_configs", "topic_configs"]

DAY_MS = 86_400_000
#: Apache Kafka's default ``max.message.bytes``, set explicitly on the batch log: the
#: worker keeps its records under it (streams/kafka/batch_log.py MAX_RECORD_BYTES).
BATCH_LOG_MAX_MESSAGE_BYTES = 1_048_588
#: Dead letters are kept a month by default, long enough to look at them and re-send, and
#: never less than the usage topic: a replay reads the workers' ``conflicting_duplicate``
#: verdicts back from them (agents/replay/worker_verdicts.py).
DLQ_RETENTION_DAYS = 30


@dataclass(frozen=True, slots=True)
class TopicProblem:
    topic: str
    check: str  # retention_ms, retention_bytes, cleanup_policy
    message: str  # one line, naming the setting and what to do
    fatal: bool


def source_retention_ms(settings: Settings) -> int:
    """What the usage and rerouted topics are created with: the dedupe window (rebuilds
    read ids back that far) plus a day for the replay's margin."""
    return int((settings.ledger_retention_days + 1) * DAY_MS)


def topic_configs(settings: Settings) -> dict[str, dict[str, str]]:
    """The configs each pipeline topic is created with (existing topics keep theirs)."""
    source = {"cleanup.policy": "delete", "retention.ms": str(source_retention_ms(settings))}
    return {
        settings.USAGE_TOPIC: dict(source),
        settings.rerouted_topic: dict(source),
        settings.dlq_topic: {
            "cleanup.policy": "delete",
            "retention.ms": str(
                max(
                    int(max(DLQ_RETENTION_DAYS, settings.DEDUP_TTL_DAYS) * DAY_MS),
                    source_retention_ms(settings),
                )
            ),
        },
        settings.batch_log_topic: {
            "cleanup.policy": "delete",
            "retention.ms": "-1",
            "retention.bytes": "-1",
            "max.message.bytes": str(BATCH_LOG_MAX_MESSAGE_BYTES),
        },
        settings.replays_topic: {"cleanup.policy": "delete", "retention.ms": "-1"},
        # claims and heartbeats every few seconds: a day is plenty (a writer's state is
        # its last records; a heartbeat with no owner claims)
        settings.writer_topic: {"cleanup.policy": "delete", "retention.ms": str(DAY_MS)},
        settings.prices_topic: {"cleanup.policy": "compact"},
    }


def check_topic_configs(
    settings: Settings, reported: Mapping[str, Mapping[str, str]]
) -> list[TopicProblem]:
    """The problems of the usage, rerouted, dead-letter and batch-log topics' configs as
    the broker reports them (``{topic: {name: value}}``; a missing name is the broker's
    default)."""
    problems: list[TopicProblem] = []
    needed_ms = int(settings.ledger_retention_days * DAY_MS)
    for topic in (settings.USAGE_TOPIC, settings.rerouted_topic):
        configs = reported.get(topic, {})
        policy = configs.get("cleanup.policy", "delete")
        if "compact" in policy:
            problems.append(
                TopicProblem(
                    topic,
                    "cleanup_policy",
                    f"topic {topic} has cleanup.policy={policy}: compaction drops records"
                    " the pipeline reads back to deduplicate (and copies it must count"
                    " once); set cleanup.policy=delete",
                    fatal=True,
                )
            )
        retention = int(configs.get("retention.ms", "-1"))
        if 0 <= retention < needed_ms:
            problems.append(
                TopicProblem(
                    topic,
                    "retention_ms",
                    f"topic {topic} keeps records {retention / DAY_MS:g} days (retention.ms="
                    f"{retention}), less than LEDGER_RETENTION_DAYS="
                    f"{settings.ledger_retention_days:g}: after a rebuild, copies older than"
                    " that would be billed again; raise retention.ms to at least"
                    f" {needed_ms}, or lower LEDGER_RETENTION_DAYS",
                    fatal=True,
                )
            )
        size = int(configs.get("retention.bytes", "-1"))
        if size >= 0:
            problems.append(
                TopicProblem(
                    topic,
                    "retention_bytes",
                    f"topic {topic} has retention.bytes={size}: whether it keeps"
                    f" {settings.ledger_retention_days:g} days of records cannot be checked;"
                    " a partition cut by size before that weakens deduplication after a"
                    " rebuild (set retention.bytes=-1 and bound it by retention.ms)",
                    fatal=False,
                )
            )
    dlq = settings.dlq_topic
    retention = int(reported.get(dlq, {}).get("retention.ms", "-1"))
    if 0 <= retention < needed_ms:
        problems.append(
            TopicProblem(
                dlq,
                "retention_ms",
                f"topic {dlq} keeps dead letters {retention / DAY_MS:g} days (retention.ms="
                f"{retention}), less than LEDGER_RETENTION_DAYS="
                f"{settings.ledger_retention_days:g}: a replay of an older date cannot read"
                " the workers' conflicting_duplicate verdicts back and may bill another"
                f" copy of a conflicting request; raise retention.ms to at least {needed_ms}",
                fatal=False,
            )
        )
    log = settings.batch_log_topic
    configs = reported.get(log, {})
    for name in ("retention.ms", "retention.bytes"):
        value = int(configs.get(name, "-1"))
        if value >= 0:
            problems.append(
                TopicProblem(
                    log,
                    name.replace(".", "_"),
                    f"topic {log} has {name}={value}: the batch log is followed from its"
                    " start (a new summary DB, a rebuilt home partition), and a cut log"
                    f" cannot be followed; set {name}=-1",
                    fatal=True,
                )
            )
    policy = configs.get("cleanup.policy", "delete")
    if policy != "delete":
        problems.append(
            TopicProblem(
                log,
                "cleanup_policy",
                f"topic {log} has cleanup.policy={policy}; set cleanup.policy=delete",
                fatal=True,
            )
        )
    return problems
