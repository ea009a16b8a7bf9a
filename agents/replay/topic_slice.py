"""The Kafka side of ``usage-stream replay``: read a bounded slice of the usage topic.

A plain aiokafka consumer **without a group** (``group_id=None``): it never joins the live
consumer group, so it cannot trigger a rebalance of the workers, and it never commits
offsets. It ``assign()``s every partition of ``USAGE_TOPIC`` itself.

Per partition, the slice is ``[start, end)``:

* ``start`` — the first offset whose Kafka timestamp is at or after local midnight of the
  date in ``BUSINESS_TIMEZONE`` minus ``REPLAY_MARGIN_HOURS`` (``offsets_for_times``): no
  valid event of the date can have arrived earlier, since an event more than 24 h in the
  future is invalid. "No record at or after that time" means the partition has nothing to
  replay (start at its end). The answer is clamped to the partition's beginning offset
  (retention). ``--from-offsets P:O`` overrides the start of the partitions it names
  (clamped the same way; an offset past the end is an error).
* ``end`` — the partition's high watermark **as carried by the first Fetch response**
  after seeking to ``start``, i.e. its end as of the start of the replay. Events produced
  later are the live worker's business (see agents/replay/run.py for why that is safe).

With producer (CreateTime) timestamps, a record stamped more than the margin before its
event time by a skewed producer clock may sit before the start offset and is then not
read; ``--from-offsets`` (e.g. ``0:0,1:0,...``) reads such a partition from any offset.

Records are yielded as ``(partition, offset, value)`` until each partition's position
reaches its ``end``. Event time, not the Kafka timestamp, decides which records belong to
the date: the start offset only bounds how much is read.

The test broker (Tansu 0.6, see the project's TEST-BROKER notes) differs from Apache Kafka
in two ways that matter here, and the reader is correct on both:

* ListOffsets *latest* is wrong on Tansu (base offset of the last batch + 1), so
  ``end_offsets()`` / ``seek_to_end()`` are never used; the Fetch high watermark is right.
* ListOffsets *by timestamp* answers by broker arrival order and returns offset 0 (with
  timestamp -1) for a time after the newest record instead of "none". A start of 0 only
  costs time: the whole partition is read and event time still decides membership.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError, OffsetOutOfRangeError

from streams.kafka.broker import (
    BOUNDED_READ_WAIT_MS,
    BrokerUnreachable,
    groupless_consumer,
)
from streams.model.business_time import local_midnight_ms
from streams.settings import Settings

__all__ = [
    "PartitionRange",
    "ReplayReadError",
    "ReplayReader",
    "TopicNotFound",
    "choose_start",
    "parse_from_offsets",
    "replay_start_ms",
    "topic_partitions",
]

log = logging.getLogger(__name__)

PartitionBatch = tuple[int, list[ConsumerRecord]]  # (partition, records in offset order)

#: How long the first Fetch may take to report every partition's high watermark.
SNAPSHOT_TIMEOUT_SECONDS = 60.0
#: A partition whose position does not move for this long (below its end) fails the replay.
STALL_TIMEOUT_SECONDS = 120.0

#: Bytes per partition per Fetch (aiokafka's default is 1 MiB).
FETCH_PARTITION_BYTES = 8 * 1024 * 1024

_FROM_OFFSET = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


class ReplayReadError(RuntimeError):
    """The slice cannot be read; ``str()`` is one line for the operator."""


class TopicNotFound(ReplayReadError):
    """``USAGE_TOPIC`` does not exist (the replay never auto-creates it)."""


@dataclass(frozen=True, slots=True)
class PartitionRange:
    """The offsets ``[start, end)`` of one partition that the replay reads."""

    partition: int
    start: int
    end: int
    #: where ``start`` came from: ``timestamp``, ``from-offsets`` or ``end`` (no record
    #: at or after the replay's start time)
    origin: str
    #: records the range should hold were deleted (retention): the partition begins
    #: after the wanted start (:func:`range_cut`)
    cut: bool = False

    @property
    def size(self) -> int:
        return max(self.end - self.start, 0)


def replay_start_ms(day: date, settings: Settings) -> int:
    """Local midnight of ``day`` minus ``REPLAY_MARGIN_HOURS``, in epoch milliseconds."""
    return local_midnight_ms(day, settings.tz) - settings.REPLAY_MARGIN_HOURS * 3_600_000


def parse_from_offsets(text: str) -> dict[int, int]:
    """``"P:O[,P:O...]"`` → ``{partition: offset}``; ValueError with a one-line reason."""
    starts: dict[int, int] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        match = _FROM_OFFSET.match(item)
        if match is None:
            raise ValueError(f"--from-offsets: {item.strip()!r} is not PARTITION:OFFSET")
        partition, offset = int(match[1]), int(match[2])
        if partition in starts:
            raise ValueError(f"--from-offsets: partition {partition} given twice")
        starts[partition] = offset
    if not starts:
        raise ValueError("--from-offsets: expected PARTITION:OFFSET[,PARTITION:OFFSET...]")
    return starts


def choose_start(
    found_offset: int | None, beginning: int, override: int | None
) -> tuple[int | None, str]:
    """The start of one partition: ``(offset or None for "at the end", origin)``.

    ``found_offset`` is the ``offsets_for_times`` answer (None: no record at or after the
    time); ``override`` the ``--from-offsets`` value. Both are clamped to ``beginning``.
    """
    if override is not None:
        return max(override, beginning), "from-offsets"
    if found_offset is None:
        return None, "end"
    return max(found_offset, beginning), "timestamp"


def range_cut(found_offset: int | None, beginning: int, override: int | None) -> bool:
    """Whether retention cut into the range a partition should be read from.

    Nothing was ever deleted from a partition that begins at offset 0. Otherwise: an
    explicit start before the beginning was cut; and when the first record still there is
    already at or after the replay's start time (the time lookup answers the beginning
    itself), the deleted records before it may have been of the date too. When older
    records remain before the answer, what retention deleted was older still."""
    if beginning == 0:
        return False
    if override is not None:
        return override < beginning
    return found_offset == beginning


async def topic_partitions(
    settings: Settings, topic: str, connect_timeout: float = 30.0
) -> list[int]:
    """The partitions of ``topic`` (the replay splits its read between processes by
    them); BrokerUnreachable / TopicNotFound with a one-line reason."""
    consumer = groupless_consumer(
        settings,
        request_timeout_ms=int(connect_timeout * 1000),
    )
    try:
        return await _start_and_list(consumer, settings, topic, connect_timeout)
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()


async def _start_and_list(
    consumer: AIOKafkaConsumer, settings: Settings, topic: str, connect_timeout: float
) -> list[int]:
    servers = ",".join(settings.broker_bootstrap())
    try:
        await asyncio.wait_for(consumer.start(), connect_timeout)
        # every topic's metadata: asking for the topic by name could auto-create it
        cluster = await consumer._client.fetch_all_metadata()
    except (KafkaError, OSError, TimeoutError) as error:
        raise BrokerUnreachable(
            f"Kafka broker unreachable at {servers}: {type(error).__name__}"
        ) from None
    partitions = sorted(cluster.partitions_for_topic(topic) or ())
    if topic not in cluster.topics() or not partitions:
        raise TopicNotFound(f"topic {topic} does not exist at {servers}")
    return partitions


class ReplayReader:
    """``async with ReplayReader(settings, day) as reader: async for batch in reader...``.

    After ``__aenter__`` the slice is fixed: :attr:`ranges` and :attr:`total` (records to
    read, an upper bound: compacted or transaction-marker offsets hold no record).
    """

    def __init__(
        self,
        settings: Settings,
        day: date,
        from_offsets: Mapping[int, int] | None = None,
        *,
        connect_timeout: float = 30.0,
        topic: str | None = None,
        partitions: Sequence[int] | None = None,
    ) -> None:
        self.settings = settings
        self.topic = topic or settings.USAGE_TOPIC
        #: read only these partitions of the topic (None: all); ``--from-offsets`` of
        #: others are checked against the topic, then left to whoever reads them
        self.only = None if partitions is None else set(partitions)
        self.day = day
        self.from_offsets = dict(from_offsets or {})
        self.connect_timeout = connect_timeout
        self.ranges: dict[int, PartitionRange] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._early: dict[int, list[ConsumerRecord]] = {}

    @property
    def total(self) -> int:
        return sum(r.size for r in self.ranges.values())

    async def __aenter__(self) -> ReplayReader:
        try:
            await self.open()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()

    # Opening: the slice ---------------------------------------------------------------

    async def open(self) -> None:
        consumer = groupless_consumer(
            self.settings,
            auto_offset_reset="none",  # never jump silently to another offset
            fetch_max_wait_ms=BOUNDED_READ_WAIT_MS,
            # big fetches: fewer round trips while the records of one are being parsed
            # (the replay reads a bounded slice; a few MiB per partition in memory)
            max_partition_fetch_bytes=FETCH_PARTITION_BYTES,
            fetch_max_bytes=FETCH_PARTITION_BYTES * 4,
            request_timeout_ms=int(self.connect_timeout * 1000),
        )
        self._consumer = consumer
        partitions = await _start_and_list(
            consumer, self.settings, self.topic, self.connect_timeout
        )
        unknown = sorted(set(self.from_offsets) - set(partitions))
        if unknown:
            raise ReplayReadError(
                f"--from-offsets: topic {self.topic} has no partition "
                f"{', '.join(map(str, unknown))} (partitions 0-{partitions[-1]})"
            )
        if self.only is not None:
            partitions = [p for p in partitions if p in self.only]
        tps = [TopicPartition(self.topic, p) for p in partitions]
        if not tps:
            return
        try:
            beginning = await consumer.beginning_offsets(tps)
            lookup = [tp for tp in tps if tp.partition not in self.from_offsets]
            found = (
                await consumer.offsets_for_times(
                    {tp: replay_start_ms(self.day, self.settings) for tp in lookup}
                )
                if lookup
                else {}
            )
        except (KafkaError, OSError) as error:
            raise ReplayReadError(
                f"cannot list offsets of {self.topic}: {type(error).__name__}: {error}"
            ) from None
        starts: dict[int, tuple[int | None, str]] = {}
        cut: set[int] = set()
        for tp in tps:
            answer = found.get(tp)
            offset = answer.offset if answer is not None else None
            override = self.from_offsets.get(tp.partition)
            starts[tp.partition] = choose_start(offset, beginning[tp], override)
            if range_cut(offset, beginning[tp], override):
                cut.add(tp.partition)
        consumer.assign(tps)
        for tp in tps:
            start, _ = starts[tp.partition]
            # a partition with nothing after the time still needs one fetch for its end
            consumer.seek(tp, beginning[tp] if start is None else start)
        ends = await self._snapshot_ends(tps, starts)
        for tp in tps:
            start, origin = starts[tp.partition]
            end = ends[tp.partition]
            if start is None:
                start = end
            elif start > end:
                if origin == "from-offsets":
                    raise ReplayReadError(
                        f"--from-offsets {tp.partition}:{start} is past the end of partition "
                        f"{tp.partition} (offsets {beginning[tp]}..{end})"
                    )
                start = end
            self.ranges[tp.partition] = PartitionRange(
                tp.partition, start, end, origin, tp.partition in cut
            )
        log.info(
            "replay %s: %s",
            self.day,
            ", ".join(f"p{r.partition} {r.start}..{r.end}" for r in self.ranges.values()),
        )

    async def _snapshot_ends(
        self, tps: list[TopicPartition], starts: Mapping[int, tuple[int | None, str]]
    ) -> dict[int, int]:
        """Fetch once from each start and keep the high watermark it reports (and the
        records it returned, so they are not fetched twice)."""
        consumer = self._consumer
        assert consumer is not None
        ends: dict[int, int] = {}
        deadline = time.monotonic() + SNAPSHOT_TIMEOUT_SECONDS
        while len(ends) < len(tps):
            if time.monotonic() > deadline:
                missing = sorted(tp.partition for tp in tps if tp.partition not in ends)
                raise ReplayReadError(
                    f"no Fetch answer for partition(s) {', '.join(map(str, missing))} of "
                    f"{self.topic} within {SNAPSHOT_TIMEOUT_SECONDS:.0f} s"
                )
            try:
                batch = await consumer.getmany(timeout_ms=200)
            except OffsetOutOfRangeError as error:
                raise ReplayReadError(self._out_of_range(error, starts)) from None
            except KafkaError as error:
                raise ReplayReadError(f"fetch from {self.topic} failed: {error}") from None
            for tp, records in batch.items():
                self._early.setdefault(tp.partition, []).extend(records)
            for tp in tps:
                if tp.partition not in ends and consumer.highwater(tp) is not None:
                    ends[tp.partition] = consumer.highwater(tp)
        return ends

    def _out_of_range(
        self, error: OffsetOutOfRangeError, starts: Mapping[int, tuple[int | None, str]]
    ) -> str:
        offsets = error.args[0] if error.args and isinstance(error.args[0], dict) else {}
        for tp, offset in offsets.items():
            if starts.get(tp.partition, (None, ""))[1] == "from-offsets":
                return f"--from-offsets {tp.partition}:{offset} is outside partition {tp.partition}"
            return f"offset {offset} of partition {tp.partition} is no longer available"
        return f"offset out of range reading {self.topic}: {error}"

    # Reading --------------------------------------------------------------------------

    def _in_range(self, partition: int, records: list[ConsumerRecord]) -> list[ConsumerRecord]:
        """The records of one fetch inside ``[start, end)``. A fetch is a run of ascending
        offsets, so only the first and last need a look; the list is copied only for the
        fetch that crosses an end (or a start, for the snapshot fetch)."""
        r = self.ranges[partition]
        if not records or (r.start <= records[0].offset and records[-1].offset < r.end):
            return records
        return [record for record in records if r.start <= record.offset < r.end]

    async def batches(self) -> AsyncIterator[list[PartitionBatch]]:
        """Every record of the slice: per fetch, ``(partition, records)`` pairs (aiokafka
        ``ConsumerRecord``s in offset order). No per-record tuple is built here: with most
        records of other dates, the caller touches little more than ``value``."""
        consumer = self._consumer
        assert consumer is not None, "use 'async with ReplayReader(...)'"
        tps = {p: TopicPartition(self.topic, p) for p in self.ranges}
        active = {p for p, r in self.ranges.items() if r.size > 0}
        consumer.pause(*(tps[p] for p in tps if p not in active))
        early = [
            (partition, records)
            for partition, fetched in sorted(self._early.items())
            if (records := self._in_range(partition, fetched))
        ]
        self._early.clear()
        if early:
            yield early
        last_position = {p: -1 for p in active}
        last_move = {p: time.monotonic() for p in active}
        while active:
            for partition in sorted(active):
                position = await consumer.position(tps[partition])
                if position >= self.ranges[partition].end:
                    active.discard(partition)
                    consumer.pause(tps[partition])
                elif position != last_position[partition]:
                    last_position[partition] = position
                    last_move[partition] = time.monotonic()
                elif time.monotonic() - last_move[partition] > STALL_TIMEOUT_SECONDS:
                    raise ReplayReadError(
                        f"partition {partition} of {self.topic} stopped at offset {position} "
                        f"before its end {self.ranges[partition].end}"
                    )
            if not active:
                break
            try:
                fetched = await consumer.getmany(*(tps[p] for p in active), timeout_ms=500)
            except OffsetOutOfRangeError as error:
                raise ReplayReadError(
                    f"records of {self.topic} were deleted while the replay read them "
                    f"(retention?): {error}"
                ) from None
            except KafkaError as error:
                raise ReplayReadError(f"fetch from {self.topic} failed: {error}") from None
            out = [
                (tp.partition, records)
                for tp, fetched_records in fetched.items()
                if (records := self._in_range(tp.partition, fetched_records))
            ]
            if out:
                yield out
