"""The summary writer's check that the batch log is the one its DB followed.

Runs before the writer trusts a stored position: at start-up (before the worker starts,
so a refusal is one line and a non-zero exit), and at run time when a partition's log
shrinks below the stored position or offers a record off the stored chain. The decision
is :func:`streams.kafka.log_identity.decide`; this module gathers its facts from the broker and
carries it out:

* ``adopt``: the partition's stored position is dropped (``batch_log_heads``), so the
  writer reads the new log from its start; the bills stay.
* ``carry_over``: a genesis record is appended to the empty new log, carrying the stored
  positions over, and the writer then follows the new log from that genesis.
* ``refuse``: :class:`LogMismatch`, whose message says what to do.

Each outcome is logged once and counted in ``usage_stream_batch_log_guard_total{action}``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from agents.summary_writer.claim import release_summary_writer
from streams.kafka.batch_log import BatchEntry, ChainHead, SumRow, encode, record_mark
from streams.kafka.broker import (
    BOUNDED_READ_WAIT_MS,
    TopicMismatch,
    groupless_consumer,
    kafka_client_kwargs,
)
from streams.kafka.log_identity import Decision, LogFacts, PartitionFacts, TopicFacts, decide
from streams.kafka.log_reads import first_chain_prev, partition_bounds, record_at
from streams.metrics import BATCH_LOG_GUARD
from streams.settings import Settings
from tables.summary_db.batch_apply import BatchApplier, StoredHead

__all__ = ["BatchLogGuard", "LogMismatch", "guard_batch_log"]

log = logging.getLogger(__name__)

InDb = Callable[..., Awaitable[Any]]


class LogMismatch(TopicMismatch):
    """The batch log is not the one the summary DB followed, and going on would lose or
    double-count bills (the message names the partition and what to do)."""


class BatchLogGuard:
    """Gathers the facts of batch-log partitions and carries out the decisions."""

    def __init__(
        self, settings: Settings, applier: BatchApplier, in_db: InDb | None = None
    ) -> None:
        self.settings = settings
        self.applier = applier
        #: runs a function of the applier where its connection may be used (the summary
        #: writer's own thread; a plain thread before the worker starts)
        self.in_db: InDb = in_db or asyncio.to_thread

    async def check(self, partitions: Iterable[int]) -> dict[int, Decision]:
        """Decide and carry out every partition's outcome but ``refuse``, which is
        returned for the caller to act on (stop at start-up, hold the partition later)."""
        consumer = groupless_consumer(
            self.settings,
            fetch_max_wait_ms=BOUNDED_READ_WAIT_MS,
        )
        await consumer.start()
        decisions: dict[int, Decision] = {}
        try:
            for partition in sorted(partitions):
                stored = (await self.in_db(self.applier.heads)).get(partition)
                facts, rerouted = await self._facts(consumer, partition, stored)
                decision = decide(facts)
                if decision.action == "carry_over" and stored is not None:
                    decision = await self._carry_over(partition, stored, facts, rerouted)
                elif decision.action == "adopt":
                    await self.in_db(self.applier.forget_position, partition)
                if decision.action != "continue":
                    BATCH_LOG_GUARD.labels(action=decision.action).inc()
                    level = logging.ERROR if decision.action == "refuse" else logging.WARNING
                    log.log(level, "summary writer: %s", decision.reason)
                decisions[partition] = decision
        finally:
            await consumer.stop()
        return decisions

    async def _facts(
        self, consumer: AIOKafkaConsumer, partition: int, stored: StoredHead | None
    ) -> tuple[PartitionFacts, TopicFacts]:
        settings = self.settings
        log_tp = TopicPartition(settings.batch_log_topic, partition)
        bounds = await partition_bounds(consumer, log_tp)
        position = stored.next_offset if stored else 0
        before = await record_at(consumer, log_tp, position - 1, bounds) if position else None
        head = stored.head if stored else ChainHead()
        usage = await _topic_facts(consumer, settings.USAGE_TOPIC, partition, head.usage_next)
        rerouted = await _topic_facts(
            consumer, settings.rerouted_topic, partition, head.rerouted_next
        )
        facts = PartitionFacts(
            partition=partition,
            log_topic=settings.batch_log_topic,
            usage_topic=settings.USAGE_TOPIC,
            next_offset=stored.next_offset if stored else None,
            log_mark=stored.log_mark if stored else "",
            usage_next=head.usage_next,
            usage_mark=head.usage_mark,
            log=LogFacts(
                beginning=bounds[0],
                end=bounds[1],
                mark_before_position=record_mark(before) if before is not None else None,
                first_prev=await first_chain_prev(consumer, log_tp, bounds),
            ),
            usage=usage,
        )
        return facts, rerouted

    async def _carry_over(
        self, partition: int, stored: StoredHead, facts: PartitionFacts, rerouted: TopicFacts
    ) -> Decision:
        """Start the empty new log's chain at the stored positions; when another record
        lands first, decide again (it will not be a chain start this writer made)."""
        head = stored.head
        same_rerouted = (
            head.rerouted_next > 0
            and rerouted.end >= head.rerouted_next
            and (not head.rerouted_mark or rerouted.mark_before_head == head.rerouted_mark)
        )
        genesis: BatchEntry[list[SumRow]] = BatchEntry(
            -1,
            0,
            head.usage_next,
            0,
            head.rerouted_next if same_rerouted else 0,
            head.newest_event_ms,
            [],
            "carried over by the summary writer",
            usage_mark=head.usage_mark,
            rerouted_mark=head.rerouted_mark if same_rerouted else "",
        )
        producer = AIOKafkaProducer(acks="all", **kafka_client_kwargs(self.settings))
        await producer.start()
        try:
            sent = await producer.send_and_wait(
                self.settings.batch_log_topic, encode(genesis), partition=partition
            )
        finally:
            await producer.stop()
        if sent.offset != facts.log.beginning:
            return Decision(
                "refuse",
                f"{facts.log_topic} partition {partition}: a worker started a new chain"
                " before the summary writer could carry its positions over; stop every"
                " worker, delete the batch-log topic and start the summary writer first",
            )
        await self.in_db(self.applier.forget_position, partition)
        return Decision(
            "carry_over",
            f"{facts.log_topic} partition {partition} is a new, empty log over the billed"
            f" {facts.usage_topic}: its chain starts at offset {head.usage_next}, where the"
            " summary DB's bills end",
        )


async def _topic_facts(
    consumer: AIOKafkaConsumer, topic: str, partition: int, position: int
) -> TopicFacts:
    tp = TopicPartition(topic, partition)
    bounds = await partition_bounds(consumer, tp)
    before = await record_at(consumer, tp, position - 1, bounds) if position else None
    return TopicFacts(
        beginning=bounds[0],
        end=bounds[1],
        mark_before_head=record_mark(before) if before is not None else None,
    )


async def guard_batch_log(settings: Settings) -> None:
    """Before the worker starts (an after-topics step, agents/wiring.py): check every batch-log
    partition on the summary writer; raise :class:`LogMismatch` on a refusal."""
    if not settings.SUMMARY_WRITER:
        return
    consumer = groupless_consumer(settings)
    await consumer.start()
    try:
        await consumer.topics()  # the cluster's metadata, every topic's partitions
        partitions = consumer.partitions_for_topic(settings.batch_log_topic) or set()
    finally:
        await consumer.stop()
    applier = BatchApplier(settings.summary_db_path)
    try:
        decisions = await BatchLogGuard(settings, applier).check(partitions)
    finally:
        applier.close()
    refused = [d.reason for d in decisions.values() if d.action == "refuse"]
    if refused:
        await release_summary_writer(settings)  # claimed just before: another may go
        more = f" (and {len(refused) - 1} more partitions)" if len(refused) > 1 else ""
        raise LogMismatch(refused[0] + more)
