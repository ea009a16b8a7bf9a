"""The hot path's next batch: records of the owned home partitions, read in order.

:meth:`BatchReader.next_batch` collects up to ``BATCH_MAX_EVENTS`` records with
``getmany``, waiting at most ``RAW_BATCH_SECONDS`` for more (less at the end of a
backlog), and keeps a partition's chunk only when it starts where that partition was last
read or sought: a batch-log record claims its positions as read, so it must never claim
records the worker has not read. :func:`fence_order` then puts the records below a
replay's fence before those above it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import ConsumerStoppedError, KafkaError

from agents.conditions import ConditionLog
from agents.hot_path.batch import Topics
from agents.hot_path.home_partition import HomePartition
from agents.hot_path.ownership import Ownership

__all__ = ["BatchReader", "FetchingConsumer", "fence_order"]

log = logging.getLogger(__name__)


class FetchingConsumer(Protocol):
    """What the reader does with the hot path's ``AIOKafkaConsumer``."""

    def assignment(self) -> set[TopicPartition]: ...

    def highwater(self, partition: TopicPartition) -> int | None: ...

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[ConsumerRecord]]: ...


def fence_order(
    records: list[ConsumerRecord], states: Mapping[int, HomePartition], topics: Topics
) -> tuple[list[ConsumerRecord], list[tuple[TopicPartition, int]]]:
    """Below a replay's fence, read every copy before any copy above it.

    The replay counted a date's requests with a copy below the fence (in the usage or
    the rerouted topic); the worker counts those whose first copy it reads is above.
    Were an above-fence copy in one topic read before a below-fence copy in the other,
    a request would count on both sides. So while one topic of a home partition has not
    reached its fence position, records at or past the fence in the other topic wait
    (returned as seeks: the consumer goes back to them), and within a batch that reaches
    both, records below the fence come first. ``states``: the owned partitions'."""
    fenced = {p: bounds for p, state in states.items() if (bounds := state.bounds()) is not None}
    if not fenced or not records:
        return records, []
    kept: list[ConsumerRecord] = []
    later: list[ConsumerRecord] = []
    seeks: list[tuple[TopicPartition, int]] = []
    for partition, (usage_end, rerouted_end) in fenced.items():
        head = states[partition].head
        reach = {topics.usage: head.usage_next, topics.rerouted: head.rerouted_next}
        bound = {topics.usage: usage_end, topics.rerouted: rerouted_end}
        for record in records:
            if record.partition == partition and record.offset < bound[record.topic]:
                reach[record.topic] = max(reach[record.topic], record.offset + 1)
        both = all(reach[topic] >= bound[topic] for topic in bound)
        held: dict[str, int] = {}
        for record in records:
            if record.partition != partition:
                continue
            if record.offset < bound[record.topic]:
                kept.append(record)
            elif both:
                later.append(record)
            elif record.topic not in held:
                held[record.topic] = record.offset
        seeks += [(TopicPartition(topic, partition), offset) for topic, offset in held.items()]
    kept += [record for record in records if record.partition not in fenced]
    return kept + later, seeks


