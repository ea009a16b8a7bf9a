"""Ingest: validate producer messages, dead-letter the invalid ones, re-key the valid ones.

Invalid input never stops the worker nor blocks what follows it: it is forwarded to the
dead-letter topic with its original bytes and the reason, then acked like any message.
Valid events are re-keyed by ``request_id`` onto the internal topic (see streams.topics).
Faust flushes the producer before it commits source offsets, so a forwarded event is
never committed away before the broker has it.
"""

from __future__ import annotations

from faust import StreamT

from streams.app import app
from streams.event import InvalidEvent, encode_internal, parse_event
from streams.metrics import EVENTS_CONSUMED, EVENTS_INVALID
from streams.topics import by_request_topic, dlq_topic, usage_topic
from tables.daily import wall_clock_ms


@app.agent(usage_topic)
async def ingest(stream: StreamT) -> None:
    async for event in stream.events():
        message = event.message
        EVENTS_CONSUMED.inc()
        parsed = parse_event(message.value, wall_clock_ms())
        source = f"{message.topic}/{message.partition}/{message.offset}"
        if isinstance(parsed, InvalidEvent):
            EVENTS_INVALID.labels(reason=parsed.reason).inc()
            await dlq_topic.send(
                key=message.key,
                value=message.value if message.value is not None else b"",
                headers=[
                    ("error", f"{parsed.reason}: {parsed.message}".encode()),
                    ("source-offset", source.encode()),
                ],
            )
            continue
        await by_request_topic.send(
            key=parsed.request_id.encode(), value=encode_internal(parsed, source)
        )
