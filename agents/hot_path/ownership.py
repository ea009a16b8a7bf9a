"""Which home partitions this worker owns, and where each is read from.

A home partition p is partition p of the usage topic and of the rerouted topic, given to
one member by the sticky assignor (:mod:`agents.hot_path.home_assignor`). Between its
assignment and its first batch, its state is rebuilt up to the batch log's chain head
(:class:`agents.hot_path.home_state.Rebuilder`), paused meanwhile; then it is *owned*:
sought to the head's positions, resumed, read.

Every change of ownership or state bumps the partition's **epoch**: a batch prepared
under an older epoch (:attr:`agents.hot_path.batch.PreparedBatch.epochs`) leaves that
partition out and never appends for it. A partition whose batch log cannot be followed is
**held**: paused, never given a new chain on top of the old one, and named on ``/ready``.

The seeks are kept here too (:meth:`Ownership.seek`): the reader drops whatever was
fetched of a partition before its last seek, and takes a chunk only where the last one
ended (:mod:`agents.hot_path.batch_reader`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from aiokafka import TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from agents.hot_path.batch import Topics
from agents.hot_path.home_partition import HomePartition
from agents.hot_path.home_state import ChainBroken, Rebuilder
from streams.metrics import CONSUMER_LAG, HOME_PARTITIONS_HELD

__all__ = ["Consumer", "Ownership", "RebalanceListener", "Retry"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class Consumer(Protocol):
    """What ownership does with the hot path's ``AIOKafkaConsumer``."""

    def assignment(self) -> set[TopicPartition]: ...

    def partitions_for_topic(self, topic: str) -> set[int] | None: ...

    def pause(self, *partitions: TopicPartition) -> None: ...

    def resume(self, *partitions: TopicPartition) -> None: ...

    def seek(self, partition: TopicPartition, offset: int) -> None: ...

    async def beginning_offsets(
        self, partitions: list[TopicPartition]
    ) -> dict[TopicPartition, int]: ...


class Retry(Protocol):
    """Runs a stage until it succeeds, reporting failures once (the service's
    ``until_done``): a rebuild waits out a broker outage, never gives up on a partition."""

    def __call__(self, stage: str, step: Callable[[], Awaitable[T]]) -> Awaitable[T]: ...


