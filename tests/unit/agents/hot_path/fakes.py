"""Hand-built records and stand-ins for the broker, shared by the hot path's unit tests:
nothing here talks to Kafka or imports the Faust app."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from decimal import Decimal
from zoneinfo import ZoneInfo

from aiokafka import ConsumerRecord, TopicPartition

from agents.hot_path.batch import Topics
from agents.hot_path.home_partition import HomePartition
from agents.hot_path.prepare import Preparer
from streams.kafka.batch_log import ChainHead
from streams.model.business_time import UsageDates
from streams.model.money import NanoScaler
from streams.model.partitioning import home_partitions
from tables.dedupe.seen_requests import SeenRequests
from tests.unit.streams.model.test_event import event as valid_event

TOPICS = Topics("usage", "usage-rerouted", "usage-batch-log", "usage-dlq")
PARTITIONS = 4
NOW_MS = 1_795_169_472_123  # 2026-11-20T10:11:12.123Z
DAY = "2026-11-20"  # its usage date in Europe/Warsaw
TTL_MS = 7 * 86_400_000


def event(request_id: str, **overrides: object) -> bytes:
    """A valid event's bytes (tests/unit/test_event.py's), with ``overrides``."""
    return valid_event(request_id=request_id, **overrides)


def record(
    value: bytes | None, partition: int, offset: int, topic: str = TOPICS.usage
) -> ConsumerRecord:
    key = b"k"
    return ConsumerRecord(
        topic, partition, offset, NOW_MS, 0, key, value, None, len(key), len(value or b""), []
    )


def homed_at(partition: int, count: int = 1, prefix: str = "req") -> list[str]:
    """``count`` request ids whose home partition is ``partition``."""
    found: list[str] = []
    i = 0
    while len(found) < count:
        candidates = [f"{prefix}-{i + j}" for j in range(64)]
        homes = home_partitions(candidates, PARTITIONS)
        found += [rid for rid, home in zip(candidates, homes, strict=True) if home == partition]
        i += 64
    return found[:count]


@dataclass
class Homes:
    """The :class:`agents.hot_path.prepare.HomeStates` a test sets by hand."""

    partitions: int = PARTITIONS
    owned: set[int] = field(default_factory=set)
    states: dict[int, HomePartition] = field(default_factory=dict)
    epochs: dict[int, int] = field(default_factory=dict)

    @classmethod
    def owning(cls, *partitions: int) -> Homes:
        homes = cls()
        for p in partitions:
            homes.own(p)
        return homes

    def own(self, partition: int, head: ChainHead | None = None) -> HomePartition:
        state = HomePartition(partition, SeenRequests(TTL_MS), head=head or ChainHead())
        self.states[partition] = state
        self.owned.add(partition)
        self.epochs[partition] = self.epochs.get(partition, 0) + 1
        return state


def preparer(homes: Homes) -> Preparer:
    return Preparer(
        TOPICS,
        homes,
        UsageDates(ZoneInfo("Europe/Warsaw")),
        NanoScaler(Decimal("1.3")),
        prices=dict,
    )


class FakeConsumer:
    """What the hot path's collaborators call on ``AIOKafkaConsumer``, in memory: an
    assignment, pauses, seeks, offsets, and fetches a test queues up."""

    def __init__(self, assignment: set[TopicPartition] | None = None) -> None:
        self._assignment = set(assignment or ())
        self.paused: set[TopicPartition] = set()
        self.sought: list[tuple[TopicPartition, int]] = []
        self.beginning: dict[TopicPartition, int] = {}
        self.highwaters: dict[TopicPartition, int] = {}
        self.fetches: list[dict[TopicPartition, list[ConsumerRecord]]] = []
        self.commits: list[dict[TopicPartition, object]] = []
        self.calls: list[str] | None = None  # when set, the order of commits is noted there

    def assignment(self) -> set[TopicPartition]:
        return set(self._assignment)

    def assign_homes(self, *partitions: int) -> list[TopicPartition]:
        tps = [TopicPartition(t, p) for p in partitions for t in (TOPICS.usage, TOPICS.rerouted)]
        self._assignment = set(tps)
        return tps

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(range(PARTITIONS))

    def pause(self, *tps: TopicPartition) -> None:
        self.paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused.difference_update(tps)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.sought.append((tp, offset))

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.beginning.get(tp, 0) for tp in tps}

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.highwaters.get(tp)

    async def getmany(
        self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[ConsumerRecord]]:
        await asyncio.sleep(0)
        return self.fetches.pop(0) if self.fetches else {}

    async def commit(self, offsets: dict[TopicPartition, object]) -> None:
        if self.calls is not None:
            self.calls.append("kafka-commit")
        self.commits.append(offsets)
