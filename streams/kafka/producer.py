"""Producer side: publish JSON-lines usage events, keyed by request_id.

Values are sent exactly as read (one line = one message): the pipeline, not the producer,
decides what is valid, so a bad line still reaches the dead-letter topic with its bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import orjson
from aiokafka import AIOKafkaProducer

from streams.kafka.broker import kafka_client_kwargs
from streams.settings import Settings

__all__ = ["key_for", "publish_lines"]


def key_for(line: bytes) -> bytes | None:
    """The request_id of a JSON line as UTF-8 bytes, or None when there is none to read."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    request_id = obj.get("request_id") if isinstance(obj, dict) else None
    return request_id.encode() if isinstance(request_id, str) else None


async def _lines(source: Iterable[bytes] | AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if isinstance(source, AsyncIterator):
        async for line in source:
            yield line
    else:
        for line in source:
            yield line


async def publish_lines(
    settings: Settings, lines: Iterable[bytes] | AsyncIterator[bytes], topic: str | None = None
) -> int:
    """Send every non-blank line; returns how many were acknowledged by the broker."""
    producer = AIOKafkaProducer(
        linger_ms=5,
        max_batch_size=256 * 1024,
        enable_idempotence=settings.KAFKA_PRODUCER_IDEMPOTENCE,
        **kafka_client_kwargs(settings),
    )
    await producer.start()
    sent = 0
    try:
        pending = []
        async for raw in _lines(lines):
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            pending.append(
                await producer.send(topic or settings.USAGE_TOPIC, line, key=key_for(line))
            )
            if len(pending) >= 10_000:
                for future in pending:
                    await future
                sent += len(pending)
                pending.clear()
        for future in pending:
            await future
        sent += len(pending)
    finally:
        await producer.stop()
    return sent
