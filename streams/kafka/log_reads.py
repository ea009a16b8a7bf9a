"""Bounded reads of one Kafka partition: a range of records, its bounds, one record.

Every reader that must end (a rebuild, the replay, the log guard, fences) reads through
here, and never trusts ListOffsets *latest*: the test broker answers it wrongly (the base
offset of the last record batch + 1), while the high watermark carried by Fetch responses
is right. A read past a partition's end does not fail on the test broker either (it
answers nothing), so the end is always looked up first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from streams.kafka.batch_log import BadChainRecord, BatchPart, decode_rows_raw
from streams.kafka.broker import BOUNDED_READ_WAIT_MS

__all__ = ["STALL_SECONDS", "first_chain_prev", "partition_bounds", "read_range", "record_at"]

log = logging.getLogger(__name__)

#: A read that does not move for this long fails (and is retried by the caller).
STALL_SECONDS = 60.0


async def partition_bounds(consumer: AIOKafkaConsumer, tp: TopicPartition) -> tuple[int, int]:
    """``(beginning, end)`` of ``tp``: its first offset and its high watermark, from one
    Fetch at the beginning (which also tells the watermark of an empty partition)."""
    consumer.assign([tp])
    beginning = (await consumer.beginning_offsets([tp]))[tp]
    consumer.seek(tp, beginning)
    deadline = time.monotonic() + STALL_SECONDS
    while consumer.highwater(tp) is None:
        await consumer.getmany(tp, timeout_ms=2 * BOUNDED_READ_WAIT_MS, max_records=1)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{tp}: no Fetch answer in {STALL_SECONDS:.0f} s")
    end = consumer.highwater(tp)
    assert end is not None
    return beginning, max(end, beginning)


async def record_at(
    consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int, bounds: tuple[int, int]
) -> ConsumerRecord | None:
    """The record at ``offset`` of ``tp``, or None when the partition does not hold it
    (``bounds`` from :func:`partition_bounds`)."""
    beginning, end = bounds
    if not beginning <= offset < end:
        return None
    async for records in read_range(consumer, tp, offset, offset + 1):
        for record in records:
            if record.offset == offset:
                return record
    return None  # a gap at that offset (compaction, a transaction marker)


async def first_chain_prev(
    consumer: AIOKafkaConsumer, tp: TopicPartition, bounds: tuple[int, int]
) -> int | None:
    """``prev`` of the first chain record at the beginning of a batch-log partition (-1
    for a chain's start; anything else: the start was deleted), or None when the
    partition holds no chain record."""
    beginning, end = bounds
    if beginning >= end:
        return None
    async for records in read_range(consumer, tp, beginning, end):
        for record in records:
            try:
                decoded = decode_rows_raw(record.value)
            except BadChainRecord:
                continue
            if not isinstance(decoded, BatchPart):
                return decoded.prev
    return None


async def read_range(
    consumer: AIOKafkaConsumer, tp: TopicPartition, start: int, end: int | None
) -> AsyncIterator[list[ConsumerRecord]]:
    """Records of ``tp`` from ``start`` up to ``end`` (exclusive), or to the high watermark
    seen in Fetch responses when ``end`` is None."""
    consumer.assign([tp])
    consumer.seek(tp, start)
    position, moved = start, time.monotonic()
    while True:
        highwater = consumer.highwater(tp)
        target = end if end is not None else highwater
        if target is not None and position >= target:
            return
        try:
            # short: at the end of a log, getmany would sit out its whole timeout after
            # the Fetch that told the high watermark (0.5 s per partition per look)
            fetched = await consumer.getmany(tp, timeout_ms=2 * BOUNDED_READ_WAIT_MS)
        except KafkaError as error:
            if time.monotonic() - moved > STALL_SECONDS:
                raise
            log.warning("reading %s failed, retrying: %s", tp, error)
            await asyncio.sleep(1)
            continue
        records = fetched.get(tp, [])
        if end is not None:
            records = [record for record in records if record.offset < end]
        if records:
            position = records[-1].offset + 1
            moved = time.monotonic()
            yield records
        else:
            position = max(position, await consumer.position(tp))
            if end is None and consumer.highwater(tp) is not None:
                if position >= consumer.highwater(tp):
                    return
            if time.monotonic() - moved > STALL_SECONDS:
                raise TimeoutError(f"{tp} stopped at offset {position} before {target}")
