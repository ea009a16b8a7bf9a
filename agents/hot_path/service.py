"""The hot path's service: ``HotPath``, the ``mode.Service`` the Faust app starts on every
worker. It owns the Kafka clients and the raw sink, wires the collaborators that do the
work, runs the batch loop, and keeps the background tasks.

It reads, with a plain aiokafka consumer in the consumer group ``APP_ID`` (no Faust
consumer: docs/decisions/0001), the usage topic and the rerouted topic in batches of up
to ``BATCH_MAX_EVENTS`` records. Partition p of both is one **home partition**, owned by
one worker, which deduplicates every request whose home is p (:mod:`streams.model.
partitioning`). Producers key by request id, so nearly every event is read at home; a
copy read elsewhere is produced unchanged to the rerouted topic, partition home, and
counted there.

The collaborators, one object each, none importing this module:

* :class:`~agents.hot_path.ownership.Ownership`: which home partitions this worker owns
  (assigned, rebuilt, held, revoked), their states, epochs and read positions;
* :class:`~agents.hot_path.batch_reader.BatchReader`: the next batch, in the fences' order;
* :class:`~agents.hot_path.prepare.Preparer`: stages 1-4, pure (validate, route, dedupe,
  aggregate) into a :class:`~agents.hot_path.batch.PreparedBatch`;
* :class:`~agents.hot_path.committer.Committer`: stages 5-6, raw points and sends stored,
  then one batch-log record per home partition (the commit point), then the Kafka offsets.

Stages 1-4 of the next batch (the main thread's CPU) overlap with stages 5-6 of the
previous one (file writes, ``fsync`` and broker round trips, which need no Python time);
the dedupe of the next batch counts the one being committed as seen. Appends keep the
batches' order: a batch's commit starts only once the previous one's is done.

Failures are reported once per condition (:class:`~agents.conditions.ConditionLog`), and
while a stage is failing :meth:`HotPath.not_ready_reason` names it for ``/ready``
(:mod:`agents.web.health`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import mode
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaError

from agents.conditions import ConditionLog, until_done
from agents.hot_path.batch import Topics
from agents.hot_path.batch_reader import BatchReader
from agents.hot_path.committer import Committer, InFlight
from agents.hot_path.home_assignor import sticky_home_assignor
from agents.hot_path.home_state import Rebuilder
from agents.hot_path.ownership import Ownership, RebalanceListener
from agents.hot_path.prepare import Preparer
from agents.hot_path.snapshots import CHECK_SECONDS as SNAPSHOT_CHECK_SECONDS
from agents.hot_path.snapshots import STOP_SECONDS as SNAPSHOT_STOP_SECONDS
from agents.hot_path.snapshots import SnapshotKeeper
from agents.prices_feed import PricesFeed
from streams.app import settings
from streams.gc_tuning import tune_for_batches
from streams.kafka.batch_log import MAX_RECORD_BYTES
from streams.kafka.broker import kafka_client_kwargs, leave_group
from streams.log_throttle import throttle_kafka_client_logs
from streams.malloc_tuning import pin_mmap_threshold
from streams.metrics import CONSUMER_LAG, DEDUPE_BYTES, DEDUPE_IDS
from streams.model.business_time import UsageDates
from streams.model.money import NanoScaler
from streams.model.pricing import Price
from streams.sinks import build_raw_sink
from streams.sinks.raw_retention import maintain_raw_files

__all__ = ["HotPath"]

log = logging.getLogger(__name__)

T = TypeVar("T")

STOP_GRACE_SECONDS = 5.0
#: the largest record (with its headers) the hot path's producer sends: under Apache
#: Kafka's default max.message.bytes, 1,048,588 B, which also counts the record batch's
#: ~70 B of overhead
MAX_PRODUCED_BYTES = 1_048_576 - 1024
RAW_MAINTENANCE_SECONDS = 300.0
PRUNE_SECONDS = max(1.0, min(3600.0, settings.DEDUP_TTL_DAYS * 86_400 / 16))
#: what a failing stage (prepare, commit, rebuild) may raise and still be retried: a
#: full disk, a locked database, a broker away; anything else is a defect and stops it
RETRIED = (sqlite3.Error, OSError, KafkaError, TimeoutError)


@dataclass(frozen=True, slots=True)
class _Parts:
    """The collaborators, made in :meth:`HotPath.on_start` with the consumer they share."""

    consumer: AIOKafkaConsumer
    ownership: Ownership
    reader: BatchReader
    preparer: Preparer
    committer: Committer


class HotPath(mode.Service):
    """Consumes the usage and rerouted topics in batches (module docstring)."""

    def __init__(self, prices: PricesFeed, **kwargs: Any) -> None:
        # model prices for the estimated costs; on the summary writer they are read
        # through the shared summary DB connection that wire() gave the feed
        self.prices = prices
        super().__init__(**kwargs)

    def __post_init__(self) -> None:
        self.topics = Topics(
            settings.USAGE_TOPIC,
            settings.rerouted_topic,
            settings.batch_log_topic,
            settings.dlq_topic,
        )
        self.sink = build_raw_sink(settings)
        self.conditions = ConditionLog(log)
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self._parts: _Parts | None = None
        self.consumer_started = False
        self.phase_started = time.monotonic()
        self._in_flight: InFlight | None = None
        self._committing: asyncio.Future[None] | None = None

    @property
    def parts(self) -> _Parts:
        assert self._parts is not None, "the hot path has not started"
        return self._parts

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
            # sent truncated (Committer._send_dead_letter)
            max_request_size=MAX_PRODUCED_BYTES,
            # reroutes are sent thousands at a time: with aiokafka's 16 KB batches they
            # queued past the request timeout (KafkaTimeoutError, the batch retried);
            # a record batch stays under the broker's limit too
            max_batch_size=MAX_RECORD_BYTES,
        )
        await self.producer.start()
        await self.sink.start()
        consumer = self.consumer = AIOKafkaConsumer(
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
            partition_assignment_strategy=(sticky_home_assignor(self._states_held),),
            session_timeout_ms=int(settings.KAFKA_SESSION_TIMEOUT_SECONDS * 1000),
            rebalance_timeout_ms=int(settings.KAFKA_REBALANCE_TIMEOUT_SECONDS * 1000),
            heartbeat_interval_ms=int(settings.KAFKA_HEARTBEAT_INTERVAL_SECONDS * 1000),
            max_poll_interval_ms=3_600_000,  # a batch may wait long for an InfluxDB outage
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
        )
        ownership = Ownership(
            consumer,
            self.topics,
            make_rebuilder=functools.partial(Rebuilder, settings),
            retry=self._until_done,
            crash=self.crash,
            settle=functools.partial(self._settle, STOP_GRACE_SECONDS),
        )
        self._parts = _Parts(
            consumer,
            ownership,
            BatchReader(
                consumer,
                ownership,
                self.topics,
                self.conditions,
                max_events=settings.BATCH_MAX_EVENTS,
                max_seconds=settings.RAW_BATCH_SECONDS,
                sink_batch=settings.RAW_BATCH_SIZE,
            ),
            Preparer(
                self.topics,
                ownership,
                UsageDates(settings.tz),
                NanoScaler(settings.USAGE_MARKUP_MULTIPLIER),
                prices=self._current_prices,
            ),
            Committer(self.producer, consumer, self.sink, ownership, self.topics, self.conditions),
        )
        consumer.subscribe(
            [self.topics.usage, self.topics.rerouted], listener=RebalanceListener(ownership)
        )
        await self.prices.start()
        # the consumer starts in _consume: aiokafka's start() returns only once the group
        # has assigned partitions (seconds), and the worker's other services (the summary
        # writer, the web server's /ready) must not wait for that

    def _states_held(self) -> set[int]:
        """The home partitions whose state this worker holds, sent with each join: the
        sticky assignor gives them back to it."""
        return set(self.parts.ownership.states)

    def _current_prices(self) -> Mapping[str, Price]:
        return self.prices.current

    async def on_stop(self) -> None:
        """Let the batch in flight finish (briefly): one stuck on an outage is cancelled,
        unappended, and read again by whoever owns the partition next."""
        if not await self._settle(STOP_GRACE_SECONDS):
            log.warning("hot path: stopping with a batch in flight; it will be redelivered")
            if self._committing is not None:
                self._committing.cancel()
        ownership = self._parts.ownership if self._parts is not None else None
        if ownership is not None:
            for task in list(ownership.rebuilding.values()):
                task.cancel()
        await self._snapshot_on_stop()
        if self.consumer is not None:
            if await leave_group(self.consumer):
                log.info("hot path: left the consumer group %s", settings.APP_ID)
            try:
                await asyncio.wait_for(self.consumer.stop(), STOP_GRACE_SECONDS)
            except TimeoutError:  # a join the broker has not answered yet: let it be
                log.warning("hot path: the consumer did not stop in %.0f s", STOP_GRACE_SECONDS)
        if ownership is not None and ownership.rebuilder is not None:
            await ownership.rebuilder.stop()
        if self.producer is not None:
            await self.producer.stop()
        await self.sink.close()
        await self.prices.stop()

    async def _settle(self, timeout: float) -> bool:
        """Wait (bounded) for the batch being committed; True when none is left."""
        committing = self._committing
        if committing is None:
            return True
        done, _ = await asyncio.wait([committing], timeout=timeout)
        return bool(done)

    # What /ready and /status read -------------------------------------------------------

    @property
    def joined(self) -> bool:
        """An assignment is in force (False from a revoke to the next)."""
        return self._parts is not None and self._parts.ownership.joined

    @property
    def rebuilding(self) -> Mapping[int, asyncio.Future[None]]:
        """Assigned home partitions whose state is being rebuilt."""
        return self._parts.ownership.rebuilding if self._parts is not None else {}

    @property
    def owned(self) -> Set[int]:
        """Home partitions rebuilt and read by this worker."""
        return self._parts.ownership.owned if self._parts is not None else set()

    def assigned_partitions(self) -> list[int]:
        return self._parts.ownership.assigned_partitions() if self._parts is not None else []

    def not_ready_reason(self) -> str | None:
        """Why the hot path cannot record events right now (``/ready``), or None."""
        reasons = [
            f"hot path {name} failing: {error}"
            for name, error in self.conditions.active().items()
            if name != "kafka-commit"  # informational: the batch log holds the positions
        ]
        if self._parts is not None:
            reasons += self._parts.ownership.held_reasons()
        if settings.raw_sink_kind == "file" and self.sink.consecutive_failures:
            reasons.append(
                f"raw files under {settings.raw_dir} not writable "
                f"({self.sink.consecutive_failures} failed attempts)"
            )
        return "; ".join(reasons) or None

    def update_lag(self) -> None:
        """Lag = high watermark seen in fetch responses − next offset read, per usage
        partition (``end_offsets()`` is wrong on the test broker)."""
        if self._parts is None:
            return
        consumer, committed = self._parts.consumer, self._parts.ownership.committed
        for tp in consumer.assignment():
            if tp.topic != self.topics.usage:
                continue
            highwater = consumer.highwater(tp)
            if highwater is None or highwater < 0:
                continue
            lag = highwater - committed.get((tp.topic, tp.partition), 0)
            CONSUMER_LAG.labels(topic=tp.topic, partition=str(tp.partition)).set(max(lag, 0))

    # The loop ---------------------------------------------------------------------------

    @mode.Service.task
    async def _consume(self) -> None:
        """While batch N is appended to the batch log, batch N+1 is fetched, validated,
        deduplicated and written to the raw sink. Appends keep the batches' order."""
        parts = self.parts
        self.phase_started = time.monotonic()
        await parts.consumer.start()
        self.consumer_started = True
        while not self.should_stop:
            records = await parts.reader.next_batch()
            if not records:
                await self._finish_commit()
                continue
            in_flight = await self._until_done("prepare", functools.partial(self._prepare, records))
            in_flight.batch.full = len(records) >= settings.BATCH_MAX_EVENTS
            await self._finish_commit()
            self._in_flight = in_flight
            self._committing = asyncio.ensure_future(
                self._until_done("commit", functools.partial(parts.committer.commit, in_flight))
            )
        await self._finish_commit()

    async def _finish_commit(self) -> None:
        if self._committing is not None:
            try:
                await asyncio.shield(self._committing)
            finally:
                if self._committing.done():
                    self._committing = None
                    self._in_flight = None

    async def _prepare(self, records: Sequence[ConsumerRecord]) -> InFlight:
        """Stages 1-4 (:mod:`agents.hot_path.prepare`), the event loop let run between
        them, and the sends each stage found started at once (awaited by the commit)."""
        parts = self.parts
        previous = self._in_flight.batch if self._in_flight is not None else None
        stages = parts.preparer.stages(records, previous)
        in_flight = InFlight(next(stages))
        await _let_the_loop_run()
        for _ in stages:
            parts.committer.start_sends(in_flight)
            await _let_the_loop_run()
        parts.committer.start_sends(in_flight)
        return in_flight

    async def _until_done(self, stage: str, step: Callable[[], Awaitable[T]]) -> T:
        """Run a stage until it succeeds: a failing sink or broker stalls the batch here
        (nothing is appended), never drops it."""
        return await until_done(self.conditions, stage, f"{stage} of a batch failed", step, RETRIED)

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
        if self._parts is None:
            return
        owned = self._parts.ownership.owned_states()
        DEDUPE_IDS.set(sum(len(state.seen) for state in owned))
        DEDUPE_BYTES.set(sum(state.seen.approx_bytes() for state in owned))

    @mode.Service.timer(SNAPSHOT_CHECK_SECONDS)
    async def _snapshots(self) -> None:
        """Snapshot the owned home partitions' seen sets that are due
        (agents/hot_path/snapshots.py): taken here, between appends, written in a thread."""
        self._start_snapshots(on_stop=False)

    async def _snapshot_on_stop(self) -> None:
        """A last snapshot of each owned partition whose head moved since its last one, so
        a restart reads (nearly) nothing back; bounded, a write left unfinished is lost."""
        keeper = self._start_snapshots(on_stop=True)
        if keeper is not None:
            await keeper.settle(SNAPSHOT_STOP_SECONDS)

    def _start_snapshots(self, on_stop: bool) -> SnapshotKeeper | None:
        """Start a snapshot of each owned partition that is due, or on stop of each whose
        head moved since its last one; the keeper, None before the first assignment."""
        ownership = self._parts.ownership if self._parts is not None else None
        keeper = ownership.rebuilder.snapshots if ownership and ownership.rebuilder else None
        if ownership is None or keeper is None:
            return None
        for state in ownership.owned_states():
            if keeper.moved(state) if on_stop else keeper.due(state):
                keeper.start(state)
        return keeper

    @mode.Service.timer(PRUNE_SECONDS)
    async def _prune(self) -> None:
        """Forget request ids older than DEDUP_TTL_DAYS, on quiet partitions too."""
        if self._parts is None:
            return
        now_ms = time.time_ns() // 1_000_000
        for state in self._parts.ownership.states.values():
            state.seen.prune(now_ms)


async def _let_the_loop_run() -> None:
    """Between the CPU-bound stages of ``prepare`` (each ~0.1-0.4 s for a full batch): the
    previous batch's commit, the fetcher and the producer move on only when the event
    loop runs, and each of their steps (a thread's write done, a response read) would
    otherwise wait for the whole of ``prepare``."""
    await asyncio.sleep(0)
