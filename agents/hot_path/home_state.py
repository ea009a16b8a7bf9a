"""How a home partition's state (:class:`agents.hot_path.home_partition.HomePartition`)
is (re)built exactly: :class:`Rebuilder`, and :func:`follow_chain`, which the replay's
fences share.

What the seen set must hold is *defined* by the chain head: every request id of a valid
event homed at p below the head's positions (usage partition p: events at home only;
rerouted partition p: all). So the state moves with the partition by rebuild from the
topics, never by trusting a copy:

1. follow partition p's batch log from what is known (nothing, or the state's head) to
   its end with the chain rule;
2. read usage p and rerouted p from where the state's ids end (or ``DEDUP_TTL_DAYS``
   ago) up to the new head's positions, validate, and add the home events' ids.

A worker that is assigned p, a worker whose append lost a race (a zombie came first, or a
replay's fence), and a restart with an empty ``DATA_DIR`` all run the same two steps. Ids
read back are remembered from the time of the rebuild, so they live at least
``DEDUP_TTL_DAYS`` from then ("at least the TTL").

Reads never trust ListOffsets *latest* (wrong on the test broker): the end of a read is
the target offset, or the high watermark carried by Fetch responses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition

from agents.hot_path.home_partition import HomePartition, ReplayFence
from agents.hot_path.rebuild_ids import ChainBatches, HomeTopics, read_home_ids
from agents.hot_path.snapshots import SnapshotKeeper, usable_snapshot
from streams.kafka.batch_log import (
    BadChainRecord,
    BatchPart,
    Chain,
    ChainHead,
    ChainRecord,
    Fence,
    decode_rows_raw,
    record_mark,
)
from streams.kafka.broker import BOUNDED_READ_WAIT_MS, kafka_client_kwargs
from streams.kafka.log_reads import partition_bounds, read_range, record_at
from streams.metrics import REBUILD_IDS
from streams.settings import Settings
from tables.dedupe.seen_requests import SeenRequests

__all__ = [
    "ChainBroken",
    "LogReplaced",
    "Rebuilder",
    "follow_chain",
    "read_range",
]
# (read_range is streams.kafka.log_reads's; importable from here for the replay's readers)

log = logging.getLogger(__name__)

#: A catch-up that reads back at least this many ids is snapshotted at once.
REBUILT_SNAPSHOT_IDS = 10_000
#: catch-ups (home partition rebuilds) at once, each with its own reader
CONCURRENT_CATCH_UPS = 4


class Rebuilder:
    """Builds and catches up :class:`HomePartition` states from the topics."""

    def __init__(self, settings: Settings, partitions: int) -> None:
        self.settings = settings
        self.partitions = partitions
        self.ttl_ms = int(settings.ledger_retention_days * 86_400_000)
        #: open group-less readers not in use, and how many catch-ups run at once
        self._idle: list[AIOKafkaConsumer] = []
        self._slots = asyncio.Semaphore(CONCURRENT_CATCH_UPS)
        #: seen-set snapshots: loaded by a fresh catch-up, written after a long one
        self.snapshots: SnapshotKeeper | None = SnapshotKeeper(
            settings.DATA_DIR, settings.batch_log_topic, self.ttl_ms
        )

    async def _reader(self) -> AIOKafkaConsumer:
        """A group-less consumer for one catch-up, kept open for the next: starting one
        per catch-up cost ~2.5 s each (bootstrap, metadata, and a Fetch that waits out
        ``fetch_max_wait_ms`` on an empty batch log). A short ``fetch_max_wait_ms``: it
        reads up to known ends, never waits for new records."""
        if self._idle:
            return self._idle.pop()
        consumer = AIOKafkaConsumer(
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=8 * 1024 * 1024,
            fetch_max_wait_ms=BOUNDED_READ_WAIT_MS,
            **kafka_client_kwargs(self.settings),
        )
        await consumer.start()
        return consumer

    async def stop(self) -> None:
        idle, self._idle = self._idle, []
        for consumer in idle:
            await consumer.stop()

    def empty(self, partition: int) -> HomePartition:
        return HomePartition(partition, SeenRequests(self.ttl_ms))

    async def catch_up(self, state: HomePartition | None, partition: int) -> HomePartition:
        """``state`` brought up to the end of the chain (a new state when None, or when
        the log is not the one ``state`` was read from). Raises :class:`ChainBroken` when
        the partition must be held. Up to :data:`CONCURRENT_CATCH_UPS` run at once, each
        on a reader of its own: a worker assigned four partitions rebuilds them together
        (one at a time, four empty partitions took ~1.7 s of a cold start)."""
        async with self._slots:
            consumer = await self._reader()
            try:
                state = await self._catch_up(consumer, state, partition)
            except BaseException:
                await consumer.stop()  # a fresh reader for the retry
                raise
            # no fetching in the background until its next catch-up, whose assign()
            # replaces the assignment (pausing leaves the subscription state alone; with
            # unsubscribe() a following catch-up once took over 10 s on a loaded machine)
            consumer.pause(*consumer.assignment())
            self._idle.append(consumer)
            return state

    async def _catch_up(
        self, consumer: AIOKafkaConsumer, state: HomePartition | None, partition: int
    ) -> HomePartition:
        started = time.monotonic()
        loaded = 0
        fresh = state is None
        if state is None:
            state = await self._from_snapshot(consumer, partition)
            loaded = len(state.seen)
        before = state.head
        if fresh:  # from the retention's start, or the snapshot's positions if later
            usage_from, rerouted_from = await self._ttl_starts(consumer, partition)
            usage_from = max(usage_from, before.usage_next)
            rerouted_from = max(rerouted_from, before.rerouted_next)
        else:
            usage_from, rerouted_from = before.usage_next, before.rerouted_next
        batches = self._batches(state, usage_from, rerouted_from)
        try:
            head, fences = await self._follow(consumer, partition, state, batches)
        except LogReplaced as replaced:
            log.warning("home partition %d: %s; rebuilding its state", partition, replaced)
            fresh, state, loaded = True, self.empty(partition), 0
            before = state.head
            usage_from, rerouted_from = await self._ttl_starts(consumer, partition)
            batches = self._batches(state, usage_from, rerouted_from)
            head, fences = await self._follow(consumer, partition, state, batches)
        if fresh:
            await self._check_positions(consumer, partition, head)
        ids = await read_home_ids(
            consumer,
            HomeTopics(self.settings.USAGE_TOPIC, self.settings.rerouted_topic, self.partitions),
            partition,
            batches,
            head.usage_next,
            head.rerouted_next,
            state.seen,
            time.time_ns() // 1_000_000,
        )
        state.head = head
        state.fences.update(fences)
        REBUILD_IDS.labels(source="topics").inc(ids)
        if ids or loaded or state.head != before:
            log.info(
                "home partition %d: chain head %d (usage %d, rerouted %d), %d ids loaded from"
                " a snapshot, %d ids read back in %.1f s",
                partition,
                state.head.offset,
                state.head.usage_next,
                state.head.rerouted_next,
                loaded,
                ids,
                time.monotonic() - started,
            )
        if self.snapshots is not None and ids >= REBUILT_SNAPSHOT_IDS:
            self.snapshots.start(state)  # the next restart reads only what comes after
        return state

    def _batches(self, state: HomePartition, usage_from: int, rerouted_from: int) -> ChainBatches:
        fences = {f.usage_date: (f.usage_end, f.rerouted_end) for f in state.fences.values()}
        return ChainBatches(fences, usage_from, rerouted_from)

    async def _from_snapshot(self, consumer: AIOKafkaConsumer, partition: int) -> HomePartition:
        """The state of the newest usable snapshot (agents/hot_path/snapshots.py), else empty."""
        if self.snapshots is None:
            return self.empty(partition)

        async def why_not(head: ChainHead) -> str | None:
            try:
                await self._check_positions(consumer, partition, head)
            except ChainBroken as broken:
                return str(broken)
            return None

        snapshot = await usable_snapshot(
            consumer,
            self.snapshots.folder,
            self.settings.batch_log_topic,
            partition,
            self.ttl_ms,
            why_not,
        )
        if snapshot is None:
            return self.empty(partition)
        state = HomePartition(
            partition,
            snapshot.seen(self.ttl_ms),
            head=snapshot.head,
            fences={
                f["usage_date"]: ReplayFence(f["usage_date"], f["usage_end"], f["rerouted_end"])
                for f in snapshot.fences
            },
            log_end=snapshot.head.offset + 1,
        )
        state.seen.prune(time.time_ns() // 1_000_000)
        REBUILD_IDS.labels(source="snapshot").inc(len(state.seen))
        self.snapshots.noted(state)
        return state

    async def _follow(
        self,
        consumer: AIOKafkaConsumer,
        partition: int,
        state: HomePartition,
        batches: ChainBatches | None = None,
    ) -> tuple[ChainHead, dict[str, ReplayFence]]:
        head, fences, end = await follow_chain(
            consumer,
            self.settings.batch_log_topic,
            partition,
            state.head,
            state.log_end,
            on_link=batches,
        )
        state.log_end = end
        return head, fences

    async def _check_positions(
        self, consumer: AIOKafkaConsumer, partition: int, head: ChainHead
    ) -> None:
        """The chain head's positions must be positions in *these* usage and rerouted
        topics: the record before each must be the one the chain read there (its mark).
        A recreated topic (or a new cluster under a kept batch log) holds another record
        or none, and reading it from the head would skip what it holds below the head."""
        for topic, position, mark in (
            (self.settings.USAGE_TOPIC, head.usage_next, head.usage_mark),
            (self.settings.rerouted_topic, head.rerouted_next, head.rerouted_mark),
        ):
            if not position or not mark:
                continue
            tp = TopicPartition(topic, partition)
            bounds = await partition_bounds(consumer, tp)
            if bounds[0] > position - 1:
                continue  # the record is gone (retention), and so is everything before it
            record = await record_at(consumer, tp, position - 1, bounds)
            if record is None or record_mark(record) != mark:
                raise ChainBroken(
                    f"{topic} partition {partition} is not the topic the batch log's chain"
                    f" read: its record at offset {position - 1} is "
                    + ("missing" if record is None else "another one")
                    + " (a recreated topic, or a new cluster under the old batch log);"
                    " the partition is held. Delete the batch-log topic and restart the"
                    " summary writer first: it starts the new chain"
                    " (docs/operations.md, 'A recreated topic')"
                )

    async def _ttl_starts(self, consumer: AIOKafkaConsumer, partition: int) -> tuple[int, int]:
        """Offsets of usage p and rerouted p at ``DEDUP_TTL_DAYS`` ago (their beginning
        when the lookup has no answer; the test broker answers 0, which only costs time)."""
        since = time.time_ns() // 1_000_000 - self.ttl_ms
        tps = [
            TopicPartition(self.settings.USAGE_TOPIC, partition),
            TopicPartition(self.settings.rerouted_topic, partition),
        ]
        beginning = await consumer.beginning_offsets(tps)
        found = await consumer.offsets_for_times({tp: since for tp in tps})
        starts = []
        for tp in tps:
            answer = found.get(tp)
            starts.append(max(answer.offset, beginning[tp]) if answer else beginning[tp])
        return starts[0], starts[1]


class ChainBroken(RuntimeError):
    """A batch-log partition that cannot be followed (its chain's start or a stretch the
    reader needs was deleted, or it is not the log the reader knew): the partition is
    held, never given a new chain on top of the old one. The message says what to do."""


class LogReplaced(RuntimeError):
    """The batch log ends before where this worker last read it: another log (a new
    broker at the same address). The state is rebuilt from the new log."""


async def follow_chain(
    consumer: AIOKafkaConsumer,
    topic: str,
    partition: int,
    head: ChainHead,
    start: int = -1,
    on_link: Callable[[ChainRecord], None] | None = None,
) -> tuple[ChainHead, dict[str, ReplayFence], int]:
    """Follow a batch-log partition from ``start`` (default: after ``head``) to its end.
    Returns the chain's head, the valid fences met, and the next offset after the end;
    ``on_link`` is called with each valid link, in order.

    Raises :class:`ChainBroken` when the chain cannot be followed: followed from nothing,
    its first link must start a chain; followed from a head, the records after it must
    still be there. Raises :class:`LogReplaced` when the log ends before ``start``."""
    chain = Chain(head)
    fences: dict[str, ReplayFence] = {}
    tp = TopicPartition(topic, partition)
    position = max(start, head.offset + 1)
    consumer.assign([tp])
    beginning = (await consumer.beginning_offsets([tp]))[tp]
    if position < beginning:
        if head.offset >= 0:
            raise ChainBroken(
                f"batch log {topic} partition {partition} begins at offset {beginning}:"
                f" records {position}..{beginning - 1} after the chain head this worker"
                " knows were deleted. Keep the batch log forever (retention.ms=-1);"
                " docs/operations.md, 'A truncated batch log'"
            )
        position = beginning
    first = head.offset < 0  # the first link must start a chain
    async for records in read_range(consumer, tp, position, None):
        for record in records:
            position = record.offset + 1
            try:
                decoded = decode_rows_raw(record.value)
            except BadChainRecord:
                log.warning("batch log %s: offset %d is not a chain record", tp, record.offset)
                continue
            if isinstance(decoded, BatchPart):
                continue  # rows of a batch: not a link
            if first:
                first, prev = False, decoded.prev
                if prev != -1:
                    raise ChainBroken(
                        f"batch log {topic} partition {partition} begins at offset"
                        f" {record.offset} with a record that extends offset {prev}: the"
                        " start of its chain was deleted (a truncated or copied log), so"
                        " this worker cannot tell which requests were seen; the partition"
                        " is held. Restore the topic, or recreate it empty and restart the"
                        " summary writer first (docs/operations.md, 'A truncated batch log')"
                    )
            if chain.accept(record.offset, decoded):
                if isinstance(decoded, Fence):
                    fences[decoded.usage_date] = ReplayFence(
                        decoded.usage_date, decoded.usage_end, decoded.rerouted_end
                    )
                if on_link is not None:
                    on_link(decoded)
    highwater = consumer.highwater(tp)
    if highwater is not None and highwater < position:
        raise LogReplaced(
            f"batch log {topic} partition {partition} ends at offset {highwater}, before"
            f" offset {position} this worker read: another log"
        )
    return chain.head, fences, position
