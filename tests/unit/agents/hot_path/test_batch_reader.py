"""agents/hot_path/batch_reader.py: the fences' order, and chunks taken only where the
last read ended; a consumer stand-in, no broker."""

from __future__ import annotations

import logging

from aiokafka import TopicPartition

from agents.conditions import ConditionLog
from agents.hot_path.batch_reader import BatchReader, fence_order
from agents.hot_path.home_partition import ReplayFence
from agents.hot_path.ownership import Ownership
from streams.kafka.batch_log import ChainHead
from tests.unit.agents.hot_path.fakes import DAY, TOPICS, FakeConsumer, Homes, event, record

USAGE_0 = TopicPartition(TOPICS.usage, 0)


def test_without_fences_the_batch_is_read_as_fetched() -> None:
    records = [record(b"x", 0, 5), record(b"x", 1, 2)]
    ordered, seeks = fence_order(records, Homes.owning(0, 1).states, TOPICS)
    assert ordered == records and seeks == []


def test_below_the_fence_comes_first_when_both_topics_reach_it() -> None:
    homes = Homes.owning(0)
    homes.states[0].fences[DAY] = ReplayFence(DAY, usage_end=2, rerouted_end=1)
    records = [
        record(b"x", 0, 1),
        record(b"x", 0, 2),  # past the usage fence
        record(b"x", 0, 0, topic=TOPICS.rerouted),
        record(b"x", 1, 9),  # another partition, no fence
    ]
    ordered, seeks = fence_order(records, homes.states, TOPICS)
    assert [(r.topic, r.partition, r.offset) for r in ordered] == [
        (TOPICS.usage, 0, 1),
        (TOPICS.rerouted, 0, 0),
        (TOPICS.usage, 1, 9),
        (TOPICS.usage, 0, 2),
    ]
    assert seeks == []


def test_past_the_fence_waits_while_the_other_topic_has_not_reached_it() -> None:
    homes = Homes.owning(0)
    homes.states[0].fences[DAY] = ReplayFence(DAY, usage_end=2, rerouted_end=5)
    records = [
        record(b"x", 0, 1),
        record(b"x", 0, 2),
        record(b"x", 0, 3),
        record(b"x", 0, 0, topic=TOPICS.rerouted),
    ]
    ordered, seeks = fence_order(records, homes.states, TOPICS)
    assert [(r.topic, r.offset) for r in ordered] == [(TOPICS.usage, 1), (TOPICS.rerouted, 0)]
    assert seeks == [(USAGE_0, 2)]  # read again once the rerouted topic reached 5


def test_a_fence_both_topics_read_past_is_closed() -> None:
    homes = Homes()
    homes.own(0, head=ChainHead(3, usage_next=10, rerouted_next=10))
    homes.states[0].fences[DAY] = ReplayFence(DAY, usage_end=2, rerouted_end=5)
    records = [record(b"x", 0, 10), record(b"x", 0, 11)]
    assert fence_order(records, homes.states, TOPICS) == (records, [])


def _reader(consumer: FakeConsumer) -> tuple[BatchReader, Ownership]:
    async def unused(*args: object) -> None:
        raise AssertionError("not called")

    ownership = Ownership(consumer, TOPICS, unused, unused, unused, unused)  # type: ignore[arg-type]
    ownership.owned.add(0)
    ownership.states.update(Homes.owning(0).states)
    conditions = ConditionLog(logging.getLogger(__name__))
    reader = BatchReader(consumer, ownership, TOPICS, conditions, 100, 0.05, 100)
    return reader, ownership


async def test_a_chunk_after_a_gap_is_dropped_and_read_again_from_the_expected_offset() -> None:
    consumer = FakeConsumer()
    consumer.assign_homes(0)
    reader, ownership = _reader(consumer)
    ownership.seek(USAGE_0, 10)
    consumer.fetches = [{USAGE_0: [record(event("a"), 0, 12), record(event("b"), 0, 13)]}]
    assert await reader.next_batch() == []
    assert consumer.sought[-1] == (USAGE_0, 10)  # back to where the records must start
    # the same gap again is the log's own (compaction, transaction markers): taken
    again = [record(event("a"), 0, 12)]
    consumer.fetches = [{USAGE_0: again}]
    assert await reader.next_batch() == again
    assert ownership.next_read[USAGE_0] == 13


async def test_records_that_follow_on_are_taken_and_unowned_ones_dropped() -> None:
    consumer = FakeConsumer()
    consumer.assign_homes(0, 1)
    reader, ownership = _reader(consumer)
    ownership.seek(USAGE_0, 0)
    first = [record(event("a"), 0, 0), record(event("b"), 0, 1)]
    consumer.fetches = [{USAGE_0: first, TopicPartition(TOPICS.usage, 1): [record(b"x", 1, 0)]}]
    assert await reader.next_batch() == first  # partition 1 is not owned (yet)
    follow = [record(event("c"), 0, 2)]
    consumer.fetches = [{USAGE_0: follow}]
    assert await reader.next_batch() == follow
    assert ownership.next_read[USAGE_0] == 3


async def test_records_fetched_before_a_seek_are_dropped() -> None:
    consumer = FakeConsumer()
    consumer.assign_homes(0)
    reader, ownership = _reader(consumer)
    ownership.seek(USAGE_0, 0)
    stale = [record(event("a"), 0, 0)]

    calls = 0

    async def fetch_then_seek(*tps: TopicPartition, **kwargs: object) -> dict:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {USAGE_0: stale}
        # while the batch is still collected, a lost append sends the partition back
        ownership.seek(USAGE_0, 0)
        return {}

    consumer.getmany = fetch_then_seek  # type: ignore[method-assign]
    assert await reader.next_batch() == []
    assert calls >= 2
