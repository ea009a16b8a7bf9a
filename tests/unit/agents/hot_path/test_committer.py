"""agents/hot_path/committer.py: raw points durable, sends landed, then the batch-log
append, then the Kafka offsets; producer, sink and consumer stand-ins, no broker."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import MessageSizeTooLargeError

from agents.conditions import ConditionLog
from agents.hot_path.committer import Committer, InFlight
from agents.hot_path.ownership import Ownership
from streams.kafka.batch_log import BatchEntry, decode_rows_raw
from streams.model.event import MAX_EVENT_BYTES
from tests.unit.agents.hot_path.fakes import (
    TOPICS,
    FakeConsumer,
    Homes,
    event,
    homed_at,
    preparer,
    record,
)


class FakeProducer:
    """Sends land at the next offset of their partition; ``fail`` makes the next sends
    to a topic raise; the order of every send is noted in ``calls``."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls
        self.next_offset: dict[tuple[str, int], int] = {}
        self.sent: list[dict] = []
        self.fail: dict[str, list[BaseException]] = {}
        self.max_value = 1 << 30

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future:
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        failures = self.fail.get(topic)
        if failures:
            future.set_exception(failures.pop(0))
            return future
        if value is not None and len(value) > self.max_value:
            future.set_exception(MessageSizeTooLargeError())
            return future
        where = (topic, partition or 0)
        offset = self.next_offset.get(where, 0)
        self.next_offset[where] = offset + 1
        self.calls.append(topic)
        self.sent.append(
            {"topic": topic, "value": value, "key": key, "partition": partition, "headers": headers}
        )
        future.set_result(SimpleNamespace(offset=offset))
        return future


class FakeSink:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls
        self.lines: list[str] = []
        self.fail: list[BaseException] = []

    async def write_lines(self, lines: list[str]) -> None:
        if self.fail:
            raise self.fail.pop(0)
        self.calls.append("sink")
        self.lines += lines


def _setup(*partitions: int) -> tuple[Committer, Homes, FakeProducer, FakeSink, FakeConsumer]:
    calls: list[str] = []
    consumer = FakeConsumer()
    consumer.calls = calls
    consumer.assign_homes(*partitions)

    async def never(*args: object) -> None:
        raise AssertionError("not called")

    ownership = Ownership(consumer, TOPICS, never, never, never, never)  # type: ignore[arg-type]
    homes = Homes.owning(*partitions)
    ownership.owned, ownership.states, ownership.epochs = homes.owned, homes.states, homes.epochs
    producer, sink = FakeProducer(calls), FakeSink(calls)
    conditions = ConditionLog(logging.getLogger(__name__))
    committer = Committer(producer, consumer, sink, ownership, TOPICS, conditions)
    return committer, homes, producer, sink, consumer


def _prepared(committer: Committer, homes: Homes, records: list) -> InFlight:
    in_flight = InFlight(preparer(homes).prepare(records))
    committer.start_sends(in_flight)
    return in_flight


async def test_raw_points_and_sends_are_stored_before_the_append_and_offsets_after() -> None:
    committer, homes, producer, sink, consumer = _setup(0, 2)
    (at_home,) = homed_at(0)
    (away,) = homed_at(2)
    records = [record(event(at_home), 0, 0), record(b"{", 0, 1), record(event(away), 0, 2)]
    in_flight = _prepared(committer, homes, records)
    await committer.commit(in_flight)
    calls = producer.calls
    assert calls.count(TOPICS.batch_log) == 1
    append = calls.index(TOPICS.batch_log)
    assert calls.index("sink") < append
    assert calls.index(TOPICS.dlq) < append and calls.index(TOPICS.rerouted) < append
    assert calls[-1] == "kafka-commit"
    assert len(sink.lines) == 1 and in_flight.sends == []
    (appended,) = [s for s in producer.sent if s["topic"] == TOPICS.batch_log]
    entry = decode_rows_raw(appended["value"])
    assert isinstance(entry, BatchEntry) and appended["partition"] == 0
    assert (entry.prev, entry.usage_from, entry.usage_next) == (-1, 0, 3)
    state = homes.states[0]
    assert (state.head.offset, state.head.usage_next, state.log_end) == (0, 3, 1)
    assert len(state.seen) == 1  # the new id is seen once its record is appended
    tp = TopicPartition(TOPICS.usage, 0)
    assert consumer.commits[-1][tp].offset == 3
    (reroute,) = [s for s in producer.sent if s["topic"] == TOPICS.rerouted]
    assert reroute["partition"] == 2 and reroute["key"] == away.encode()


async def test_a_retried_commit_resends_only_what_failed_and_appends_once() -> None:
    committer, homes, producer, sink, _ = _setup(0)
    (rid,) = homed_at(0)
    sink.fail = [OSError("disk full")]
    producer.fail[TOPICS.dlq] = [OSError("broker away")]
    in_flight = _prepared(committer, homes, [record(event(rid), 0, 0), record(b"[", 0, 1)])
    with pytest.raises(OSError, match="disk full"):
        await committer.commit(in_flight)
    assert TOPICS.batch_log not in producer.calls  # nothing appended over missing points
    with pytest.raises(OSError, match="broker away"):
        await committer.commit(in_flight)
    assert TOPICS.batch_log not in producer.calls  # nor over a dead letter not stored
    await committer.commit(in_flight)
    await committer.commit(in_flight)  # done is done: no second record, no second send
    assert producer.calls.count(TOPICS.batch_log) == 1
    assert producer.calls.count(TOPICS.dlq) == 1 and sink.calls.count("sink") == 1


async def test_an_append_that_lost_its_race_resyncs_the_partition() -> None:
    committer, homes, producer, _, consumer = _setup(1)
    resynced: list[int] = []

    async def resync(partition: int) -> None:
        resynced.append(partition)

    committer.ownership.resync = resync  # type: ignore[method-assign]
    producer.next_offset[(TOPICS.batch_log, 1)] = 5  # a zombie's records came first
    (rid,) = homed_at(1)
    await committer.commit(_prepared(committer, homes, [record(event(rid), 1, 0)]))
    assert resynced == [1]
    state = homes.states[1]
    assert state.head.offset == -1 and len(state.seen) == 0  # the old head stands
    assert consumer.commits == []  # no chain yet: no offsets to commit


async def test_a_partition_revoked_before_its_append_is_not_appended() -> None:
    committer, homes, producer, _, _ = _setup(1)
    (rid,) = homed_at(1)
    in_flight = _prepared(committer, homes, [record(event(rid), 1, 0)])
    homes.epochs[1] += 1  # revoked and assigned again while the batch waited
    await committer.commit(in_flight)
    assert TOPICS.batch_log not in producer.calls


async def test_a_dead_letter_too_large_for_the_broker_is_sent_truncated() -> None:
    committer, homes, producer, _, _ = _setup(0)
    producer.max_value = MAX_EVENT_BYTES
    huge = b"x" * (MAX_EVENT_BYTES + 10)
    await committer.commit(_prepared(committer, homes, [record(huge, 0, 0)]))
    (dead,) = [s for s in producer.sent if s["topic"] == TOPICS.dlq]
    assert dead["value"] == huge[:MAX_EVENT_BYTES]
    headers = dict(dead["headers"])
    assert headers["value-truncated"] == str(len(huge)).encode()
    assert headers["error"].startswith(b"too_large: ")
    assert headers["source-offset"] == f"{TOPICS.usage}/0/0".encode()
