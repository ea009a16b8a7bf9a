"""How a replay takes a date over from the live pipeline on every host: fences.

Workers on other hosts keep adding sums of the date while a replay reads it, and the
replay cannot see their memory. So the replay draws a line in each home partition's batch
log (:mod:`streams.kafka.batch_log`), where every worker and the summary writer will meet it:

1. :func:`append_fences`: per partition, follow the chain to its head and append a
   :class:`~streams.kafka.batch_log.Fence` that extends it, naming the positions up to which the
   replay counts the date: the larger of the replay's own end (the partition's end when
   it started) and the head's positions (what the workers have read already). If a worker
   appended first, the fence is not in the chain: follow again and append another.
2. The workers meet the fence when their next append lands after it (they catch up from
   the log); from then on they leave the date's events below the fence out of their sums
   (those are the replay's) and count only later ones.
3. The summary writer stops at the fence until the replay is complete
   (``replay_runs``), so no sum of the date from after the fence can be wiped by it.
4. :func:`apply_up_to_fences`: the replay adds every record before its fences itself (the
   writer may be doing the same: each record counts once, see tables/summary_db/batch_apply.py),
   then replaces the date in one transaction (tables/summary_db/replay_store.py): the date's
   pending sums came from records before the fences, all of which the replay re-read.
   The fences themselves it leaves to the summary writer, so the stored position of each
   partition stays at its fence until the replace commits.

A replay that fails after fencing leaves the writer waiting at the fences (``/ready`` says
so): the workers already left the date's events below them out, so only a replay of the
date may complete it. Run ``usage-stream replay --date D`` again. That holds for a writer
restarted meanwhile too: it starts reading at the stored position, the fence, and meets it
again. (Had the replay applied its fences, a replay killed between that transaction and
the replace left the stored position past them: a restarted writer, or one whose position
had been refreshed from the database, went on past the fences without waiting, and the
date's events below them were billed by nobody.) For the same reason a replay of another
date is refused until then, before it appends a fence (:class:`UnfinishedReplay`, one
line): it would apply the batch log past the unfinished fences (step 4 applies every
record before its own), and a writer restarted after that would start past them.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from agents.hot_path.home_partition import ReplayFence
from agents.hot_path.home_state import follow_chain, read_range
from agents.replay.topic_slice import ReplayReadError
from streams.kafka.batch_log import (
    BadChainRecord,
    ChainHead,
    Fence,
    RawLogRecord,
    decode_rows_raw,
    encode,
    record_mark,
)
from streams.kafka.broker import BOUNDED_READ_WAIT_MS, groupless_consumer, kafka_client_kwargs
from streams.settings import Settings
from tables.summary_db.batch_apply import ApplyResult, BatchApplier, StoredHead

__all__ = ["PartitionFence", "UnfinishedReplay", "append_fences", "apply_up_to_fences"]


class UnfinishedReplay(ReplayReadError):
    """A replay of another date fenced the batch log past the summary writer's position
    and has not completed (it is running, or it died after fencing)."""


T = TypeVar("T")

# replays that registered and did not complete, with no later complete replay of their date
_UNFINISHED = """
    SELECT r.usage_date, r.replay_id FROM replay_runs r
    WHERE r.status != 'complete' AND NOT EXISTS (
        SELECT 1 FROM replay_runs l
        WHERE l.usage_date = r.usage_date AND l.status = 'complete'
            AND l.started_at > r.started_at)
    ORDER BY r.started_at
"""


def _unfinished_replays(path: Path) -> dict[str, str]:
    """usage date -> the latest unfinished replay of it (``_UNFINISHED``)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
    try:
        return dict(conn.execute(_UNFINISHED).fetchall())
    finally:
        conn.close()


def _refuse_past(met: Mapping[str, ReplayFence], unfinished: Mapping[str, str]) -> None:
    """Raise :class:`UnfinishedReplay` when a fence met is of an unfinished replay's date."""
    blocking = sorted(set(met) & set(unfinished))
    if blocking:
        usage_date = blocking[0]
        raise UnfinishedReplay(
            f"replay {unfinished[usage_date]} of {usage_date} has not finished (it is"
            f" running, or it stopped after fencing): run `usage-stream replay --date"
            f" {usage_date}` first; nothing changed"
        )


@dataclass(frozen=True, slots=True)
class PartitionFence:
    partition: int
    offset: int  # of the valid fence in the batch log
    usage_end: int
    rerouted_end: int


