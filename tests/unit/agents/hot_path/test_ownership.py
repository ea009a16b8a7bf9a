"""agents/hot_path/ownership.py: assigned → rebuilding → owned, revoked, held, resynced;
a consumer and a rebuilder stand-in, no broker."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
from aiokafka import TopicPartition

from agents.hot_path.home_partition import HomePartition
from agents.hot_path.home_state import ChainBroken
from agents.hot_path.ownership import Ownership
from streams.kafka.batch_log import ChainHead
from tables.dedupe.seen_requests import SeenRequests
from tests.unit.agents.hot_path.fakes import TOPICS, TTL_MS, FakeConsumer

T = TypeVar("T")


class FakeRebuilder:
    """Catches a partition up to ``heads[partition]``, once ``release`` is set."""

    def __init__(self) -> None:
        self.heads: dict[int, ChainHead] = {}
        self.broken: dict[int, str] = {}
        self.defects: dict[int, Exception] = {}
        self.release = asyncio.Event()
        self.release.set()
        self.calls: list[tuple[HomePartition | None, int]] = []
        self.snapshots = None

    async def catch_up(self, state: HomePartition | None, partition: int) -> HomePartition:
        self.calls.append((state, partition))
        await self.release.wait()
        if partition in self.broken:
            raise ChainBroken(self.broken[partition])
        if partition in self.defects:
            raise self.defects[partition]
        return HomePartition(
            partition, SeenRequests(TTL_MS), head=self.heads.get(partition, ChainHead())
        )


def _tp(topic: str, partition: int) -> TopicPartition:
    return TopicPartition(topic, partition)


def _ownership(consumer: FakeConsumer, rebuilder: FakeRebuilder) -> tuple[Ownership, list]:
    crashes: list[BaseException] = []

    async def retry(stage: str, step: Callable[[], Awaitable[T]]) -> T:
        return await step()

    async def crash(error: BaseException) -> None:
        crashes.append(error)

    async def settle() -> bool:
        return True

    ownership = Ownership(
        consumer,
        TOPICS,
        make_rebuilder=lambda partitions: rebuilder,  # type: ignore[arg-type,return-value]
        retry=retry,
        crash=crash,
        settle=settle,
    )
    return ownership, crashes


async def _rebuilt(ownership: Ownership) -> None:
    await asyncio.gather(*list(ownership.rebuilding.values()))


async def test_an_assigned_partition_is_paused_rebuilt_then_read_from_its_chain_head() -> None:
    consumer, rebuilder = FakeConsumer(), FakeRebuilder()
    ownership, _ = _ownership(consumer, rebuilder)
    rebuilder.release.clear()
    rebuilder.heads[1] = ChainHead(5, usage_next=100, rerouted_next=7)
    assigned = consumer.assign_homes(1)
    ownership.assigned(assigned)
    assert ownership.joined and ownership.partitions == 4
    assert set(ownership.rebuilding) == {1} and ownership.owned == set()
    assert consumer.paused == set(assigned)
    await asyncio.sleep(0)
    assert 1 in ownership.rebuilding  # still rebuilding: not read meanwhile
    rebuilder.release.set()
    await _rebuilt(ownership)
    assert ownership.owned == {1} and ownership.epochs == {1: 1}
    assert ownership.rebuilding == {} and consumer.paused == set()
    assert sorted(consumer.sought) == [(_tp(TOPICS.usage, 1), 100), (_tp(TOPICS.rerouted, 1), 7)]
    assert ownership.committed == {(TOPICS.usage, 1): 100, (TOPICS.rerouted, 1): 7}
    assert ownership.next_read[_tp(TOPICS.usage, 1)] == 100
    assert ownership.assigned_partitions() == [1]


async def test_without_a_chain_a_partition_is_read_from_its_beginning() -> None:
    consumer, rebuilder = FakeConsumer(), FakeRebuilder()
    ownership, _ = _ownership(consumer, rebuilder)
    consumer.beginning[_tp(TOPICS.usage, 2)] = 40
    ownership.assigned(consumer.assign_homes(2))
    await _rebuilt(ownership)
    assert sorted(consumer.sought) == [(_tp(TOPICS.usage, 2), 40), (_tp(TOPICS.rerouted, 2), 0)]
    assert ownership.committed == {}  # nothing committed until a chain exists


async def test_a_revoke_bumps_the_epoch_and_the_next_assignment_frees_states() -> None:
    consumer, rebuilder = FakeConsumer(), FakeRebuilder()
    ownership, _ = _ownership(consumer, rebuilder)
    rebuilder.heads[0] = ChainHead(1, usage_next=3, rerouted_next=0)
    ownership.assigned(consumer.assign_homes(0, 3))
    await _rebuilt(ownership)
    await ownership.revoked(sorted(consumer.assignment()))
    assert not ownership.joined and ownership.owned == set()
    assert ownership.epochs == {0: 2, 3: 2} and ownership.committed == {}
    assert set(ownership.states) == {0, 3}  # kept: caught up if assigned again
    kept = ownership.states[3]
    ownership.assigned(consumer.assign_homes(3))
    assert set(ownership.states) == {3}  # partition 0 went elsewhere: freed
    await _rebuilt(ownership)
    assert rebuilder.calls[-1] == (kept, 3)  # the kept state only catches up its tail
    assert ownership.owned == {3} and ownership.epochs[3] == 3


async def test_a_revoke_during_a_rebuild_leaves_the_partition_unowned() -> None:
    consumer, rebuilder = FakeConsumer(), FakeRebuilder()
    ownership, _ = _ownership(consumer, rebuilder)
    rebuilder.release.clear()
    assigned = consumer.assign_homes(1)
    ownership.assigned(assigned)
    await asyncio.sleep(0)
    await ownership.revoked(assigned)
    assert ownership.rebuilding == {} and ownership.owned == set()


async def test_a_chain_that_cannot_be_followed_holds_the_partition() -> None:
    consumer, rebuilder = FakeConsumer(), FakeRebuilder()
    ownership, crashes = _ownership(consumer, rebuilder)
    rebuilder.broken[2] = "batch log begins at offset 9"
    assigned = consumer.assign_homes(2)
    ownership.assigned(assigned)
    await _rebuilt(ownership)
    assert ownership.held == {2: "batch log begins at offset 9"}
    assert ownership.held_reasons() == ["home partition 2 held: batch log begins at offset 9"]
    assert ownership.owned == set() and 2 not in ownership.states
    assert consumer.paused == set(assigned) and consumer.sought == []
    assert crashes == []
    await ownership.revoked(assigned)
    assert ownership.held == {}  # a revoke clears it: the next owner tries again


async def test_a_defect_in_a_rebuild_stops_the_worker() -> None:
    consumer, rebuilder = FakeConsumer(), FakeRebuilder()
    ownership, crashes = _ownership(consumer, rebuilder)
    rebuilder.defects[0] = ValueError("a bug")
    ownership.assigned(consumer.assign_homes(0))
    await _rebuilt(ownership)
    assert [str(e) for e in crashes] == ["a bug"]
    assert ownership.owned == set() and ownership.rebuilding == {}


async def test_a_resync_voids_prepared_batches_and_reads_on_from_the_new_head() -> None:
    consumer, rebuilder = FakeConsumer(), FakeRebuilder()
    ownership, _ = _ownership(consumer, rebuilder)
    rebuilder.heads[1] = ChainHead(4, usage_next=10, rerouted_next=2)
    ownership.assigned(consumer.assign_homes(1))
    await _rebuilt(ownership)
    rebuilder.heads[1] = ChainHead(6, usage_next=25, rerouted_next=2)  # a zombie came first
    await ownership.resync(1)
    assert ownership.epochs[1] == 2
    assert ownership.states[1].head.offset == 6
    assert consumer.sought[-2:] == [(_tp(TOPICS.usage, 1), 25), (_tp(TOPICS.rerouted, 1), 2)]


@pytest.mark.parametrize("during", ["revoke", "broken"])
async def test_a_resync_of_a_partition_lost_meanwhile_does_not_seek(during: str) -> None:
    consumer, rebuilder = FakeConsumer(), FakeRebuilder()
    ownership, _ = _ownership(consumer, rebuilder)
    assigned = consumer.assign_homes(1)
    ownership.assigned(assigned)
    await _rebuilt(ownership)
    sought = list(consumer.sought)
    if during == "broken":
        rebuilder.broken[1] = "gone"
        await ownership.resync(1)
        assert ownership.held == {1: "gone"}
    else:
        rebuilder.release.clear()
        resync = asyncio.ensure_future(ownership.resync(1))
        await asyncio.sleep(0)
        await ownership.revoked(assigned)
        rebuilder.release.set()
        await resync
    assert consumer.sought == sought and ownership.owned == set()
