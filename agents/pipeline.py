"""The hot path, in one place: batch in → validate → dedupe → raw sink → aggregate → commit.

A Faust ``@app.service`` that owns a plain aiokafka consumer in the consumer group
``APP_ID`` and reads the usage topic with ``getmany`` in batches of up to
``BATCH_MAX_EVENTS`` records (or ``RAW_BATCH_SECONDS``). Faust keeps everything else: its
web server, timers, the leader election of the refresh, the CLI. Faust's per-message
path (``Consumer._drain_messages`` awaits ``wait_first`` per message; ``take()`` still runs
every message through it) moved ~6–12k events/s here; a batch pays its costs once.

Per batch, in OpenMeter's sink order:

1. **validate** every record (``parse_events``); invalid ones are produced to the
   dead-letter topic with the reason and their origin;
2. **dedupe**: copies inside the batch are dropped, and copies already in the ledger
   (checked with one read) are dropped before anything is written;
3. **raw sink**: the batch's new requests are written as raw points (retried with backoff
   and a circuit breaker until they are stored);
4. **aggregate + commit**: one SQLite transaction re-checks the ledger (another worker may
   have recorded a copy meanwhile), adds the new requests, folds their increments into the
   day's totals and stores every source partition's next offset
   (:class:`tables.ledger.LedgerStore`); the dead-letter sends are awaited before it;
5. the offsets are committed to Kafka too (informational: the consumer seeks to the
   stored ones on assignment).

Stages 1–3 of the next batch overlap with stage 4 of the previous one (SQLite works in
its own thread and releases the GIL); commits keep the batches' order. The pre-check
treats the batch being committed as recorded, so a copy in two consecutive batches is
never written twice to the raw sink.

A crash anywhere before 4 redelivers the batch: raw points land on the same points again
(and the file sink appends a line identical to the first), the ledger drops what it holds.
Producers may key by anything, so copies of a request may sit on any partition: the
ledger is shared by every worker, and its check-and-insert is one transaction, so no
re-keying hop is needed.

Failures are reported once per condition, not once per retry: the first failure of a
stage is one ERROR line, repeats of the same condition are summed up at most once a
minute, and the recovery is one WARNING line (:class:`ConditionLog`). While a stage is
failing, :meth:`HotPath.not_ready_reason` names it for ``/ready`` (:mod:`agents.health`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import mode
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import ConsumerStoppedError, KafkaError, MessageSizeTooLargeError
from aiokafka.structs import OffsetAndMetadata

from streams.app import app, settings
from streams.broker import kafka_client_kwargs
from streams.business_time import UsageDates
from streams.event import MAX_EVENT_BYTES, InvalidEvent, UsageEvent, parse_events
from streams.log_throttle import throttle_kafka_client_logs
from streams.metrics import (
    CONSUMER_LAG,
    EVENTS_CONSUMED,
    EVENTS_DUPLICATE,
    EVENTS_INVALID,
    EVENTS_LATE,
)
from streams.money import NanoScaler
from streams.pricing import Price
from streams.sinks import build_raw_sink
from streams.sinks.lineprotocol import line
from streams.sinks.raw_retention import maintain_raw_files
from tables.connection import summary_db
from tables.ledger import BatchResult, LedgerEvent, LedgerStore, ledger_events
from tables.reference import latest_model_prices
from tables.watermarks import day_closer, wall_clock_ms

__all__ = ["HotPath", "hot_path"]

log = logging.getLogger(__name__)

PRICES_RELOAD_SECONDS = 300.0
STOP_GRACE_SECONDS = 10.0
RAW_MAINTENANCE_SECONDS = 300.0
# Hourly, or often enough that a short retention (tests use seconds) is honoured closely.
_PRUNE_INTERVAL_SECONDS = max(
    1.0, min(3600.0, settings.ledger_retention_days * 86_400 / 16)
)  # every UTC offset in use is a multiple of 15 minutes


def reported(error: BaseException) -> BaseException:
    """The error worth reporting: on a full disk (SQLITE_FULL) or an I/O error SQLite
    rolls the transaction back itself, so the ledger's ``ROLLBACK`` then fails with
    "cannot rollback - no transaction is active", and the real error (``database or disk
    is full``) is only that exception's ``__context__``."""
    while "no transaction is active" in str(error) and error.__context__ is not None:
        error = error.__context__
    return error


