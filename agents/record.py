"""Record: deduplicate re-keyed events, write raw points, add unique events to the ledger.

Per batch (up to ``RAW_BATCH_SIZE`` events or ``RAW_BATCH_SECONDS``), in this order
(OpenMeter's sink order):
1. drop copies already in the dedupe table or earlier in the batch;
2. write the raw points (retried forever with backoff and a circuit breaker);
3. add the events to the SQLite ledger (duplicates of it are skipped there too);
4. mark the request_ids seen in the dedupe table;
5. ack the events, so Faust may commit their offsets.
A crash anywhere before 5 redelivers the batch: the raw points land on the same points
again and the ledger ignores what it already holds, so nothing is lost or counted twice.
The batch comes from ``noack_take``: ``take`` would ack a batch even when its processing
failed.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Sequence

from faust import StreamT
from faust.types import EventT

from streams.app import app, settings, summary_db
from streams.event import UsageEvent, decode_internal
from streams.metrics import EVENTS_DUPLICATE, EVENTS_LATE
from streams.money import scale_nano
from streams.pricing import Price
from streams.sinks import build_raw_sink
from streams.sinks.lineprotocol import RawPoint
from streams.topics import by_request_topic
from tables.daily import day_closer, wall_clock_ms
from tables.dedupe import DedupeIndex
from tables.reference import latest_model_prices
from tables.summary_store import LedgerEntry, LedgerResult, ledger_entry, record_events

log = logging.getLogger(__name__)

PRICES_RELOAD_SECONDS = 300.0


class Recorder:
    """The batch pipeline of the record agent; the agent only feeds it and acks."""

    def __init__(self) -> None:
        self.dedupe = DedupeIndex()
        self.sink = build_raw_sink(settings)
        self.closer = day_closer()
        self._prices: dict[str, Price] = {}
        self._prices_loaded = float("-inf")

    async def process(self, events: Sequence[EventT]) -> None:
        now_ms = wall_clock_ms()
        fresh: list[tuple[EventT, UsageEvent, str]] = []
        batch_ids: set[str] = set()
        for event in events:
            usage, source = decode_internal(event.message.value)
            key = usage.request_id.encode()
            if usage.request_id in batch_ids or self.dedupe.seen(event, key):
                EVENTS_DUPLICATE.inc()
                continue
            batch_ids.add(usage.request_id)
            fresh.append((event, usage, source))
        if fresh:
            entries = await self._ledger_entries(fresh)
            await self.sink.write([self._raw_point(entry) for entry in entries])
            result = await self._record(entries)
            EVENTS_DUPLICATE.inc(result.duplicates)
            EVENTS_LATE.inc(result.late)
            for event, usage, _ in fresh:
                self.dedupe.mark(event, usage.request_id.encode(), now_ms)
                self.closer.observe(event.message.partition, usage.event_ms)
        await self.dedupe.purge_due(list(events), now_ms)

    async def _ledger_entries(
        self, fresh: Sequence[tuple[EventT, UsageEvent, str]]
    ) -> list[LedgerEntry]:
        prices = await self._model_prices()
        entries = []
        for _, usage, source in fresh:
            topic, partition, offset = source.rsplit("/", 2)
            entries.append(
                ledger_entry(usage, topic, int(partition), int(offset), prices, settings.tz)
            )
        return entries

    @staticmethod
    def _raw_point(entry: LedgerEntry) -> RawPoint:
        usage = entry.event
        return RawPoint(
            request_id=usage.request_id,
            client_org_id=usage.client_org_id,
            user_id=usage.user_id,
            model=usage.model,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cost_nano=entry.cost_nano,
            markup_cost_nano=scale_nano(entry.cost_nano, settings.USAGE_MARKUP_MULTIPLIER),
            event_ms=usage.event_ms,
        )

    async def _record(self, entries: list[LedgerEntry]) -> LedgerResult:
        """Write to the ledger; a failing database stalls the agent (no ack) until it works."""
        delay = 1.0
        while True:
            try:
                return await record_events(await summary_db(), entries)
            except sqlite3.Error as error:
                log.error("ledger write failed, retrying in %.0f s: %s", delay, error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 8.0)

    async def _model_prices(self) -> dict[str, Price]:
        if time.monotonic() - self._prices_loaded > PRICES_RELOAD_SECONDS:
            try:
                self._prices = dict(await latest_model_prices(await summary_db()))
                self._prices_loaded = time.monotonic()
            except sqlite3.Error as error:
                log.warning("could not load model prices: %s", error)
        return self._prices


recorder: Recorder | None = None


@app.on_before_shutdown.connect
async def _close_sink(app: object, **kwargs: object) -> None:
    if recorder is not None:
        await recorder.sink.close()


@app.agent(by_request_topic)
async def record(stream: StreamT) -> None:
    global recorder
    if recorder is None:
        recorder = Recorder()
    async for events in stream.noack_take(
        settings.RAW_BATCH_SIZE, within=settings.RAW_BATCH_SECONDS
    ):
        await recorder.process(events)
        for event in events:
            await stream.ack(event)
