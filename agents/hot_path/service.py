"""The hot path, in one place: batch in → validate → route → dedupe → raw sink →
aggregate → commit.

A Faust ``@app.service`` that owns a plain aiokafka consumer in the consumer group
``APP_ID`` and reads, in batches of up to ``BATCH_MAX_EVENTS`` records (``getmany``), the
usage topic and the rerouted topic, partition p of both on the same worker (range
assignor). Faust keeps everything else: its web server, timers, the CLI.

**Home partitions.** Every request is deduplicated on its home partition
(:mod:`streams.model.partitioning`), by the worker that owns it, in memory
(:class:`agents.hot_path.home_state.HomePartition`). Producers key by request id, so nearly every
event is read at home; a copy read elsewhere is produced unchanged to the rerouted
topic, partition home, and counted there.

Per batch, in OpenMeter's sink order:

1. **validate** every record (``parse_records``: the same verdict at every read); invalid
   ones go to the dead-letter topic with the reason and their origin;
2. **route**: valid events read away from home go to the rerouted topic;
3. **dedupe**: per home partition, copies inside the batch and ids seen before (or in
   the batch still being committed) are dropped;
4. **aggregate**: per home partition, the batch's exact sums per (usage date, key), and
   the new requests' raw points;
5. **raw sink**: the raw points are stored (retried with backoff and a circuit breaker
   until stored; with InfluxDB, appended to the local spool);
6. **commit**: once the dead letters, the reroutes and the raw points are stored, one
   record per home partition is appended to the batch log (:mod:`streams.kafka.batch_log`):
   the positions read up to, the sums, the watermark, and ``prev``, the chain head it
   extends. That append is the commit point. The summary writer adds the sums once each
   (:mod:`agents.summary_writer.writer`); a worker that gets the partition later starts from the
   chain head. The Kafka offset commit is informational.

If the appended record did not land right after the head it extends, another record came
first (a zombie that still thinks it owns the partition, or a replay's fence): the
partition's state is caught up from the log (:class:`agents.hot_path.home_state.Rebuilder`), the
consumer goes back to the head's positions, and what this worker had prepared on top of
the old head is dropped (its raw points may be written twice: the same points).

Stages 1-4 of the next batch (the main thread's CPU) overlap with stages 5-6 of the
previous one (file writes, ``fsync`` and broker round trips, which need no Python time);
the dedupe of the next batch counts the one being committed as seen.

Failures are reported once per condition (:class:`ConditionLog`), and while a stage is
failing :meth:`HotPath.not_ready_reason` names it for ``/ready`` (:mod:`agents.web.health`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import mode
import msgspec
import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import ConsumerStoppedError, KafkaError, MessageSizeTooLargeError
from aiokafka.structs import OffsetAndMetadata

from agents.conditions import ConditionLog, until_done
from agents.hot_path.dedupe import NO_FENCE, judge, ranks
from agents.hot_path.home_assignor import sticky_home_assignor
from agents.hot_path.home_partition import HomePartition
from agents.hot_path.home_state import ChainBroken, Rebuilder
from agents.hot_path.snapshots import CHECK_SECONDS as SNAPSHOT_CHECK_SECONDS
from agents.hot_path.snapshots import STOP_SECONDS as SNAPSHOT_STOP_SECONDS
from agents.prices_feed import PricesFeed
from streams.app import app, settings
from streams.gc_tuning import tune_for_batches
from streams.kafka.batch_log import (
    MAX_RECORD_BYTES,
    BatchEntry,
    ChainHead,
    encode,
    encode_parts,
    record_mark,
)
from streams.kafka.broker import kafka_client_kwargs, leave_group
from streams.log_throttle import throttle_kafka_client_logs
from streams.malloc_tuning import pin_mmap_threshold
from streams.metrics import (
    CONSUMER_LAG,
    DEDUPE_BYTES,
    DEDUPE_IDS,
    EVENTS_CONSUMED,
    EVENTS_DUPLICATE,
    EVENTS_INVALID,
    HOME_PARTITIONS_HELD,
)
from streams.model.business_time import UsageDates
from streams.model.event import CONFLICT, MAX_EVENT_BYTES, InvalidEvent, UsageEvent, parse_records
from streams.model.fingerprint import conflict
from streams.model.money import NanoScaler
from streams.model.partitioning import home_partitions
from streams.model.pricing import bill
from streams.sinks import build_raw_sink
from streams.sinks.lineprotocol import line
from streams.sinks.raw_retention import maintain_raw_files
from tables.dedupe.seen_requests import Keys

__all__ = ["HotPath", "hot_path"]

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 5.0
#: the largest record (with its headers) the hot path's producer sends: under Apache
#: Kafka's default max.message.bytes, 1,048,588 B, which also counts the record batch's
#: ~70 B of overhead
MAX_PRODUCED_BYTES = 1_048_576 - 1024
RAW_MAINTENANCE_SECONDS = 300.0
PRUNE_SECONDS = max(1.0, min(3600.0, settings.DEDUP_TTL_DAYS * 86_400 / 16))
_WORKER = f"{socket.gethostname()}/{os.getpid()}"


@dataclass(slots=True)
class HomeBatch:
    """What one batch brings to one home partition."""

    partition: int
    epoch: int  # the state's epoch when prepared: a resync in between voids it
    usage_next: int = -1  # next offset after the batch's usage records (-1: none read)
    rerouted_next: int = -1
    new: Keys | None = None  # the new requests' keys and fingerprints (agents/hot_path/dedupe.py)
    sums: dict[tuple[str, str, str, str], list[int]] = field(default_factory=dict)
    newest_event_ms: int = -1
    usage_mark: str = ""  # record_mark of the last usage / rerouted record read
    rerouted_mark: str = ""
    appended: bool = False  # a retried commit must not append this partition's record again


@dataclass(slots=True)
class _Send:
    """A produce started in ``prepare`` and awaited by ``commit``; ``make`` sends it again
    when it failed (a commit is retried until it succeeds)."""

    make: Callable[[], Coroutine[Any, Any, None]]
    future: asyncio.Future[None]

    @classmethod
    def start(cls, make: Callable[[], Coroutine[Any, Any, None]]) -> _Send:
        return cls(make, asyncio.ensure_future(make()))


@dataclass(slots=True)
class PreparedBatch:
    """A batch after validation, routing, dedupe and aggregation: its raw points and
    sends still to be stored by ``commit``."""

    records: int  # of the usage topic (rerouted copies were counted where they were read)
    homes: dict[int, HomeBatch] = field(default_factory=dict)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    last: dict[tuple[str, int], ConsumerRecord] = field(default_factory=dict)  # at offsets - 1
    invalid: dict[str, int] = field(default_factory=dict)
    copies: int = 0  # (unused: every duplicate is counted in ``known``)
    known: int = 0  # duplicates: identical copies inside the batch and of ids seen before
    full: bool = False
    lines: list[str] = field(default_factory=list)  # raw points still to store
    sends: list[_Send] = field(default_factory=list)  # dead letters and reroutes, started
    #: each home partition's ownership epoch when the batch was read: a partition revoked
    #: (or rebuilt) while the batch is prepared is left out and its part never appended
    epochs: dict[int, int] = field(default_factory=dict)


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, owner: HotPath) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.owner.partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.owner.partitions_assigned(assigned)


class HotPath(mode.Service):
    """Consumes the usage and rerouted topics in batches (module docstring)."""

    def __post_init__(self) -> None:
        self.topic = settings.USAGE_TOPIC
        self.rerouted_topic = settings.rerouted_topic
        self.batch_log_topic = settings.batch_log_topic
        self.sink = build_raw_sink(settings)
        self.dates = UsageDates(settings.tz)
        self.markup = NanoScaler(settings.USAGE_MARKUP_MULTIPLIER)
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.partitions = 0  # of the usage topic (= of the rerouted topic and batch log)
        self.rebuilder: Rebuilder | None = None
        self.states: dict[int, HomePartition] = {}  # kept after a revoke: caught up on reuse
        self.owned: set[int] = set()
        #: home partitions assigned but held: their batch log cannot be followed (why)
        self.held: dict[int, str] = {}
        #: assigned home partitions whose state is being rebuilt (paused meanwhile)
        self.rebuilding: dict[int, asyncio.Future[None]] = {}
        self.joined = False  # an assignment is in force (False from a revoke to the next)
        self.consumer_started = False
        self.phase_started = time.monotonic()
        self.epochs: dict[int, int] = {}
        self.committed: dict[tuple[str, int], int] = {}  # (topic, partition) -> next offset
        self._seeks: dict[TopicPartition, int] = {}  # seeks we made, per partition
        self._next_read: dict[TopicPartition, int] = {}  # where the next record must be
        self._gaps: dict[TopicPartition, tuple[int, int]] = {}  # last (expected, found)
        self.prices = PricesFeed(settings)
        self._in_flight: PreparedBatch | None = None
        self._committing: asyncio.Future[None] | None = None
        self.conditions = ConditionLog(log)
        global _instance
        _instance = self

    # Lifecycle --------------------------------------------------------------------------

    async def on_start(self) -> None:
        throttle_kafka_client_logs()
        tune_for_batches()
        pin_mmap_threshold()  # ~10 MB buffers per batch: unmapped when freed
        client = kafka_client_kwargs(settings)
        self.producer = AIOKafkaProducer(
            **client,
            linger_ms=5,
            enable_idempotence=settings.KAFKA_PRODUCER_IDEMPOTENCE,
            acks="all",
            # nothing this worker produces may exceed Apache Kafka's default
            # max.message.bytes (1,048,588 B with the batch's overhead): batch-log records
            # are split below MAX_RECORD_BYTES, and a dead letter too large for this is
            # sent truncated (_send_dead_letter)
            max_request_size=MAX_PRODUCED_BYTES,
            # reroutes are sent thousands at a time: with aiokafka's 16 KB batches they
            # queued past the request timeout (KafkaTimeoutError, the batch retried);
            # a record batch stays under the broker's limit too
            max_batch_size=MAX_RECORD_BYTES,
        )
        await self.producer.start()
        await self.sink.start()
        self.consumer = AIOKafkaConsumer(
            **client,
            group_id=settings.APP_ID,
            # static membership (KIP-345): a worker that restarts with its WORKER_ID
            # (after a crash too) takes its member's place without waiting for the dead
            # one's session to expire; on a clean stop it leaves the group (on_stop)
            group_instance_id=settings.WORKER_ID if settings.KAFKA_STATIC_MEMBERSHIP else None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # partition p of the usage and the rerouted topic to the same worker, kept
            # with the worker that holds its state (agents/hot_path/home_assignor.py)
            partition_assignment_strategy=(sticky_home_assignor(lambda: set(self.states)),),
            session_timeout_ms=int(settings.KAFKA_SESSION_TIMEOUT_SECONDS * 1000),
            rebalance_timeout_ms=int(settings.KAFKA_REBALANCE_TIMEOUT_SECONDS * 1000),
            heartbeat_interval_ms=int(settings.KAFKA_HEARTBEAT_INTERVAL_SECONDS * 1000),
            max_poll_interval_ms=3_600_000,  # a batch may wait long for an InfluxDB outage
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
        )
        self.consumer.subscribe([self.topic, self.rerouted_topic], listener=_Rebalance(self))
        await self.prices.start()
        # the consumer starts in _consume: aiokafka's start() returns only once the group
        # has assigned partitions (seconds), and the worker's other services (the summary
        # writer, the web server's /ready) must not wait for that

    async def on_stop(self) -> None:
        """Let the batch in flight finish (briefly): one stuck on an outage is cancelled,
        unappended, and read again by whoever owns the partition next."""
        if not await self._settle(STOP_GRACE_SECONDS):
            log.warning("hot path: stopping with a batch in flight; it will be redelivered")
            if self._committing is not None:
                self._committing.cancel()
        for task in list(self.rebuilding.values()):
            task.cancel()
        await self._snapshot_on_stop()
        if self.consumer is not None:
            if await leave_group(self.consumer):
                log.info("hot path: left the consumer group %s", settings.APP_ID)
            try:
                await asyncio.wait_for(self.consumer.stop(), STOP_GRACE_SECONDS)
            except TimeoutError:  # a join the broker has not answered yet: let it be
                log.warning("hot path: the consumer did not stop in %.0f s", STOP_GRACE_SECONDS)
        if self.rebuilder is not None:
            await self.rebuilder.stop()
        if self.producer is not None:
            await self.producer.stop()
        await self.sink.close()
        await self.prices.stop()

    # Rebalancing ------------------------------------------------------------------------

    def partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        """Pause the new home partitions and rebuild their states in the background.

        Nothing waits here: aiokafka runs this callback inside its join, where no
        heartbeat is sent, and a rebuild (every request id of ``LEDGER_RETENTION_DAYS``)
        can outlast the session timeout: a member expelled mid-rebuild, a reshuffle, a
        rebalance storm. So each partition is paused until :meth:`_rebuild` has brought
        its state up to the chain head, then sought there and resumed; meanwhile the
        group sees a live member, and the other partitions are consumed. States of
        partitions not assigned again are freed now (aiokafka revokes everything at
        every rebalance: kept ones only catch up the tail)."""
        assert self.consumer is not None
        if self.rebuilder is None:
            self.partitions = len(self.consumer.partitions_for_topic(self.topic) or ())
            self.rebuilder = Rebuilder(settings, self.partitions)
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
        the head's positions (:meth:`partitions_assigned`)."""
        assert self.rebuilder is not None and self.consumer is not None
        rebuilder = self.rebuilder
        try:
            state = await self._until_done(
                "rebuild",
                lambda: rebuilder.catch_up(self.states.get(partition), partition),
                None,
            )
            offsets = await self._head_offsets(state)
        except ChainBroken as broken:
            self._hold(partition, str(broken))
            return
        except Exception as error:  # a defect: never a partition paused for ever in silence
            log.exception("hot path: rebuilding home partition %d failed; stopping", partition)
            await self.crash(error)
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
        self._move_to_head(state, offsets)
        self.consumer.resume(*tps)
        log.info("hot path: home partition %d rebuilt; consuming", partition)

    async def _head_offsets(self, state: HomePartition) -> dict[TopicPartition, int]:
        """Where the partition's usage and rerouted records are read from: the chain
        head's positions, or each partition's first offset while there is no chain."""
        assert self.consumer is not None
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

    def _move_to_head(self, state: HomePartition, offsets: dict[TopicPartition, int]) -> None:
        """Seek to :meth:`_head_offsets` (synchronous, see :meth:`partitions_assigned`)."""
        for tp, offset in offsets.items():
            if state.head.offset >= 0:
                self.committed[(tp.topic, tp.partition)] = offset
            self._seek(tp, offset)

    def _seek(self, tp: TopicPartition, offset: int) -> None:
        """Move ``tp`` to ``offset``: what was fetched before is dropped (``_seeks``),
        and the next records read must start there (``_next_read``)."""
        assert self.consumer is not None
        self._seeks[tp] = self._seeks.get(tp, 0) + 1
        self.consumer.seek(tp, offset)
        self._next_read[tp] = offset

    def _hold(self, partition: int, reason: str) -> None:
        """Stop reading a home partition whose batch log cannot be followed: it is never
        given a new chain on top of the old one (``/ready`` names it until it is fixed
        and the worker restarted, or the partition moves away)."""
        assert self.consumer is not None
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

    async def partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        """Finish the append in flight (briefly) and stop the rebuilds of the revoked
        partitions; the states stay until the next assignment says whether they are
        still ours."""
        self.joined = False
        await self._settle(STOP_GRACE_SECONDS)
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

    async def _settle(self, timeout: float) -> bool:
        """Wait (bounded) for the batch being committed; True when none is left."""
        committing = self._committing
        if committing is None:
            return True
        done, _ = await asyncio.wait([committing], timeout=timeout)
        return bool(done)

    def assigned_partitions(self) -> list[int]:
        if self.consumer is None:
            return []
        return sorted(tp.partition for tp in self.consumer.assignment() if tp.topic == self.topic)

    def not_ready_reason(self) -> str | None:
        """Why the hot path cannot record events right now (``/ready``), or None."""
        reasons = [
            f"hot path {name} failing: {error}"
            for name, error in self.conditions.active().items()
            if name != "kafka-commit"  # informational: the batch log holds the positions
        ]
        reasons += [f"home partition {p} held: {why}" for p, why in sorted(self.held.items())]
        if settings.raw_sink_kind == "file" and self.sink.consecutive_failures:
            reasons.append(
                f"raw files under {settings.raw_dir} not writable "
                f"({self.sink.consecutive_failures} failed attempts)"
            )
        return "; ".join(reasons) or None

    def update_lag(self) -> None:
        """Lag = high watermark seen in fetch responses − next offset read, per usage
        partition (``end_offsets()`` is wrong on the test broker)."""
        if self.consumer is None:
            return
        for tp in self.consumer.assignment():
            if tp.topic != self.topic:
                continue
            highwater = self.consumer.highwater(tp)
            if highwater is None or highwater < 0:
                continue
            lag = highwater - self.committed.get((tp.topic, tp.partition), 0)
            CONSUMER_LAG.labels(topic=tp.topic, partition=str(tp.partition)).set(max(lag, 0))

    # The loop ---------------------------------------------------------------------------

    @mode.Service.task
    async def _consume(self) -> None:
        """While batch N is appended to the batch log, batch N+1 is fetched, validated,
        deduplicated and written to the raw sink. Appends keep the batches' order."""
        assert self.consumer is not None
        self.phase_started = time.monotonic()
        await self.consumer.start()
        self.consumer_started = True
        while not self.should_stop:
            records = self._order_for_fences(await self._next_batch())
            if not records:
                await self._finish_commit()
                continue
            batch = await self._until_done("prepare", self.prepare, records)
            batch.full = len(records) >= settings.BATCH_MAX_EVENTS
            await self._finish_commit()
            self._in_flight = batch
            self._committing = asyncio.ensure_future(self._until_done("commit", self.commit, batch))
        await self._finish_commit()

    async def _finish_commit(self) -> None:
        if self._committing is not None:
            try:
                await asyncio.shield(self._committing)
            finally:
                if self._committing.done():
                    self._committing = None
                    self._in_flight = None

    async def _next_batch(self) -> list[ConsumerRecord]:
        """Up to BATCH_MAX_EVENTS records, waiting at most RAW_BATCH_SECONDS for more
        (less at the end of a backlog: :meth:`_caught_up`)."""
        assert self.consumer is not None
        limit = settings.BATCH_MAX_EVENTS
        records: list[ConsumerRecord] = []
        # (partition, its seeks when fetched, where its records start, how many)
        fetched_at: list[tuple[TopicPartition, int, int, int]] = []
        reached: dict[TopicPartition, int] = {}  # next offset after what was fetched
        deadline = time.monotonic() + settings.RAW_BATCH_SECONDS
        while len(records) < limit:
            wait = deadline - time.monotonic()
            if wait <= 0 and records:
                break
            if len(records) >= settings.RAW_BATCH_SIZE and self._caught_up(reached):
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
                if tp.partition in self.owned:
                    fetched_at.append(
                        (tp, self._seeks.get(tp, 0), len(records), len(partition_records))
                    )
                    records.extend(partition_records)
                    reached[tp] = partition_records[-1].offset + 1
            if not fetched and not records:
                break
        kept: list[ConsumerRecord] = []
        moved: set[TopicPartition] = set()
        for tp, seeks, start, count in fetched_at:
            chunk = records[start : start + count]
            # a partition moved back while this batch was collected (to its chain head on
            # a rebalance or a lost append, or to a fence): what was fetched before that
            # seek comes again after it
            if tp in moved or self._seeks.get(tp, 0) != seeks:
                continue
            if not self._follows_on(tp, chunk[0].offset):
                moved.add(tp)
                continue
            self._next_read[tp] = chunk[-1].offset + 1
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
        assert self.consumer is not None
        for tp in self.consumer.assignment():
            if tp.partition not in self.owned:
                continue
            highwater = self.consumer.highwater(tp)
            position = reached.get(tp, self._next_read.get(tp))
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
        expected = self._next_read.get(tp)
        if expected is None:  # (every owned partition was sought; the head decides anyway)
            head = self.states[tp.partition].head
            expected = head.usage_next if tp.topic == self.topic else head.rerouted_next
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
        self._seek(tp, expected)
        return False

    def _order_for_fences(self, records: list[ConsumerRecord]) -> list[ConsumerRecord]:
        """Below a replay's fence, read every copy before any copy above it.

        The replay counted a date's requests with a copy below the fence (in the usage or
        the rerouted topic); the worker counts those whose first copy it reads is above.
        Were an above-fence copy in one topic read before a below-fence copy in the other,
        a request would count on both sides. So while one topic of a home partition has
        not reached its fence position, records at or past the fence in the other topic
        wait (the consumer goes back to them), and within a batch that reaches both,
        records below the fence come first."""
        assert self.consumer is not None
        fenced = {
            p: bounds
            for p, state in self.states.items()
            if p in self.owned and (bounds := state.bounds()) is not None
        }
        if not fenced or not records:
            return records
        kept: list[ConsumerRecord] = []
        later: list[ConsumerRecord] = []
        for partition, (usage_end, rerouted_end) in fenced.items():
            head = self.states[partition].head
            reach = {self.topic: head.usage_next, self.rerouted_topic: head.rerouted_next}
            bound = {self.topic: usage_end, self.rerouted_topic: rerouted_end}
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
            for topic, offset in held.items():
                self._seek(TopicPartition(topic, partition), offset)
        kept += [record for record in records if record.partition not in fenced]
        return kept + later

    async def _until_done(self, stage: str, step: Any, argument: Any) -> Any:
        """Run a stage until it succeeds: a failing sink or broker stalls the batch here
        (nothing is appended), never drops it."""
        return await until_done(
            self.conditions,
            stage,
            f"{stage} of a batch failed",
            lambda: step(argument) if argument is not None else step(),
            (sqlite3.Error, OSError, KafkaError, TimeoutError),
        )

    async def prepare(self, records: Sequence[ConsumerRecord]) -> PreparedBatch:
        """Stages 1-4 (module docstring): CPU only, the sends are started, not awaited."""
        parsed = parse_records(records)
        await _let_the_loop_run()
        batch = PreparedBatch(sum(1 for record in records if record.topic == self.topic))
        batch.epochs = {p: self.epochs.get(p, 0) for p in self.owned}
        sends = batch.sends
        valid: list[tuple[ConsumerRecord, UsageEvent]] = []
        for record, event in zip(records, parsed, strict=True):
            key = (record.topic, record.partition)
            if record.offset + 1 > batch.offsets.get(key, -1):
                batch.offsets[key] = record.offset + 1
                batch.last[key] = record
            if isinstance(event, InvalidEvent):
                batch.invalid[event.reason] = batch.invalid.get(event.reason, 0) + 1
                sends.append(_Send.start(lambda r=record, e=event: self._send_dead_letter(r, e)))
            else:
                valid.append((record, event))
        at_home = [record.topic == self.rerouted_topic for record, _ in valid]
        away = [i for i, home in enumerate(at_home) if not home]
        homes = home_partitions([valid[i][1].request_id for i in away], self.partitions)
        for i, home in zip(away, homes, strict=True):
            record = valid[i][0]
            at_home[i] = home == record.partition
            if not at_home[i]:
                sends.append(
                    _Send.start(lambda r=record, e=valid[i][1], h=home: self._reroute(r, e, h))
                )
        # dedupe per home partition (the batch being committed counts as seen)
        await _let_the_loop_run()
        by_home: dict[int, list[tuple[ConsumerRecord, UsageEvent]]] = {}
        for pair, home in zip(valid, at_home, strict=True):
            if home:
                partition = pair[0].partition
                pairs = by_home.get(partition)
                if pairs is None:
                    pairs = by_home[partition] = []
                pairs.append(pair)
        candidates: list[tuple[UsageEvent, ConsumerRecord]] = []
        for partition, pairs in by_home.items():
            if self._still_owned(batch, partition):  # (a rebalance may have come meanwhile)
                candidates += self._dedupe(batch, partition, pairs)
        await _let_the_loop_run()
        candidates = [pair for pair in candidates if self._still_owned(batch, pair[1].partition)]
        batch.lines = self._add_new(batch, candidates)
        for (topic, partition), next_offset in batch.offsets.items():
            if self._still_owned(batch, partition):
                home = self._home(batch, partition)
                mark = record_mark(batch.last[(topic, partition)])
                if topic == self.topic:
                    home.usage_next, home.usage_mark = next_offset, mark
                else:
                    home.rerouted_next, home.rerouted_mark = next_offset, mark
        return batch

    def _dedupe(
        self,
        batch: PreparedBatch,
        partition: int,
        pairs: list[tuple[ConsumerRecord, UsageEvent]],
    ) -> list[tuple[UsageEvent, ConsumerRecord]]:
        """Judge one home partition's events (:func:`agents.hot_path.dedupe.judge`): count the
        duplicates, send the conflicting copies to the dead-letter topic, and return the
        new requests' first copies (their keys go with the batch, into the state when it
        is appended)."""
        home = self._home(batch, partition)
        events = [event for _, event in pairs]
        newest = max(event.event_ms for event in events)
        if newest > home.newest_event_ms:
            home.newest_event_ms = newest
        rerouted = np.fromiter(
            (record.topic == self.rerouted_topic for record, _ in pairs), bool, len(pairs)
        )
        offsets = np.fromiter((record.offset for record, _ in pairs), np.int64, len(pairs))
        bounds = self.states[partition].bounds() or (NO_FENCE, NO_FENCE)
        rank = ranks(np.zeros(len(pairs), dtype=np.int64), rerouted, offsets, bounds)
        verdicts = judge(events, rank, self.states[partition].seen, self._in_flight_keys(partition))
        batch.known += verdicts.duplicates
        if len(verdicts.conflicts):
            batch.invalid[CONFLICT] = batch.invalid.get(CONFLICT, 0) + len(verdicts.conflicts)
            for index, first_fp in zip(
                verdicts.conflicts.tolist(), verdicts.first_fps.tolist(), strict=True
            ):
                record, event = pairs[index]
                verdict = conflict(event, first_fp)
                batch.sends.append(
                    _Send.start(lambda r=record, v=verdict: self._send_dead_letter(r, v))
                )
        home.new = verdicts.new_keys.sorted()  # a run: searched by the next batch
        return [(pairs[i][1], pairs[i][0]) for i in verdicts.new.tolist()]

    def _in_flight_keys(self, partition: int) -> list[Keys]:
        """The new ids of the batch being committed, which count as seen (unless a
        catch-up voided that batch: it will not be appended, so its ids are not seen)."""
        in_flight = self._in_flight
        if in_flight is not None:
            pending = in_flight.homes.get(partition)
            if (
                pending is not None
                and pending.new is not None
                and pending.epoch == self.epochs.get(partition)
            ):
                return [pending.new]
        return []

    def _still_owned(self, batch: PreparedBatch, partition: int) -> bool:
        """Whether ``partition`` is owned, with its state, as when ``batch`` was read."""
        return (
            partition in self.owned
            and partition in self.states
            and batch.epochs.get(partition) == self.epochs.get(partition)
        )

    def _home(self, batch: PreparedBatch, partition: int) -> HomeBatch:
        home = batch.homes.get(partition)
        if home is None:
            epoch = batch.epochs.get(partition, -1)  # -1: not owned when read, never appended
            home = batch.homes[partition] = HomeBatch(partition, epoch)
        return home

    def _add_new(
        self, batch: PreparedBatch, candidates: list[tuple[UsageEvent, ConsumerRecord]]
    ) -> list[str]:
        """The new requests into their home partitions' ids and sums (unless a replay's
        fence says the replay counted one); returns their raw points' lines. One loop,
        no object per event: this is most of the hot path's own time."""
        prices, dates, markup = self.prices.current, self.dates, self.markup
        rerouted_topic, states = self.rerouted_topic, self.states
        lines = []
        for event, record in candidates:
            day, _, cost, estimated = bill(event, prices, dates)
            lines.append(
                line(
                    event.request_id,
                    event.client_org_id,
                    event.user_id,
                    event.model,
                    event.input_tokens,
                    event.output_tokens,
                    cost,
                    markup(cost),
                    event.event_ms,
                )
            )
            home = batch.homes[record.partition]  # made by the dedupe step
            state = states[record.partition]
            if state.fences and state.fenced(day, record.topic == rerouted_topic, record.offset):
                continue
            sum_key = (day, event.client_org_id, event.user_id, event.model)
            total = home.sums.get(sum_key)
            if total is None:
                total = home.sums[sum_key] = [0, 0, 0, 0, 0]
            total[0] += event.input_tokens
            total[1] += event.output_tokens
            total[2] += 1
            total[3] += estimated
            total[4] += cost
        return lines

    async def commit(self, batch: PreparedBatch) -> None:
        """Stages 5-6: the raw points and the sends stored, then one batch-log record per
        home partition, then metrics and offsets. Retried whole until it succeeds, so
        what is done is marked done."""
        if batch.lines:
            await self.sink.write_lines(batch.lines)
            batch.lines = []
        if batch.sends:
            await self._sent(batch)
        results = await asyncio.gather(
            *(self._append(home, batch.full) for home in batch.homes.values())
        )
        for home, ok in zip(batch.homes.values(), results, strict=True):
            if ok is False:  # lost a race: catch up, go back to the head, drop the rest
                state = self.states.get(home.partition)
                if state is None or home.partition not in self.owned:
                    continue  # revoked meanwhile: its next owner catches up
                self.epochs[home.partition] = self.epochs.get(home.partition, 0) + 1
                epoch = self.epochs[home.partition]
                assert self.rebuilder is not None
                try:
                    state = await self.rebuilder.catch_up(state, home.partition)
                except ChainBroken as broken:
                    self._hold(home.partition, str(broken))
                    continue
                offsets = await self._head_offsets(state)
                if home.partition not in self.owned or self.epochs[home.partition] != epoch:
                    continue  # revoked (or rebuilt) during the catch-up
                self.states[home.partition] = state
                self._move_to_head(state, offsets)
        EVENTS_CONSUMED.inc(batch.records)
        for reason, count in batch.invalid.items():
            EVENTS_INVALID.labels(reason=reason).inc(count)
        EVENTS_DUPLICATE.inc(batch.copies + batch.known)
        await self._commit_kafka(batch)

    @staticmethod
    async def _sent(batch: PreparedBatch) -> None:
        """Wait for the batch's dead letters and reroutes; the failed ones are started
        again (those that landed are not sent twice) and the first error is raised."""
        await asyncio.wait([send.future for send in batch.sends])
        first: BaseException | None = None
        for send in batch.sends:
            error = asyncio.CancelledError() if send.future.cancelled() else send.future.exception()
            if error is not None:
                first = first or error
                send.future = asyncio.ensure_future(send.make())
        if first is not None:
            raise first
        batch.sends = []

    async def _append(self, home: HomeBatch, full: bool) -> bool | None:
        """Append the partition's record; True when it extends the head, False when
        another record came first, None when the partition moved or was resynced."""
        assert self.producer is not None
        partition = home.partition
        if home.appended:
            return True
        if partition not in self.owned or home.epoch != self.epochs.get(partition):
            return None
        state = self.states[partition]
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
        offsets: list[int] = []
        if len(record) > MAX_RECORD_BYTES:  # rows in parts first, then the entry naming them
            parts = [
                await self.producer.send(self.batch_log_topic, part, partition=partition)
                for part in encode_parts(rows, _WORKER)
            ]
            offsets = [(await sent).offset for sent in parts]
            record = encode(msgspec.structs.replace(entry, rows=[], parts=offsets))
        metadata = await (
            await self.producer.send(self.batch_log_topic, record, partition=partition)
        )
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
        assert self.consumer is not None
        assignment = self.consumer.assignment()
        commit = {}
        for topic, partition in batch.offsets:
            tp = TopicPartition(topic, partition)
            state = self.states.get(partition)
            if tp in assignment and state is not None and state.head.offset >= 0:
                head_offset = (
                    state.head.usage_next if topic == self.topic else (state.head.rerouted_next)
                )
                commit[tp] = OffsetAndMetadata(head_offset, "")
                self.committed[(topic, partition)] = head_offset
        if not commit:
            return
        try:
            await self.consumer.commit(commit)
        except KafkaError as error:
            self.conditions.failed("kafka-commit", "Kafka offset commit", error, logging.INFO)
        else:
            self.conditions.recovered("kafka-commit", "Kafka offset commit")

    async def _reroute(self, record: ConsumerRecord, event: UsageEvent, home: int) -> None:
        """A valid event read away from its home partition, to the rerouted topic."""
        assert self.producer is not None
        source = f"{record.topic}/{record.partition}/{record.offset}"
        await (
            await self.producer.send(
                self.rerouted_topic,
                key=event.request_id.encode(),
                value=record.value,
                partition=home,
                headers=[("source-offset", source.encode())],
            )
        )

    async def _send_dead_letter(self, record: ConsumerRecord, event: InvalidEvent) -> None:
        """The original bytes with the reason, or, when the producer or the broker refuses
        a record that big (a 1 MiB value against Kafka's default ``message.max.bytes``),
        its first ``MAX_EVENT_BYTES`` with a ``value-truncated`` header giving the original
        size: retrying a record the broker will never take would stall the partition."""
        assert self.producer is not None
        source = f"{record.topic}/{record.partition}/{record.offset}"
        value = record.value if record.value is not None else b""
        headers = [
            ("error", f"{event.reason}: {event.message}".encode()),
            ("source-offset", source.encode()),
        ]
        try:
            await (
                await self.producer.send(
                    settings.dlq_topic, key=record.key, value=value, headers=headers
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
                    settings.dlq_topic,
                    key=record.key,
                    value=value[:MAX_EVENT_BYTES],
                    headers=headers,
                )
            )

    # Timers -----------------------------------------------------------------------------

    @mode.Service.timer(RAW_MAINTENANCE_SECONDS)
    async def _raw_files(self) -> None:
        """Gzip finished UTC days of the raw line-protocol files, delete expired ones."""
        if settings.raw_sink_kind != "file":
            return
        try:
            await asyncio.to_thread(
                maintain_raw_files,
                settings.raw_dir,
                datetime.now(UTC),
                settings.RAW_RETENTION_DAYS,
            )
        except OSError as error:
            log.warning(
                "raw file maintenance failed, next try in %.0f s: %s",
                RAW_MAINTENANCE_SECONDS,
                error,
            )

    @mode.Service.timer(5.0)
    async def _lag(self) -> None:
        self.update_lag()
        owned = [self.states[p] for p in self.owned if p in self.states]
        DEDUPE_IDS.set(sum(len(state.seen) for state in owned))
        DEDUPE_BYTES.set(sum(state.seen.approx_bytes() for state in owned))

    @mode.Service.timer(SNAPSHOT_CHECK_SECONDS)
    async def _snapshots(self) -> None:
        """Snapshot the owned home partitions' seen sets that are due
        (agents/hot_path/snapshots.py): taken here, between appends, written in a thread."""
        keeper = self.rebuilder.snapshots if self.rebuilder is not None else None
        if keeper is None:
            return
        for partition in sorted(self.owned):
            state = self.states.get(partition)
            if state is not None and keeper.due(state):
                keeper.start(state)

    async def _snapshot_on_stop(self) -> None:
        """A last snapshot of each owned partition whose head moved since its last one, so
        a restart reads (nearly) nothing back; bounded, a write left unfinished is lost."""
        keeper = self.rebuilder.snapshots if self.rebuilder is not None else None
        if keeper is None:
            return
        for partition in sorted(self.owned):
            state = self.states.get(partition)
            if state is not None and keeper.moved(state):
                keeper.start(state)
        await keeper.settle(SNAPSHOT_STOP_SECONDS)

    @mode.Service.timer(PRUNE_SECONDS)
    async def _prune(self) -> None:
        """Forget request ids older than DEDUP_TTL_DAYS, on quiet partitions too."""
        now_ms = time.time_ns() // 1_000_000
        for state in self.states.values():
            state.seen.prune(now_ms)


async def _let_the_loop_run() -> None:
    """Between the CPU-bound steps of ``prepare`` (each ~0.1-0.4 s for a full batch): the
    previous batch's commit, the fetcher and the producer move on only when the event
    loop runs, and each of their steps (a thread's write done, a response read) would
    otherwise wait for the whole of ``prepare``."""
    await asyncio.sleep(0)


_instance: HotPath | None = None


def hot_path() -> HotPath | None:
    """The worker's running hot path (None before it started, or in CLI commands)."""
    return _instance


app.service(HotPath)
