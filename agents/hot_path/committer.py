"""Stages 5-6 of the hot path: a prepared batch stored, in an order that keeps every
guarantee.

1. the raw points (:attr:`PreparedBatch.lines`) are stored by the raw sink (retried with
   backoff and a circuit breaker until stored; with InfluxDB, appended to the local
   spool);
2. the dead letters and the reroutes, started while the batch was prepared
   (:class:`InFlight`), are awaited;
3. then, and only then, one record per home partition is appended to the batch log
   (:mod:`streams.kafka.batch_log`): the positions read up to, the sums, the watermark,
   and ``prev``, the chain head it extends. That append is the commit point: the summary
   writer adds the sums once each, and a worker that gets the partition later starts
   from the chain head. So the positions read never get ahead of durable output;
4. metrics, and the Kafka offset commit, which is informational.

If an appended record did not land right after the head it extends, another record came
first (a zombie that still thinks it owns the partition, or a replay's fence): the
partition is resynced (:meth:`agents.hot_path.ownership.Ownership.resync`) and what this
worker had prepared on top of the old head is dropped (its raw points may be written
twice: the same points).

A commit is retried whole until it succeeds, so what is done is marked done: the lines
stored, the sends that landed, each partition's record appended.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from aiokafka.structs import OffsetAndMetadata, RecordMetadata

from agents.conditions import ConditionLog
from agents.hot_path.batch import HomeBatch, PreparedBatch, Reroute, Topics
from agents.hot_path.ownership import Ownership
from streams.kafka.batch_log import MAX_RECORD_BYTES, BatchEntry, ChainHead, encode, encode_parts
from streams.metrics import EVENTS_CONSUMED, EVENTS_DUPLICATE, EVENTS_INVALID
from streams.model.event import MAX_EVENT_BYTES, InvalidEvent

__all__ = ["Committer", "InFlight", "LineSink", "OffsetCommitter", "Producer", "Send"]

log = logging.getLogger(__name__)

#: who appended a batch-log record (``BatchEntry.worker``)
_WORKER = f"{socket.gethostname()}/{os.getpid()}"


class LineSink(Protocol):
    """The raw sink (:class:`streams.sinks.base.RawSink`): stores all lines or raises."""

    async def write_lines(self, lines: Sequence[str]) -> None: ...


class Producer(Protocol):
    """What the committer does with the hot path's ``AIOKafkaProducer``."""

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[RecordMetadata]: ...


class OffsetCommitter(Protocol):
    """What the committer does with the hot path's ``AIOKafkaConsumer``."""

    def assignment(self) -> set[TopicPartition]: ...

    async def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None: ...


@dataclass(slots=True)
class Send:
    """A produce started while the batch is prepared and awaited by the commit; ``make``
    sends it again when it failed (a commit is retried until it succeeds)."""

    make: Callable[[], Coroutine[Any, Any, None]]
    future: asyncio.Future[None]

    @classmethod
    def start(cls, make: Callable[[], Coroutine[Any, Any, None]]) -> Send:
        return cls(make, asyncio.ensure_future(make()))


@dataclass(slots=True)
class InFlight:
    """A prepared batch with its sends under way: the unit the committer stores."""

    batch: PreparedBatch
    sends: list[Send] = field(default_factory=list)
    #: how many of the batch's dead letters and reroutes have been started
    dead_letters_started: int = 0
    reroutes_started: int = 0