class ConditionLog:
    """One log line when a condition starts, a summary at most every ``repeat_seconds``
    while it lasts, one line when it ends.

    The hot path retries a failing stage forever (every 1-8 s) and the fetch loop every
    second; a line per attempt would bury the one that says what is wrong (a full disk, a
    locked database, a frozen broker) under hundreds of copies. A condition is identified
    by a name (``"commit"``, ``"fetch"``...); a different error text for the same name is
    the same condition (the error of the latest attempt is kept for the summary).
    """

    def __init__(self, logger: logging.Logger, repeat_seconds: float = 60.0) -> None:
        self.log = logger
        self.repeat_seconds = repeat_seconds
        # name -> [first failure (monotonic), last summary (monotonic), attempts, error]
        self._active: dict[str, list[Any]] = {}

    def failed(self, name: str, message: str, error: object, level: int = logging.ERROR) -> None:
        """An attempt failed: log it if the condition is new, or summarise once a while."""
        now = time.monotonic()
        state = self._active.get(name)
        if state is None:
            self._active[name] = [now, now, 1, str(error)]
            self.log.log(level, "hot path: %s: %s (retrying; reported once)", message, error)
            return
        state[2] += 1
        state[3] = str(error)
        if now - state[1] >= self.repeat_seconds:
            state[1] = now
            self.log.log(
                level,
                "hot path: %s: still failing after %d attempts in %.0f s: %s",
                message,
                state[2],
                now - state[0],
                error,
            )

    def recovered(self, name: str, message: str) -> None:
        """An attempt succeeded: close the condition (one line, only if it was open)."""
        state = self._active.pop(name, None)
        if state is not None:
            self.log.warning(
                "hot path: %s: recovered after %d failed attempts in %.0f s",
                message,
                state[2],
                time.monotonic() - state[0],
            )

    def active(self) -> dict[str, str]:
        """Open conditions: name -> the latest error text."""
        return {name: state[3] for name, state in self._active.items()}


@dataclass(slots=True)
class PreparedBatch:
    """A batch after validation, dedupe pre-check and the raw sink, ready to commit."""

    records: int
    entries: list[LedgerEvent] = field(default_factory=list)
    request_ids: set[str] = field(default_factory=set)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    invalid: dict[str, int] = field(default_factory=dict)
    newest: dict[int, int] = field(default_factory=dict)  # partition -> newest event ms
    copies: int = 0  # copies inside the batch
    known: int = 0  # copies recorded before (pre-check)


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, owner: HotPath) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.owner.partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.owner.partitions_assigned(assigned)


