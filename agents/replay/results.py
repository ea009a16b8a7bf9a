"""Replay results on Kafka: what a replay decided about a date, where any summary DB finds it.

A replay fences the batch log and then replaces its date in the summary DB; the summary
writer waits at the fences until ``replay_runs`` says the replay is complete. That row
lives only in the summary DB, so a DB restored from a backup taken before the replay (or
rebuilt from the log after it was lost) met the fences and waited for ever. So before it
replaces the date, the replay appends its result to ``<APP_ID>-replays`` (kept for ever,
one partition): the date's totals per key as :class:`~streams.kafka.batch_log.BatchPart`
records (each under the record limit), then a :class:`ReplayResult` naming them and the
fences. A summary writer held at every fence of a replay its DB does not know as complete
finds the result here and completes the replay itself (agents/summary_writer/writer.py), exactly
as the replay would have: the totals are the same, and so is everything below the fences.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streams.kafka.batch_log import BatchPart, SumRow, encode_parts
from streams.kafka.log_reads import partition_bounds, read_range, record_at

__all__ = ["FoundResult", "ReplayResult", "find_result", "publish_result"]


class ReplayResult(msgspec.Struct, tag="replay-result", frozen=True):
    """A replay's outcome for its date: ``parts`` are the offsets (in the replays topic)
    of the records holding its rows; ``fences`` its fence per batch-log partition."""

    replay_id: str
    usage_date: str
    fences: dict[int, int]
    parts: list[int]
    records_processed: int
    started_at: str


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(ReplayResult | BatchPart[list[SumRow]])
_SCAN = msgspec.json.Decoder(ReplayResult | BatchPart[msgspec.Raw])


@dataclass(frozen=True, slots=True)
class FoundResult:
    result: ReplayResult
    rows: list[SumRow]
    appended_ms: int  # the result record's Kafka timestamp


async def publish_result(
    producer: AIOKafkaProducer,
    topic: str,
    replay_id: str,
    usage_date: str,
    fences: Mapping[int, int],
    rows: Sequence[SumRow],
    records_processed: int,
    started_at: str,
) -> None:
    """Append the rows as parts, then the result naming them (its append is the point
    from which the result counts)."""
    sent = [await producer.send(topic, part, partition=0) for part in encode_parts(rows, "")]
    offsets = [(await future).offset for future in sent]
    result = ReplayResult(
        replay_id, usage_date, dict(fences), offsets, records_processed, started_at
    )
    await producer.send_and_wait(topic, _ENCODER.encode(result), partition=0)


async def find_result(consumer: AIOKafkaConsumer, topic: str, replay_id: str) -> FoundResult | None:
    """The result of ``replay_id`` with its rows, or None when it was never appended (the
    replay died before reading all of its date). Parts are skipped undecoded on the way
    and read back by offset once the result is found."""
    tp = TopicPartition(topic, 0)
    found: tuple[ReplayResult, int] | None = None
    async for records in read_range(consumer, tp, 0, None):
        for record in records:
            try:
                decoded = _SCAN.decode(record.value or b"")
            except msgspec.DecodeError:
                continue
            if isinstance(decoded, ReplayResult) and decoded.replay_id == replay_id:
                found = decoded, record.timestamp
    if found is None:
        return None
    result, appended_ms = found
    bounds = await partition_bounds(consumer, tp)
    rows: list[SumRow] = []
    for offset in result.parts:
        record = await record_at(consumer, tp, offset, bounds)
        part = _DECODER.decode(record.value or b"") if record is not None else None
        if not isinstance(part, BatchPart):
            return None  # (never written so)
        rows += part.rows
    return FoundResult(result, rows, appended_ms)