@dataclass(slots=True)
class Committer:
    """Stores prepared batches (module docstring) for the partitions ``ownership`` owns."""

    producer: Producer
    consumer: OffsetCommitter
    sink: LineSink
    ownership: Ownership
    topics: Topics
    conditions: ConditionLog

    def start_sends(self, in_flight: InFlight) -> None:
        """Start the dead letters and reroutes the stages found since the last call: they
        go out while the rest of the batch is prepared, and the commit awaits them."""
        batch, sends = in_flight.batch, in_flight.sends
        for record, verdict in batch.dead_letters[in_flight.dead_letters_started :]:
            sends.append(Send.start(self._dead_letter_maker(record, verdict)))
        in_flight.dead_letters_started = len(batch.dead_letters)
        for reroute in batch.reroutes[in_flight.reroutes_started :]:
            sends.append(Send.start(self._reroute_maker(reroute)))
        in_flight.reroutes_started = len(batch.reroutes)

    def _dead_letter_maker(
        self, record: ConsumerRecord, verdict: InvalidEvent
    ) -> Callable[[], Coroutine[Any, Any, None]]:
        return lambda: self._send_dead_letter(record, verdict)

    def _reroute_maker(self, reroute: Reroute) -> Callable[[], Coroutine[Any, Any, None]]:
        return lambda: self._reroute(reroute)

    async def commit(self, in_flight: InFlight) -> None:
        """Stages 5-6 (module docstring)."""
        batch = in_flight.batch
        if batch.lines:
            await self.sink.write_lines(batch.lines)
            batch.lines = []
        if in_flight.sends:
            await self._sent(in_flight)
        results = await asyncio.gather(
            *(self._append(home, batch.full) for home in batch.homes.values())
        )
        for home, ok in zip(batch.homes.values(), results, strict=True):
            if ok is False:  # lost a race: catch up, go back to the head, drop the rest
                await self.ownership.resync(home.partition)
        EVENTS_CONSUMED.inc(batch.records)
        for reason, count in batch.invalid.items():
            EVENTS_INVALID.labels(reason=reason).inc(count)
        EVENTS_DUPLICATE.inc(batch.known)
        await self._commit_kafka(batch)

    @staticmethod
    async def _sent(in_flight: InFlight) -> None:
        """Wait for the batch's dead letters and reroutes; the failed ones are started
        again (those that landed are not sent twice) and the first error is raised."""
        await asyncio.wait([send.future for send in in_flight.sends])
        first: BaseException | None = None
        for send in in_flight.sends:
            error = asyncio.CancelledError() if send.future.cancelled() else send.future.exception()
            if error is not None:
                first = first or error
                send.future = asyncio.ensure_future(send.make())
        if first is not None:
            raise first
        in_flight.sends = []

    async def _append(self, home: HomeBatch, full: bool) -> bool | None:
        """Append the partition's record; True when it extends the head, False when
        another record came first, None when the partition moved or was resynced."""
        partition = home.partition
        if home.appended:
            return True
        ownership = self.ownership
        if partition not in ownership.owned or home.epoch != ownership.epochs.get(partition):
            return None
        state = ownership.states[partition]
        head = state.head
        usage_next, usage_mark = max(
            (head.usage_next, head.usage_mark), (home.usage_next, home.usage_mark)
        )
        rerouted_next, rerouted_mark = max(
            (head.rerouted_next, head.rerouted_mark), (home.rerouted_next, home.rerouted_mark)
        )
        if (
            head.offset >= 0
            and not (home.new is not None and len(home.new))
            and usage_next == head.usage_next
            and (rerouted_next == head.rerouted_next)
        ):
            return True  # nothing new for this partition
        # plain tuples encode exactly as SumRow (an array-like struct), without an object
        # per (date, key)
        rows = [(*key, *total) for key, total in home.sums.items()]
        newest = max(head.newest_event_ms, home.newest_event_ms)
        entry = BatchEntry(
            head.offset,
            head.usage_next,
            usage_next,
            head.rerouted_next,
            rerouted_next,
            newest,
            rows,
            _WORKER,
            full,
            usage_mark,
            rerouted_mark,
        )
        record = encode(entry)
        topic = self.topics.batch_log
        offsets: list[int] = []
        if len(record) > MAX_RECORD_BYTES:  # rows in parts first, then the entry naming them
            parts = [
                await self.producer.send(topic, part, partition=partition)
                for part in encode_parts(rows, _WORKER)
            ]
            offsets = [(await sent).offset for sent in parts]
            record = encode(msgspec.structs.replace(entry, rows=[], parts=offsets))
        metadata = await (await self.producer.send(topic, record, partition=partition))
        # nothing but this batch's own parts may lie between the head and the entry
        expected = list(range(state.log_end, state.log_end + len(offsets)))
        if offsets != expected or metadata.offset != state.log_end + len(offsets):
            log.warning(
                "hot path: batch log %d: appended at %d, expected %d: another record came"
                " first; catching up",
                partition,
                metadata.offset,
                state.log_end + len(offsets),
            )
            return False
        state.log_end = metadata.offset + 1
        home.appended = True
        state.head = ChainHead(
            metadata.offset, usage_next, rerouted_next, newest, usage_mark, rerouted_mark
        )
        if home.new is not None:
            state.seen.add_keys(home.new, time.time_ns() // 1_000_000)
        return True

    async def _commit_kafka(self, batch: PreparedBatch) -> None:
        """The group's offsets at the chain heads: informational (monitoring, lag); the
        batch log holds the positions that count."""
        assignment = self.consumer.assignment()
        states, committed = self.ownership.states, self.ownership.committed
        usage_topic = self.topics.usage
        commit = {}
        for topic, partition in batch.offsets:
            tp = TopicPartition(topic, partition)
            state = states.get(partition)
            if tp in assignment and state is not None and state.head.offset >= 0:
                head = state.head
                head_offset = head.usage_next if topic == usage_topic else head.rerouted_next
                commit[tp] = OffsetAndMetadata(head_offset, "")
                committed[(topic, partition)] = head_offset
        if not commit:
            return
        try:
            await self.consumer.commit(commit)
        except KafkaError as error:
            self.conditions.failed("kafka-commit", "Kafka offset commit", error, logging.INFO)
        else:
            self.conditions.recovered("kafka-commit", "Kafka offset commit")

    async def _reroute(self, reroute: Reroute) -> None:
        """A valid event read away from its home partition, to the rerouted topic."""
        record = reroute.record
        source = f"{record.topic}/{record.partition}/{record.offset}"
        await (
            await self.producer.send(
                self.topics.rerouted,
                key=reroute.request_id.encode(),
                value=record.value,
                partition=reroute.home,
                headers=[("source-offset", source.encode())],
            )
        )

    async def _send_dead_letter(self, record: ConsumerRecord, event: InvalidEvent) -> None:
        """The original bytes with the reason, or, when the producer or the broker refuses
        a record that big (a 1 MiB value against Kafka's default ``message.max.bytes``),
        its first ``MAX_EVENT_BYTES`` with a ``value-truncated`` header giving the original
        size: retrying a record the broker will never take would stall the partition."""
        source = f"{record.topic}/{record.partition}/{record.offset}"
        value = record.value if record.value is not None else b""
        headers = [
            ("error", f"{event.reason}: {event.message}".encode()),
            ("source-offset", source.encode()),
        ]
        try:
            await (
                await self.producer.send(
                    self.topics.dlq, key=record.key, value=value, headers=headers
                )
            )
        except MessageSizeTooLargeError:
            log.warning(
                "hot path: dead letter of %d bytes (%s) too large for the broker, truncated",
                len(value),
                source,
            )
            headers.append(("value-truncated", str(len(value)).encode()))
            await (
                await self.producer.send(
                    self.topics.dlq,
                    key=record.key,
                    value=value[:MAX_EVENT_BYTES],
                    headers=headers,
                )
            )