class Ownership:
    """This worker's home partitions: assigned, rebuilding, owned or held, their states,
    epochs and read positions (module docstring)."""

    def __init__(
        self,
        consumer: Consumer,
        topics: Topics,
        make_rebuilder: Callable[[int], Rebuilder],
        retry: Retry,
        crash: Callable[[BaseException], Awaitable[None]],
        settle: Callable[[], Awaitable[bool]],
    ) -> None:
        """``make_rebuilder(partitions)`` at the first assignment (the partition count is
        known then); ``crash`` stops the worker on a defect; ``settle`` waits (bounded)
        for the batch being committed before a revoke takes its partitions."""
        self.consumer = consumer
        self.topic = topics.usage
        self.rerouted_topic = topics.rerouted
        self._make_rebuilder = make_rebuilder
        self._retry = retry
        self._crash = crash
        self._settle = settle
        self.partitions = 0  # of the usage topic (= of the rerouted topic and batch log)
        self.rebuilder: Rebuilder | None = None
        self.states: dict[int, HomePartition] = {}  # kept after a revoke: caught up on reuse
        self.owned: set[int] = set()
        #: home partitions assigned but held: their batch log cannot be followed (why)
        self.held: dict[int, str] = {}
        #: assigned home partitions whose state is being rebuilt (paused meanwhile)
        self.rebuilding: dict[int, asyncio.Future[None]] = {}
        self.joined = False  # an assignment is in force (False from a revoke to the next)
        self.epochs: dict[int, int] = {}
        self.committed: dict[tuple[str, int], int] = {}  # (topic, partition) -> next offset
        self.seeks: dict[TopicPartition, int] = {}  # seeks we made, per partition
        self.next_read: dict[TopicPartition, int] = {}  # where the next record must be

    # Assignment -------------------------------------------------------------------------

    def assigned(self, assigned: list[TopicPartition]) -> None:
        """Pause the new home partitions and rebuild their states in the background.

        Nothing waits here: aiokafka runs this callback inside its join, where no
        heartbeat is sent, and a rebuild (every request id of ``LEDGER_RETENTION_DAYS``)
        can outlast the session timeout: a member expelled mid-rebuild, a reshuffle, a
        rebalance storm. So each partition is paused until :meth:`_rebuild` has brought
        its state up to the chain head, then sought there and resumed; meanwhile the
        group sees a live member, and the other partitions are consumed. States of
        partitions not assigned again are freed now (aiokafka revokes everything at
        every rebalance: kept ones only catch up the tail)."""
        if self.rebuilder is None:
            self.partitions = len(self.consumer.partitions_for_topic(self.topic) or ())
            self.rebuilder = self._make_rebuilder(self.partitions)
        homes = sorted({tp.partition for tp in assigned if tp.topic == self.topic})
        for partition in set(self.states) - set(homes):
            del self.states[partition]
        self.consumer.pause(*assigned)
        for partition in homes:
            self.rebuilding[partition] = asyncio.ensure_future(self._rebuild(partition))
        self.joined = True
        log.info("hot path: assigned home partitions %s; rebuilding their state", homes)

    async def _rebuild(self, partition: int) -> None:
        """One assigned home partition up to its chain head, then owned and read from
        the head's positions (:meth:`assigned`)."""
        assert self.rebuilder is not None
        rebuilder = self.rebuilder
        try:
            state = await self._retry(
                "rebuild", lambda: rebuilder.catch_up(self.states.get(partition), partition)
            )
            offsets = await self.head_offsets(state)
        except ChainBroken as broken:
            self.hold(partition, str(broken))
            return
        except Exception as error:  # a defect: never a partition paused for ever in silence
            log.exception("hot path: rebuilding home partition %d failed; stopping", partition)
            await self._crash(error)
            return
        finally:
            self.rebuilding.pop(partition, None)
        tps = [tp for tp in self.consumer.assignment() if tp.partition == partition]
        if not tps:  # revoked meanwhile
            return
        # from here to the seeks without an await: the loop fetches meanwhile, and a
        # record of an owned partition read from anywhere but the head would be claimed
        # as read from the head on (lost, if this worker died before reading the stretch
        # in between)
        self.states[partition] = state
        self.owned.add(partition)
        self.epochs[partition] = self.epochs.get(partition, 0) + 1
        self.move_to_head(state, offsets)
        self.consumer.resume(*tps)
        log.info("hot path: home partition %d rebuilt; consuming", partition)

    async def resync(self, partition: int) -> None:
        """After an append that lost a race (another record came first on the chain):
        void what was prepared for ``partition`` (a new epoch), catch its state up from
        the log, and read on from the new head; hold it when the chain breaks."""
        state = self.states.get(partition)
        if state is None or partition not in self.owned:
            return  # revoked meanwhile: its next owner catches up
        self.epochs[partition] = self.epochs.get(partition, 0) + 1
        epoch = self.epochs[partition]
        assert self.rebuilder is not None
        try:
            state = await self.rebuilder.catch_up(state, partition)
        except ChainBroken as broken:
            self.hold(partition, str(broken))
            return
        offsets = await self.head_offsets(state)
        if partition not in self.owned or self.epochs[partition] != epoch:
            return  # revoked (or rebuilt) during the catch-up
        self.states[partition] = state
        self.move_to_head(state, offsets)

    async def head_offsets(self, state: HomePartition) -> dict[TopicPartition, int]:
        """Where the partition's usage and rerouted records are read from: the chain
        head's positions, or each partition's first offset while there is no chain."""
        head = state.head
        offsets = {}
        for topic, offset in (
            (self.topic, head.usage_next),
            (self.rerouted_topic, head.rerouted_next),
        ):
            tp = TopicPartition(topic, state.partition)
            if tp not in self.consumer.assignment():
                continue
            if head.offset < 0:
                offset = (await self.consumer.beginning_offsets([tp]))[tp]
            offsets[tp] = offset
        return offsets

    def move_to_head(self, state: HomePartition, offsets: dict[TopicPartition, int]) -> None:
        """Seek to :meth:`head_offsets` (synchronous, see :meth:`_rebuild`)."""
        for tp, offset in offsets.items():
            if state.head.offset >= 0:
                self.committed[(tp.topic, tp.partition)] = offset
            self.seek(tp, offset)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Move ``tp`` to ``offset``: what was fetched before is dropped (``seeks``),
        and the next records read must start there (``next_read``)."""
        self.seeks[tp] = self.seeks.get(tp, 0) + 1
        self.consumer.seek(tp, offset)
        self.next_read[tp] = offset

    def hold(self, partition: int, reason: str) -> None:
        """Stop reading a home partition whose batch log cannot be followed: it is never
        given a new chain on top of the old one (``/ready`` names it until it is fixed
        and the worker restarted, or the partition moves away)."""
        self.held[partition] = reason
        HOME_PARTITIONS_HELD.set(len(self.held))
        self.owned.discard(partition)
        self.epochs[partition] = self.epochs.get(partition, 0) + 1
        self.states.pop(partition, None)
        log.error("hot path: home partition %d held: %s", partition, reason)
        self.consumer.pause(
            *(
                tp
                for tp in self.consumer.assignment()
                if tp.partition == partition and tp.topic in (self.topic, self.rerouted_topic)
            )
        )

    async def revoked(self, revoked: list[TopicPartition]) -> None:
        """Finish the append in flight (briefly) and stop the rebuilds of the revoked
        partitions; the states stay until the next assignment says whether they are
        still ours."""
        self.joined = False
        await self._settle()
        homes = {tp.partition for tp in revoked if tp.topic == self.topic}
        stopping = [task for p, task in self.rebuilding.items() if p in homes]
        for task in stopping:
            task.cancel()
        await asyncio.gather(*stopping, return_exceptions=True)
        for tp in revoked:
            if tp.topic == self.topic:
                self.owned.discard(tp.partition)
                self.held.pop(tp.partition, None)
                HOME_PARTITIONS_HELD.set(len(self.held))
                self.epochs[tp.partition] = self.epochs.get(tp.partition, 0) + 1
                with contextlib.suppress(KeyError):
                    CONSUMER_LAG.remove(self.topic, str(tp.partition))
            self.committed.pop((tp.topic, tp.partition), None)

    # What it tells ----------------------------------------------------------------------

    def assigned_partitions(self) -> list[int]:
        return sorted(tp.partition for tp in self.consumer.assignment() if tp.topic == self.topic)

    def owned_states(self) -> list[HomePartition]:
        """The states of the owned partitions, in partition order."""
        return [self.states[p] for p in sorted(self.owned) if p in self.states]

    def held_reasons(self) -> list[str]:
        """One ``/ready`` reason per held partition."""
        return [f"home partition {p} held: {why}" for p, why in sorted(self.held.items())]


class RebalanceListener(ConsumerRebalanceListener):
    """aiokafka's rebalance callbacks, handed to :class:`Ownership`."""

    def __init__(self, ownership: Ownership) -> None:
        self.ownership = ownership

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.ownership.revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.ownership.assigned(assigned)
