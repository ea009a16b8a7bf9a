"""The summary writer: every worker's batch-log records into the summary DB, once each.

Runs only where ``SUMMARY_WRITER`` is true (the default, so one worker is still the whole
pipeline). It reads every partition of ``<APP_ID>-batch-log`` itself, without a consumer
group (``assign``), from the offsets stored in ``batch_log_heads``, and applies what it
reads in one SQLite transaction per fetch (:class:`tables.summary_db.batch_apply.BatchApplier`):
sums of valid records into ``daily_pending``, with the partition's next offset and chain
head. A crash before the commit reads the same records again; after it, the stored
offsets skip them. So no record's sums are ever added twice, whoever restarts.

Each partition's watermark travels in its records; the stored heads feed the shared
:class:`tables.watermarks.DayCloser`, so the rollup closes a date when every partition
seen has passed it (or the wall clock has). Its volume is one record per batch and home
partition, with one row per (date, key) of the batch: aggregates, not events.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import sqlite3
import time
from typing import Any

import mode
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import ConsumerStoppedError, KafkaError
from msgspec.structs import astuple

from agents.conditions import ConditionLog, until_done
from agents.replay.results import FoundResult, find_result
from agents.summary_writer.claim import ClaimKeeper, claimant_of
from agents.summary_writer.log_guard import BatchLogGuard
from streams.app import settings
from streams.kafka.batch_log import (
    BadChainRecord,
    BatchEntry,
    Fence,
    RawLogRecord,
    SumRow,
    decode_rows_raw,
    encode,
    record_mark,
)
from streams.kafka.broker import (
    BOUNDED_READ_WAIT_MS,
    FOLLOW_WAIT_MS,
    groupless_consumer,
    kafka_client_kwargs,
)
from streams.kafka.writer_claim import HEARTBEAT_SECONDS
from streams.metrics import (
    BATCH_LOG_RECORDS_REJECTED,
    EVENTS_LATE,
    PARTIALS_APPLIED,
    PARTIALS_SKIPPED,
    SUMMARY_WRITER_HELD,
    SUMMARY_WRITER_LAG,
)
from streams.settings import Settings
from tables.summary_db.batch_apply import ApplyResult, BatchApplier, StoredHead
from tables.summary_db.replay_store import replace_day
from tables.summary_db.schema import connect
from tables.summary_db.summary_store import SummaryRow
from tables.watermarks import DayCloser

__all__ = ["SummaryWriter", "carry_over_offsets"]

log = logging.getLogger(__name__)

MAX_RECORDS_PER_TRANSACTION = 500
#: How long after the last full batch (or while this writer has records left to apply)
#: the pipeline still counts as catching up (``DayCloser.behind``). Why: a backlog's
#: batches are not all full (the first, the last, the reroutes' ones), and each
#: non-full one ended the catch-up for the rollup, whose next pass merged every due
#: date at once: 12-17 s passes (bench/worker_profile.py, three closed dates of ~80k
#: keys each) holding the write lock, the writer's applies standing still behind them.
BEHIND_HOLD_SECONDS = 10.0
#: How often a writer held at every fence of one replay looks for that replay's result.
RESULT_LOOK_SECONDS = 5.0
#: How old a replay's result must be before the writer completes the replay itself: a
#: running replay publishes its result moments before its own replace.
RESULT_TAKEOVER_SECONDS = 30.0


class SummaryWriter(mode.Service):
    """Applies the batch log (module docstring). ``closer``: the worker's
    :class:`~tables.watermarks.DayCloser`, which the rollup asks (agents/wiring.py)."""

    def __init__(self, closer: DayCloser) -> None:
        self.closer = closer
        super().__init__()

    def __post_init__(self) -> None:
        self.topic = settings.batch_log_topic
        self.applier = BatchApplier(settings.summary_db_path)
        self.consumer: AIOKafkaConsumer | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "summary-writer")
        self.conditions = ConditionLog(log, "summary writer")
        self.next_offsets: dict[int, int] = {}
        self._last_full = float("-inf")  # monotonic time of the last full batch applied
        # partition -> the fence it waits at (a replay of that date not complete yet)
        self.blocked: dict[int, Fence] = {}
        self.blocked_at: dict[int, int] = {}  # partition -> the offset of that fence
        self._next_result_look = 0.0  # monotonic time of the next look for a result
        # partition -> why its batch log is not followed (refused by
        # agents/summary_writer/log_guard.py)
        self.refused: dict[int, str] = {}
        self.guard = BatchLogGuard(settings, self.applier, self._in_db)
        self.claim: ClaimKeeper | None = None
        self.lag = 0  # batch-log records not applied yet (usage_stream_summary_writer_lag_records)
        self.stepped_down: str | None = None  # another writer owns the log (who)

    async def _in_db(self, function: Any, *args: object) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def on_start(self) -> None:
        self.consumer = groupless_consumer(
            settings,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=16 * 1024 * 1024,
            fetch_max_wait_ms=FOLLOW_WAIT_MS,
        )
        await self.consumer.start()
        partitions = sorted(self.consumer.partitions_for_topic(self.topic) or ())
        if not partitions:
            await self.consumer._client.force_metadata_update()
            partitions = sorted(self.consumer.partitions_for_topic(self.topic) or ())
        heads: dict[int, StoredHead] = await self._in_db(self.applier.heads)
        self.next_offsets = {p: stored.next_offset for p, stored in heads.items()}
        tps = [TopicPartition(self.topic, p) for p in partitions]
        self.consumer.assign(tps)
        for tp in tps:
            stored = heads.get(tp.partition)
            if stored is None:
                await self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, stored.next_offset)
        self._observe(heads)
        self.claim = ClaimKeeper(settings, await asyncio.to_thread(claimant_of, settings))
        await self.claim.start()
        log.info("summary writer: applying %s partitions %s", self.topic, partitions)

    async def on_stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        if self.claim is not None:
            try:
                if self.stepped_down is None:
                    await asyncio.wait_for(self.claim.release(), 5)
            except (KafkaError, OSError, TimeoutError) as error:
                log.warning("summary writer: could not release its claim: %s", error)
            await self.claim.stop()

    @mode.Service.timer(HEARTBEAT_SECONDS)
    async def _heartbeat(self) -> None:
        """Keep the claim on the batch log, and step down (stop applying, ``/ready``
        503) when another writer owns it: this one was frozen past the claim's expiry
        and another took over (streams/kafka/writer_claim.py)."""
        if self.claim is None or self.should_stop:
            return
        try:
            other = await self.claim.say("heartbeat")
        except (KafkaError, OSError, TimeoutError) as error:
            log.warning("summary writer: heartbeat failed: %s", error)
            return
        if other == "no live owner":
            return
        if other is not None and self.stepped_down is None:
            log.error("summary writer: stepping down: %s", other)
        elif other is None and self.stepped_down is not None:
            log.warning("summary writer: owns the batch log again; applying")
        self.stepped_down = other

    async def on_shutdown(self) -> None:
        """After mode has cancelled ``_apply`` (``on_stop`` runs before that): shutting
        the executor down in ``on_stop`` made an ``_apply`` still running fail with
        "cannot schedule new futures after shutdown", and the worker exit 1 on SIGTERM."""
        self._executor.submit(self.applier.close)
        self._executor.shutdown(wait=False)

    def _observe(self, heads: dict[int, StoredHead]) -> None:
        for partition, stored in heads.items():
            if stored.head.newest_event_ms >= 0:
                self.closer.observe(partition, stored.head.newest_event_ms)

    @mode.Service.task
    async def _apply(self) -> None:
        assert self.consumer is not None
        while not self.should_stop:
            try:
                fetched = await self.consumer.getmany(
                    timeout_ms=500, max_records=MAX_RECORDS_PER_TRANSACTION
                )
            except ConsumerStoppedError:
                return
            except KafkaError as error:
                log.warning("summary writer: fetch failed: %s", error)
                await asyncio.sleep(1)
                continue
            if self.stepped_down is not None:
                self._update_lag()
                await self._hold_all()
                continue
            await self._unblock()
            await self._guard(self._shrunk())
            self._update_lag()
            records: list[tuple[int, int, RawLogRecord | None]] = []
            marks: dict[int, tuple[int, str]] = {}  # partition -> the last record's mark
            full = False  # a full batch among them: its worker is catching up
            for tp, batch in fetched.items():
                if tp.partition in self.blocked or tp.partition in self.refused:
                    continue
                for record in batch:
                    try:
                        decoded: RawLogRecord | None = decode_rows_raw(record.value)
                    except BadChainRecord:
                        log.warning("summary writer: %s %d: not a chain record", tp, record.offset)
                        decoded = None
                    if isinstance(decoded, BatchEntry) and decoded.behind:
                        full = True
                    if (
                        isinstance(decoded, Fence)
                        and record.offset >= self.next_offsets.get(tp.partition, 0)
                        and not await self._in_db(self.applier.replay_done, decoded)
                    ):
                        self._block(tp, record.offset, decoded)
                        break
                    records.append((tp.partition, record.offset, decoded))
                    marks[tp.partition] = (record.offset, record_mark(record))
            if not records:
                self.closer.behind = self._behind()
                continue
            # never skip a fetched group: retry until the DB takes it
            result, heads = await until_done(
                self.conditions,
                "apply",
                "applying batch-log records failed",
                functools.partial(self._in_db, self.applier.apply, records, marks),
                (sqlite3.Error, OSError),
            )
            PARTIALS_APPLIED.inc(result.applied)
            if result.redelivered:
                PARTIALS_SKIPPED.labels(reason="redelivered").inc(result.redelivered)
            self._count_rejected(result)
            if result.not_in_chain:
                # a record off the chain: a zombie's, or a log that is not the one followed
                await self._guard({partition for partition, _, _ in records})
            EVENTS_LATE.inc(result.late)
            self.next_offsets = {p: stored.next_offset for p, stored in heads.items()}
            if full:
                self._last_full = time.monotonic()
            self.closer.behind = self._behind()
            self._observe(heads)

    async def _hold_all(self) -> None:
        """Apply nothing while another writer owns the log: read again from the stored
        positions once this one owns it again."""
        assert self.consumer is not None
        heads: dict[int, StoredHead] = await self._in_db(self.applier.heads)
        for tp in self.consumer.assignment():
            stored = heads.get(tp.partition)
            if stored is None:
                await self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, stored.next_offset)
        await asyncio.sleep(1)

    @staticmethod
    def _count_rejected(result: ApplyResult) -> None:
        for reason, count in (
            ("not_in_chain", result.not_in_chain),
            ("not_a_record", result.not_a_record),
            ("missing_part", result.missing_parts),
        ):
            if count:
                BATCH_LOG_RECORDS_REJECTED.labels(reason=reason).inc(count)
        if result.not_a_record or result.missing_parts:
            log.error(
                "summary writer: %d batch-log records are no records, %d parts named by"
                " valid entries were never read (their rows are not billed)",
                result.not_a_record,
                result.missing_parts,
            )

    def _update_lag(self) -> None:
        assert self.consumer is not None
        lag = 0
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            if highwater is not None:
                lag += max(0, highwater - self.next_offsets.get(tp.partition, 0))
        SUMMARY_WRITER_LAG.set(lag)
        self.lag = lag
        assigned = len(self.consumer.assignment())
        SUMMARY_WRITER_HELD.labels(reason="replay_fence").set(len(self.blocked))
        SUMMARY_WRITER_HELD.labels(reason="log_refused").set(len(self.refused))
        SUMMARY_WRITER_HELD.labels(reason="stepped_down").set(
            assigned if self.stepped_down is not None else 0
        )

    def _shrunk(self) -> set[int]:
        """Partitions whose log now ends before the stored position: not the log followed
        (a new broker at the same address). The test broker answers a Fetch past the end
        with nothing at all, not an error, so this is looked for, not waited for."""
        assert self.consumer is not None
        shrunk = set()
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            if highwater is not None and highwater < self.next_offsets.get(tp.partition, 0):
                shrunk.add(tp.partition)
        return shrunk

    async def _guard(self, partitions: set[int]) -> None:
        """Check ``partitions``' logs (agents/summary_writer/log_guard.py) and follow its
        decisions: a new log is read from its start; a refused one is held, and named by
        ``/ready``."""
        assert self.consumer is not None
        partitions -= self.refused.keys()
        if not partitions:
            return
        try:
            decisions = await self.guard.check(partitions)
        except (KafkaError, TimeoutError, OSError) as error:
            log.warning("summary writer: checking the batch log failed, next time: %s", error)
            return
        for partition, decision in decisions.items():
            tp = TopicPartition(self.topic, partition)
            if decision.action == "refuse":
                self.refused[partition] = decision.reason
                self.consumer.pause(tp)
            elif decision.action in ("adopt", "carry_over"):
                self.next_offsets[partition] = 0
                self.blocked.pop(partition, None)
                self.consumer.resume(tp)
                await self.consumer.seek_to_beginning(tp)

    def _behind(self) -> bool:
        """Catching up: a full batch applied moments ago, or records still to apply
        (:data:`BEHIND_HOLD_SECONDS`)."""
        if time.monotonic() - self._last_full < BEHIND_HOLD_SECONDS:
            return True
        assert self.consumer is not None
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            if tp.partition not in self.blocked and highwater is not None:
                if highwater > self.next_offsets.get(tp.partition, 0):
                    return True
        return False

    def _block(self, tp: TopicPartition, offset: int, fence: Fence) -> None:
        """Stop at a replay's fence: the replay applies up to it and replaces the date;
        only then may later sums of that date be added (module docstring of
        agents/replay/run.py)."""
        assert self.consumer is not None
        self.blocked[tp.partition] = fence
        self.blocked_at[tp.partition] = offset
        self.consumer.seek(tp, offset)
        self.consumer.pause(tp)
        log.info(
            "summary writer: batch log %d waits at the fence of replay %s (%s)",
            tp.partition,
            fence.replay_id,
            fence.usage_date,
        )

    async def _unblock(self) -> None:
        assert self.consumer is not None
        await self._complete_from_result()
        for partition, fence in list(self.blocked.items()):
            if await self._in_db(self.applier.replay_done, fence):
                del self.blocked[partition]
                self.blocked_at.pop(partition, None)
                self.consumer.resume(TopicPartition(self.topic, partition))
                log.info(
                    "summary writer: batch log %d goes on past replay %s",
                    partition,
                    fence.replay_id,
                )

    async def _complete_from_result(self) -> None:
        """Complete a replay this summary DB does not know as complete, from the result
        it published (agents/replay/results.py), once every partition waits at that
        replay's fences: everything below them is applied then, as the replay itself
        applies it before its replace. That is a summary DB restored from a backup taken
        before the replay, or rebuilt from the log; a replay that is still running has
        ``RESULT_TAKEOVER_SECONDS`` to replace the date itself first."""
        assert self.consumer is not None
        now = time.monotonic()
        if not self.blocked or now < self._next_result_look:
            return
        replays = {fence.replay_id for fence in self.blocked.values()}
        partitions = {tp.partition for tp in self.consumer.assignment()}
        if len(replays) != 1 or set(self.blocked) != partitions:
            return
        self._next_result_look = now + RESULT_LOOK_SECONDS
        (replay_id,) = replays
        try:
            found = await find_replay_result(settings, replay_id)
        except (KafkaError, TimeoutError, OSError) as error:
            log.warning("summary writer: looking for replay %s's result: %s", replay_id, error)
            return
        if found is None or found.result.fences != self.blocked_at:
            return
        if time.time() * 1000 - found.appended_ms < RESULT_TAKEOVER_SECONDS * 1000:
            return
        await complete_replay(settings, found)
        log.warning(
            "summary writer: completed replay %s of %s from its published result (this"
            " summary DB did not know it as complete: restored or rebuilt)",
            replay_id,
            found.result.usage_date,
        )

    @property
    def failing(self) -> str | None:
        """The error of the apply being retried, for ``/ready`` (None when it works)."""
        return self.conditions.active().get("apply")

    def waiting_reason(self) -> str | None:
        """For /ready: batch-log partitions the guard refused, and partitions held at the
        fence of a replay still running (or failed after fencing: then run the replay of
        that date again)."""
        reasons = [self.refused[p] for p in sorted(self.refused)]
        if self.stepped_down is not None:
            reasons.insert(0, f"summary writer stepped down: {self.stepped_down}")
        if self.blocked:
            fences = sorted({(f.usage_date, f.replay_id) for f in self.blocked.values()})
            reasons.append(
                "summary writer waits for replay " + ", ".join(f"{r} ({d})" for d, r in fences)
            )
        return "; ".join(reasons) or None


async def carry_over_offsets(settings: Settings) -> None:
    """Upgrading a summary DB billed by the single-file pipeline (``source_offsets``
    filled, no chain yet): start each partition's chain where that pipeline stopped, so
    nothing it billed is read and billed again. Runs before the worker starts (an
    after-topics step, agents/wiring.py), and only appends to an empty batch-log
    partition. Request ids that pipeline saw are read back by the workers from the usage
    topic (copies it saw away from their home partition are not: a copy of one of those
    arriving within the TTL would count again; upgrade while producers are quiet)."""
    if not settings.SUMMARY_WRITER or not settings.summary_db_path.exists():
        return
    applier = BatchApplier(settings.summary_db_path)
    try:
        if applier.heads():
            return
        stored = dict(
            applier.conn.execute(
                "SELECT partition, next_offset FROM source_offsets WHERE topic = ?",
                (settings.USAGE_TOPIC,),
            ).fetchall()
        )
    finally:
        applier.close()
    if not stored:
        return
    producer = AIOKafkaProducer(acks="all", **kafka_client_kwargs(settings))
    await producer.start()
    try:
        for partition, offset in sorted(stored.items()):
            genesis: BatchEntry[list[SumRow]] = BatchEntry(
                -1, 0, offset, 0, 0, -1, [], "carried over"
            )
            sent = await producer.send_and_wait(
                settings.batch_log_topic, encode(genesis), partition=partition
            )
            if sent.offset == 0:
                log.info(
                    "batch log %d starts at usage offset %d (carried over from source_offsets)",
                    partition,
                    offset,
                )
    finally:
        await producer.stop()


async def find_replay_result(settings: Settings, replay_id: str) -> FoundResult | None:
    consumer = groupless_consumer(
        settings,
        fetch_max_wait_ms=BOUNDED_READ_WAIT_MS,
        max_partition_fetch_bytes=16 * 1024 * 1024,
    )
    await consumer.start()
    try:
        return await find_result(consumer, settings.replays_topic, replay_id)
    finally:
        await consumer.stop()


async def complete_replay(settings: Settings, found: FoundResult) -> None:
    """The replace the replay would have made (tables/summary_db/replay_store.py), from its
    result."""
    result = found.result
    rows = [
        SummaryRow(r.client_org_id, r.user_id, r.model, r.usage_date, *astuple(r)[4:])
        for r in found.rows
    ]
    conn = await connect(settings.summary_db_path)
    try:
        await replace_day(
            conn,
            rows,
            result.usage_date,
            settings.USAGE_MARKUP_MULTIPLIER,
            dry_run=False,
            started_at=result.started_at,
            records_processed=result.records_processed,
            replay_id=result.replay_id,
            list_changes=0,
        )
    finally:
        await conn.close()