class HotPath(mode.Service):
    """Consumes the usage topic in batches and records them (module docstring)."""

    def __post_init__(self) -> None:
        self.topic = settings.USAGE_TOPIC
        self.store = LedgerStore(settings.summary_db_path, settings.ledger_retention_days)
        self.sink = build_raw_sink(settings)
        self.closer = day_closer()
        self.dates = UsageDates(settings.tz)
        self.markup = NanoScaler(settings.USAGE_MARKUP_MULTIPLIER)
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.committed: dict[int, int] = {}  # partition -> next offset stored
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "ledger")
        self._prices: dict[str, Price] = {}
        # a second connection for the pre-check, so it never queues behind a commit
        self.reader = LedgerStore(settings.summary_db_path, settings.ledger_retention_days, 16)
        self._in_flight: PreparedBatch | None = None
        self._committing: asyncio.Future[BatchResult] | None = None
        self.conditions = ConditionLog(log)
        global _instance
        _instance = self

    # Lifecycle --------------------------------------------------------------------------

    async def on_start(self) -> None:
        throttle_kafka_client_logs()
        client = kafka_client_kwargs(settings)
        self.producer = AIOKafkaProducer(
            **client,
            linger_ms=5,
            enable_idempotence=settings.KAFKA_PRODUCER_IDEMPOTENCE,
            acks="all",
            # dead letters carry the original bytes, as big as the consumer could fetch;
            # a broker that refuses one gets it truncated (_send_dead_letter)
            max_request_size=16 * 1024 * 1024,
        )
        await self.producer.start()
        await self.sink.start()
        self.consumer = AIOKafkaConsumer(
            **client,
            group_id=settings.APP_ID,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=int(settings.KAFKA_SESSION_TIMEOUT_SECONDS * 1000),
            rebalance_timeout_ms=int(settings.KAFKA_REBALANCE_TIMEOUT_SECONDS * 1000),
            heartbeat_interval_ms=int(settings.KAFKA_HEARTBEAT_INTERVAL_SECONDS * 1000),
            max_poll_interval_ms=3_600_000,  # a batch may wait long for an InfluxDB outage
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
        )
        self.consumer.subscribe([self.topic], listener=_Rebalance(self))
        await self.load_prices()
        await self.consumer.start()

    async def on_stop(self) -> None:
        """Let the batch in flight finish (briefly): one stuck on an outage is cancelled,
        uncommitted, and redelivered to whoever reads the partition next."""
        if not await self._settle(STOP_GRACE_SECONDS):
            log.warning("hot path: stopping with a batch in flight; it will be redelivered")
        if self.consumer is not None:
            await self.consumer.stop()
        if self.producer is not None:
            await self.producer.stop()
        await self.sink.close()
        self._executor.submit(self.store.close)
        self.reader.close()
        self._executor.shutdown(wait=False)

    async def _in_store(self, function: Any, *args: object) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    # Rebalancing ------------------------------------------------------------------------

    async def partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        """Seek to the offsets stored with the last batch (SQLite is authoritative)."""
        stored = await self._in_store(self.store.stored_offsets, self.topic)
        assert self.consumer is not None
        for tp in assigned:
            if tp.partition in stored:
                self.consumer.seek(tp, stored[tp.partition])
                self.committed[tp.partition] = stored[tp.partition]
        log.info(
            "hot path: assigned %s partitions %s",
            self.topic,
            sorted(tp.partition for tp in assigned),
        )

    async def partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        """Finish the batch in flight (briefly), then forget the partitions' watermarks.

        Not needed for exactness (a batch applied after the partition moved finds its
        requests in the ledger), only to spare the next owner re-reading it.
        """
        await self._settle(STOP_GRACE_SECONDS)
        partitions = [tp.partition for tp in revoked]
        self.closer.forget(partitions)
        for partition in partitions:
            self.committed.pop(partition, None)
            with contextlib.suppress(KeyError):
                CONSUMER_LAG.remove(self.topic, str(partition))

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
        return sorted(tp.partition for tp in self.consumer.assignment())

    def not_ready_reason(self) -> str | None:
        """Why the hot path cannot record events right now (``/ready``), or None.

        A stage retrying a failure (database, disk, broker), or the direct raw file sink
        failing (it retries inside the prepare stage, so only its breaker knows). The
        spooling InfluxDB sink is left out on purpose: an InfluxDB outage does not stop
        billing, the spool takes the points."""
        reasons = [
            f"hot path {name} failing: {error}"
            for name, error in self.conditions.active().items()
            if name != "kafka-commit"  # informational commit: SQLite holds the offsets
        ]
        if settings.raw_sink_kind == "file" and self.sink.consecutive_failures:
            reasons.append(
                f"raw files under {settings.raw_dir} not writable "
                f"({self.sink.consecutive_failures} failed attempts)"
            )
        return "; ".join(reasons) or None

    def update_lag(self) -> None:
        """Lag = high watermark seen in fetch responses − next offset stored, per partition.

        ``end_offsets()`` (ListOffsets latest) is wrong on the test broker; the high
        watermark carried by fetch responses is right on every broker."""
        if self.consumer is None:
            return
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            if highwater is None or highwater < 0:
                continue
            lag = highwater - self.committed.get(tp.partition, 0)
            CONSUMER_LAG.labels(topic=tp.topic, partition=str(tp.partition)).set(max(lag, 0))

    # The loop ---------------------------------------------------------------------------

    @mode.Service.task
    async def _consume(self) -> None:
        """Two stages overlap: while batch N commits (SQLite, in its own thread), batch
        N+1 is fetched, validated, pre-checked and written to the raw sink. Commits keep
        the batches' order."""
        assert self.consumer is not None
        while not self.should_stop:
            records = await self._next_batch()
            self.closer.behind = len(records) >= settings.BATCH_MAX_EVENTS
            if not records:
                await self._finish_commit()
                continue
            batch = await self._until_done("prepare", self.prepare, records)
            await self._finish_commit()
            self._in_flight = batch
            self._committing = asyncio.ensure_future(self._until_done("commit", self.commit, batch))
        await self._finish_commit()

    async def _finish_commit(self) -> None:
        """Wait for the batch being committed, if any."""
        if self._committing is not None:
            try:
                await asyncio.shield(self._committing)
            finally:
                if self._committing.done():
                    self._committing = None
                    self._in_flight = None

    async def _next_batch(self) -> list[ConsumerRecord]:
        """Up to BATCH_MAX_EVENTS records, waiting at most RAW_BATCH_SECONDS for more."""
        assert self.consumer is not None
        limit = settings.BATCH_MAX_EVENTS
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + settings.RAW_BATCH_SECONDS
        while len(records) < limit:
            wait = deadline - time.monotonic()
            if wait <= 0 and records:
                break
            try:
                fetched = await self.consumer.getmany(
                    timeout_ms=max(int(wait * 1000), 0) if records else 1000,
                    max_records=limit - len(records),
                )
            except ConsumerStoppedError:  # the worker is stopping
                return []
            except KafkaError as error:
                self.conditions.failed("fetch", "fetch failed", error, logging.WARNING)
                await asyncio.sleep(1)
                break
            self.conditions.recovered("fetch", "fetch failed")
            for partition_records in fetched.values():
                records.extend(partition_records)
            if not fetched and not records:
                break
        return records

    async def _until_done(self, stage: str, step: Any, argument: Any) -> Any:
        """Run a stage until it succeeds: a failing database or broker stalls the batch
        here (nothing is committed), never drops it. Logged once per condition
        (:class:`ConditionLog`); ``/ready`` reports the stage as failing meanwhile."""
        delay = 1.0
        message = f"{stage} of a batch failed"
        while True:
            try:
                result = await step(argument)
            except (sqlite3.Error, OSError, KafkaError) as error:
                self.conditions.failed(stage, message, reported(error))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 8.0)
            else:
                self.conditions.recovered(stage, message)
                return result

    async def prepare(self, records: Sequence[ConsumerRecord]) -> PreparedBatch:
        """Validate, dead-letter, drop copies, write the raw points (stages 1-3)."""
        now_ms = wall_clock_ms()
        parsed = parse_events([record.value for record in records], now_ms)
        candidates: dict[str, tuple[UsageEvent, ConsumerRecord]] = {}
        dead_letters: list[asyncio.Future[Any]] = []
        batch = PreparedBatch(len(records))
        for record, event in zip(records, parsed, strict=True):
            if isinstance(event, InvalidEvent):
                batch.invalid[event.reason] = batch.invalid.get(event.reason, 0) + 1
                dead_letters.append(await self._dead_letter(record, event))
                continue
            if event.event_ms > batch.newest.get(record.partition, -1):
                batch.newest[record.partition] = event.event_ms
            if event.request_id in candidates:
                batch.copies += 1
            else:
                candidates[event.request_id] = (event, record)
        # copies recorded before (the batch being committed counts as recorded)
        known = await asyncio.to_thread(self.reader.known, list(candidates))
        in_flight = self._in_flight
        if in_flight is not None:
            known.update(rid for rid in candidates if rid in in_flight.request_ids)
        batch.known = len(known)
        batch.entries = ledger_events(
            [
                (event, record.partition, record.offset)
                for request_id, (event, record) in candidates.items()
                if request_id not in known
            ],
            self._prices,
            self.dates,
        )
        batch.request_ids = {entry.request_id for entry in batch.entries}
        if batch.entries:
            await self.sink.write_lines([self._raw_line(entry) for entry in batch.entries])
        if dead_letters:
            await asyncio.gather(*dead_letters)
        for record in records:
            key = (record.topic, record.partition)
            if record.offset + 1 > batch.offsets.get(key, -1):
                batch.offsets[key] = record.offset + 1
        return batch

    async def commit(self, batch: PreparedBatch) -> BatchResult:
        """Stage 4 and 5: the one SQLite transaction, then the Kafka commit and metrics."""
        result: BatchResult = await self._in_store(
            self.store.commit_batch, batch.entries, batch.offsets
        )
        EVENTS_CONSUMED.inc(batch.records)
        for reason, count in batch.invalid.items():
            EVENTS_INVALID.labels(reason=reason).inc(count)
        EVENTS_DUPLICATE.inc(batch.copies + batch.known + result.duplicates)
        EVENTS_LATE.inc(result.late)
        for partition, event_ms in batch.newest.items():
            self.closer.observe(partition, event_ms)
        for (_, partition), offset in batch.offsets.items():
            self.committed[partition] = offset
        await self._commit_kafka(batch.offsets)
        return result

    async def _dead_letter(self, record: ConsumerRecord, event: InvalidEvent) -> Any:
        """Send one invalid record to the dead-letter topic (delivery awaited in
        ``prepare``, concurrently with the others)."""
        return asyncio.ensure_future(self._send_dead_letter(record, event))

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

    async def _commit_kafka(self, offsets: Mapping[tuple[str, int], int]) -> None:
        assert self.consumer is not None
        assignment = self.consumer.assignment()
        commit = {
            TopicPartition(topic, partition): OffsetAndMetadata(offset, "")
            for (topic, partition), offset in offsets.items()
            if TopicPartition(topic, partition) in assignment
        }
        if not commit:
            return
        try:
            await self.consumer.commit(commit)
        except KafkaError as error:  # SQLite holds the authoritative offsets
            self.conditions.failed("kafka-commit", "Kafka offset commit", error, logging.INFO)
        else:
            self.conditions.recovered("kafka-commit", "Kafka offset commit")

    def _raw_line(self, entry: LedgerEvent) -> str:
        return line(
            entry.request_id,
            entry.client_org_id,
            entry.user_id,
            entry.model,
            entry.input_tokens,
            entry.output_tokens,
            entry.cost_nano,
            self.markup(entry.cost_nano),
            entry.event_ms,
        )

    # Timers -----------------------------------------------------------------------------

    @mode.Service.timer(PRICES_RELOAD_SECONDS)
    async def _reload_prices(self) -> None:
        await self.load_prices()

    async def load_prices(self) -> None:
        """The latest stored price per model, for events without ``cost_usd``."""
        try:
            self._prices = dict(await latest_model_prices(await summary_db()))
        except sqlite3.Error as error:
            log.warning("could not load model prices: %s", error)

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

    @mode.Service.timer(_PRUNE_INTERVAL_SECONDS)
    async def _prune(self) -> None:
        """Drop per-event rows past LEDGER_RETENTION_DAYS (chunked; see LedgerStore.prune)."""
        try:
            await self._in_store(self.store.prune)
        except sqlite3.Error as error:
            log.warning(
                "ledger pruning failed, next try in %.0f s: %s", _PRUNE_INTERVAL_SECONDS, error
            )


_instance: HotPath | None = None


def hot_path() -> HotPath | None:
    """The worker's running hot path (None before it started, or in CLI commands)."""
    return _instance


app.service(HotPath)
