"""Model prices for estimated costs, on every worker, without the summary DB.

An event without ``cost_usd`` is billed at its model's latest stored OpenRouter price
(:mod:`streams.model.pricing`), and the estimate is made where the event is aggregated: on the
worker that owns its home partition, which may have no access to the summary DB. So the
summary writer publishes the prices it stores to the compacted topic
``<APP_ID>-prices`` (one record, key ``latest``: every model's price as exact decimal
strings), at start-up and whenever they change (checked every ``RELOAD_SECONDS``, so a
13:00 refresh reaches every worker within minutes). Other workers read the topic's last
record at start-up and on the same interval. A worker that has no prices yet estimates
0, exactly as with no price stored, and counts the event in ``estimated_requests``.

On the summary writer the prices are read through the worker's shared connection to the
summary DB, which the wiring hands over (agents/wiring.py).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from decimal import Decimal
from typing import TYPE_CHECKING

import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from streams.clients.openrouter import ModelPrice
from streams.kafka.broker import groupless_consumer, kafka_client_kwargs
from streams.model.pricing import Price
from streams.settings import Settings

if TYPE_CHECKING:
    from tables.summary_db.connection import SharedSummaryDb

__all__ = ["PricesFeed", "decode_prices", "encode_prices"]

log = logging.getLogger(__name__)

RELOAD_SECONDS = 300.0
_KEY = b"latest"


def encode_prices(prices: dict[str, Price]) -> bytes:
    return orjson.dumps(
        {
            model: [
                str(price.prompt_usd_per_token),
                str(price.completion_usd_per_token),
                str(price.request_usd),
            ]
            for model, price in sorted(prices.items())
        }
    )


def decode_prices(value: bytes) -> dict[str, Price]:
    return {
        model: ModelPrice(model, Decimal(prompt), Decimal(completion), Decimal(request))
        for model, (prompt, completion, request) in orjson.loads(value).items()
    }


class PricesFeed:
    """``current``: the prices this worker estimates with (module docstring). ``db``: the
    worker's shared connection to the summary DB, needed where ``SUMMARY_WRITER`` is true
    (the others read the topic)."""

    def __init__(self, settings: Settings, db: SharedSummaryDb | None = None) -> None:
        self.settings = settings
        self.db = db
        self.current: dict[str, Price] = {}
        self._published: bytes | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.reload()
        self._task = asyncio.ensure_future(self._reload_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _reload_forever(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_SECONDS)
            await self.reload()

    async def reload(self) -> None:
        try:
            if self.settings.SUMMARY_WRITER:
                await self._from_db_and_publish()
            else:
                await self._from_topic()
        except (sqlite3.Error, OSError, KafkaError, ValueError) as error:
            log.warning("could not load model prices: %s", error)

    async def _from_db_and_publish(self) -> None:
        from tables.summary_db.reference import latest_model_prices

        if self.db is None:  # a wiring mistake, not an outage: stop the worker
            raise RuntimeError("PricesFeed on the summary writer was given no summary DB")
        self.current = dict(await latest_model_prices(await self.db.get()))
        value = encode_prices(self.current)
        if value == self._published:
            return
        producer = AIOKafkaProducer(**kafka_client_kwargs(self.settings), acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(self.settings.prices_topic, value, key=_KEY)
        finally:
            await producer.stop()
        self._published = value

    async def _from_topic(self) -> None:
        tp = TopicPartition(self.settings.prices_topic, 0)
        consumer = groupless_consumer(self.settings)
        await consumer.start()
        try:
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            latest: bytes | None = None
            while True:
                fetched = await consumer.getmany(tp, timeout_ms=500)
                for record in fetched.get(tp, []):
                    if record.key == _KEY and record.value:
                        latest = record.value
                highwater = consumer.highwater(tp)
                if highwater is not None and await consumer.position(tp) >= highwater:
                    break
        finally:
            await consumer.stop()
        if latest is not None:
            self.current = decode_prices(latest)