@dataclass(slots=True)
class BatchReader:
    """Reads the next batch of the owned home partitions (module docstring)."""

    consumer: FetchingConsumer
    ownership: Ownership
    topics: Topics
    conditions: ConditionLog
    max_events: int  # BATCH_MAX_EVENTS
    max_seconds: float  # RAW_BATCH_SECONDS
    sink_batch: int  # RAW_BATCH_SIZE, see _caught_up
    _gaps: dict[TopicPartition, tuple[int, int]] = field(default_factory=dict, init=False)
    """per partition, the last gap met (expected, found)"""

    async def next_batch(self) -> list[ConsumerRecord]:
        """The next batch, in the order the fences ask (:func:`fence_order`)."""
        records = await self._collect()
        owned = self.ownership
        states = {p: state for p, state in owned.states.items() if p in owned.owned}
        ordered, seeks = fence_order(records, states, self.topics)
        for tp, offset in seeks:
            owned.seek(tp, offset)
        return ordered

    async def _collect(self) -> list[ConsumerRecord]:
        """Up to ``max_events`` records, waiting at most ``max_seconds`` for more (less at
        the end of a backlog: :meth:`_caught_up`)."""
        limit = self.max_events
        owned, seeks, next_read = (
            self.ownership.owned,
            self.ownership.seeks,
            self.ownership.next_read,
        )
        records: list[ConsumerRecord] = []
        # (partition, its seeks when fetched, where its records start, how many)
        fetched_at: list[tuple[TopicPartition, int, int, int]] = []
        reached: dict[TopicPartition, int] = {}  # next offset after what was fetched
        deadline = time.monotonic() + self.max_seconds
        while len(records) < limit:
            wait = deadline - time.monotonic()
            if wait <= 0 and records:
                break
            if len(records) >= self.sink_batch and self._caught_up(reached):
                break  # the end of a backlog: nothing more to wait for
            try:
                fetched = await self.consumer.getmany(
                    timeout_ms=max(int(wait * 1000), 0) if records else 1000,
                    max_records=limit - len(records),
                )
            except ConsumerStoppedError:
                return []
            except KafkaError as error:
                self.conditions.failed("fetch", "fetch failed", error, logging.WARNING)
                await asyncio.sleep(1)
                break
            self.conditions.recovered("fetch", "fetch failed")
            for tp, partition_records in fetched.items():
                if tp.partition in owned:
                    fetched_at.append((tp, seeks.get(tp, 0), len(records), len(partition_records)))
                    records.extend(partition_records)
                    reached[tp] = partition_records[-1].offset + 1
            if not fetched and not records:
                break
        kept: list[ConsumerRecord] = []
        moved: set[TopicPartition] = set()
        for tp, seeks_then, start, count in fetched_at:
            chunk = records[start : start + count]
            # a partition moved back while this batch was collected (to its chain head on
            # a rebalance or a lost append, or to a fence): what was fetched before that
            # seek comes again after it
            if tp in moved or seeks.get(tp, 0) != seeks_then:
                continue
            if not self._follows_on(tp, chunk[0].offset):
                moved.add(tp)
                continue
            next_read[tp] = chunk[-1].offset + 1
            kept.extend(chunk)
        return kept

    def _caught_up(self, reached: dict[TopicPartition, int]) -> bool:
        """Whether the batch being collected reaches the end of every owned partition:
        the high watermark of its last fetch response (Tansu's ``end_offsets()`` is
        wrong, that one is right). A batch that already fills a raw-sink request
        (``RAW_BATCH_SIZE``) is then closed at once instead of waiting out
        ``RAW_BATCH_SECONDS``: the last batch of a backlog costs no idle second (about
        1 s of every benchmark run), while a light live load still makes batches of up
        to ``RAW_BATCH_SECONDS``, so the batch log gets no more records than the raw
        sink gets requests."""
        for tp in self.consumer.assignment():
            if tp.partition not in self.ownership.owned:
                continue
            highwater = self.consumer.highwater(tp)
            position = reached.get(tp, self.ownership.next_read.get(tp))
            if highwater is None or position is None or position < highwater:
                return False
        return True

    def _follows_on(self, tp: TopicPartition, first: int) -> bool:
        """Whether records starting at ``first`` follow what was read (or the seek) of
        ``tp``. A batch's positions are claimed as read in the batch log, so a skipped
        stretch would be claimed unread: its events would never be billed, and a worker
        rebuilding the partition would take their ids as seen. So on a gap the partition
        is read again from the expected offset; a gap that comes back the same is the
        log's own (compaction, transaction markers) and is taken."""
        expected = self.ownership.next_read.get(tp)
        if expected is None:  # (every owned partition was sought; the head decides anyway)
            head = self.ownership.states[tp.partition].head
            expected = head.usage_next if tp.topic == self.topics.usage else head.rerouted_next
        if first <= expected or self._gaps.get(tp) == (expected, first):
            return True
        log.warning(
            "hot path: %s %d: fetched from offset %d, expected %d; reading again from %d",
            tp.topic,
            tp.partition,
            first,
            expected,
            expected,
        )
        self._gaps[tp] = (expected, first)
        self.ownership.seek(tp, expected)
        return False
