"""What a worker run wrote to its batch log (``<APP_ID>-batch-log``, streams/kafka/batch_log.py):
bytes per event and the largest record, read back from the broker after the run.

Why measure it: every batch-log record carries one row per (usage date, summary key) its
batch touched, so its size follows the keys, not the events. With many keys a record
grows past Apache Kafka's default ``max.message.bytes`` (1,048,588 B), which Tansu does
not enforce (see TEST-BROKER.md), and the summary writer's fold costs per row: the
benchmark reports both, so a change of the record format shows in bytes and in speed.

The topic is read with a group-less consumer from the beginning to the high watermark
carried by the Fetch responses (Tansu's ListOffsets *latest* is wrong), and every record
is decoded (:func:`streams.kafka.batch_log.decode`) to count its rows.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.kafka.batch_log import BatchEntry, decode

__all__ = ["BatchLogStats", "batch_log_stats"]

#: Bytes per partition per Fetch: more than the largest record seen so far (2.4 MB).
_FETCH_BYTES = 32 * 1024 * 1024


@dataclass
class BatchLogStats:
    """Sizes of one batch log's records (values only: keys and headers are not counted)."""

    topic: str
    records: int = 0  # every record: batch entries and replay fences
    entries: int = 0
    rows: int = 0  # (usage date, key) rows over all entries
    bytes: int = 0  # value bytes of every record
    largest_record_bytes: int = 0
    largest_record_rows: int = 0
    bytes_per_event: float | None = None  # ÷ records on the usage topic (events/s's basis)
    bytes_per_unique_event: float | None = None
    rows_per_unique_event: float | None = None
    seconds: float = 0.0  # reading it back (not part of any timed run)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


async def _read(bootstrap: str, topic: str, stats: BatchLogStats, timeout: float) -> None:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
        max_partition_fetch_bytes=_FETCH_BYTES,
        fetch_max_bytes=_FETCH_BYTES * 4,
    )
    await consumer.start()
    try:
        # every topic's metadata (as agents/replay/topic_slice.py): asking for the topic by
        # name could auto-create it
        cluster = await consumer._client.fetch_all_metadata()
        partitions = cluster.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        pending = set(tps)
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} took over {timeout:.0f} s")
            fetched = await consumer.getmany(*pending, timeout_ms=500)
            for records in fetched.values():
                for record in records:
                    _count(stats, record.value or b"")
            for tp in list(pending):
                end = consumer.highwater(tp)
                if end is not None and await consumer.position(tp) >= end:
                    pending.discard(tp)
    finally:
        await consumer.stop()


def _count(stats: BatchLogStats, value: bytes) -> None:
    stats.records += 1
    stats.bytes += len(value)
    record = decode(value)
    rows = len(record.rows) if isinstance(record, BatchEntry) else 0
    if isinstance(record, BatchEntry):
        stats.entries += 1
        stats.rows += rows
    if len(value) > stats.largest_record_bytes:
        stats.largest_record_bytes = len(value)
        stats.largest_record_rows = rows


def batch_log_stats(
    bootstrap: str, app_id: str, records: int, unique: int, timeout: float = 300.0
) -> BatchLogStats:
    """Read ``<app_id>-batch-log`` whole; per-event figures over the usage topic's
    ``records`` and ``unique`` events."""
    stats = BatchLogStats(f"{app_id}-batch-log")
    started = time.monotonic()
    asyncio.run(_read(bootstrap, stats.topic, stats, timeout))
    stats.seconds = time.monotonic() - started
    if records:
        stats.bytes_per_event = stats.bytes / records
    if unique:
        stats.bytes_per_unique_event = stats.bytes / unique
        stats.rows_per_unique_event = stats.rows / unique
    return stats