async def append_fences(
    settings: Settings,
    replay_id: str,
    day: str,
    heads: Mapping[int, StoredHead],
    usage_ends: Mapping[int, int],
    rerouted_ends: Mapping[int, int],
) -> dict[int, PartitionFence]:
    """One valid fence per batch-log partition (module docstring, step 1). Raises
    :class:`UnfinishedReplay` when the log holds, past the stored positions, a fence of
    another date whose replay has not completed (module docstring), before appending
    any fence when that fence was there already.

    The partitions are fenced concurrently, each with its own consumer: a partition's
    chain is its own, and one after another each look at a log's end waited out a
    bounded Fetch (0.4-0.6 s of the replay for 4 partitions)."""
    unfinished = await asyncio.to_thread(_unfinished_replays, settings.summary_db_path)
    unfinished.pop(day, None)  # this replay completes its own date's
    client = kafka_client_kwargs(settings)
    partitions = sorted(usage_ends)
    consumers = [
        groupless_consumer(settings, fetch_max_wait_ms=BOUNDED_READ_WAIT_MS) for _ in partitions
    ]
    producer = AIOKafkaProducer(acks="all", **client)
    started: list[AIOKafkaConsumer] = []
    try:
        for consumer in consumers:
            await consumer.start()
            started.append(consumer)
        await producer.start()
        if unfinished:  # look before appending anything

            async def look(consumer: AIOKafkaConsumer, partition: int) -> None:
                stored = heads.get(partition)
                _, met, _ = await follow_chain(
                    consumer,
                    settings.batch_log_topic,
                    partition,
                    stored.head if stored else ChainHead(),
                    stored.next_offset if stored else 0,
                )
                _refuse_past(met, unfinished)

            await _all(map(look, consumers, partitions))

        async def fence(consumer: AIOKafkaConsumer, partition: int) -> PartitionFence:
            stored = heads.get(partition)
            head = stored.head if stored else ChainHead()
            start = stored.next_offset if stored else 0
            while True:
                head, met, end = await follow_chain(
                    consumer, settings.batch_log_topic, partition, head, start
                )
                _refuse_past(met, unfinished)  # one appended since the look
                usage_end = max(usage_ends[partition], head.usage_next)
                rerouted_end = max(rerouted_ends.get(partition, 0), head.rerouted_next)
                record = Fence(head.offset, replay_id, day, usage_end, rerouted_end)
                sent = await producer.send_and_wait(
                    settings.batch_log_topic, encode(record), partition=partition
                )
                if sent.offset == end:  # nothing came between the head and the fence
                    return PartitionFence(partition, sent.offset, usage_end, rerouted_end)
                start = end  # a worker appended first: follow on from there

        fenced = await _all(map(fence, consumers, partitions))
    finally:
        await producer.stop()
        for consumer in started:
            await consumer.stop()
    return {f.partition: f for f in fenced}


async def _all(steps: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``steps`` concurrently; on the first error the others are cancelled (and
    awaited: nothing keeps using the consumers being stopped) and the error is raised."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def apply_up_to_fences(
    settings: Settings, applier: BatchApplier, fences: Mapping[int, PartitionFence]
) -> ApplyResult:
    """Step 4's first half: every batch-log record before each fence, applied once; the
    fence is not (module docstring, step 4)."""
    heads = await asyncio.to_thread(applier.heads)
    ranges = {}
    for partition, fence in fences.items():
        stored = heads.get(partition)
        start = stored.next_offset if stored else 0
        if start < fence.offset:
            ranges[partition] = (start, fence.offset)
    if not ranges:
        # the writer applied everything before the fences. (No consumer either: aiokafka
        # 0.14 raises CancelledError from stop() when nothing was awaited since start().)
        return ApplyResult()
    consumer = groupless_consumer(
        settings,
        fetch_max_wait_ms=BOUNDED_READ_WAIT_MS,
    )
    await consumer.start()
    records: list[tuple[int, int, RawLogRecord | None]] = []
    marks: dict[int, tuple[int, str]] = {}
    try:
        for partition, (start, end) in sorted(ranges.items()):
            tp = TopicPartition(settings.batch_log_topic, partition)
            async for batch in read_range(consumer, tp, start, end):
                for record in batch:
                    try:
                        decoded: RawLogRecord | None = decode_rows_raw(record.value)
                    except BadChainRecord:
                        decoded = None
                    records.append((partition, record.offset, decoded))
                    marks[partition] = (record.offset, record_mark(record))
    finally:
        await consumer.stop()
    result, _ = await asyncio.to_thread(applier.apply, records, marks)
    return result
