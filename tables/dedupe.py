"""Deduplication by ``request_id``: a changelogged Faust table on the RocksDB store.

Key: the request_id (UTF-8 bytes); value: the wall-clock epoch ms when its first copy was
recorded. The table is co-partitioned with ``by_request_topic``, so every copy of a request
is looked up in the partition that owns it. Entries older than ``DEDUP_TTL_DAYS`` are purged
(local delete plus a changelog tombstone); until then later copies are dropped.

Faust resolves a table key against the partition of the *current event*; the record agent
handles whole batches, so :func:`event_context` sets the event explicitly for each access.
The SQLite ledger behind it (``usage_events``) is the second, permanent guard that keeps
the bills exact even if this table ever forgets a key (for example after a changelog
recovery that stopped short on the test broker).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Iterator
from typing import Any

from faust.streams import _current_event
from faust.types import EventT

from streams.app import app, settings

__all__ = ["DedupeIndex", "dedupe_table", "event_context"]

log = logging.getLogger(__name__)

dedupe_table = app.Table(
    "dedupe",
    key_type=bytes,  # raw serializer
    value_type=int,  # json serializer
    partitions=settings.USAGE_TOPIC_PARTITIONS,
    help="request_id -> first seen (wall-clock epoch ms)",
    # Small RocksDB buffers: the table is a large on-disk set, read mostly by key.
    options={
        "write_buffer_size": 8 * 1024 * 1024,
        "max_write_buffer_number": 2,
        "block_cache_size": 64 * 1024 * 1024,
        "block_cache_compressed_size": 16 * 1024 * 1024,
    },
)


@contextlib.contextmanager
def event_context(event: EventT) -> Iterator[None]:
    """Make ``event`` Faust's current event, so table reads/writes use its partition."""
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


class DedupeIndex:
    """Seen-set operations over :data:`dedupe_table` for batches of events."""

    MAX_PURGE_INTERVAL_SECONDS = 3600.0

    def __init__(
        self, table: Any = dedupe_table, ttl_days: float = settings.DEDUP_TTL_DAYS
    ) -> None:
        self.table = table
        self.ttl_ms = int(ttl_days * 86_400_000)
        # hourly, or more often for a TTL shorter than a few hours
        self.purge_interval = min(self.MAX_PURGE_INTERVAL_SECONDS, self.ttl_ms / 4000)
        self._last_purge: dict[int, float] = {}

    def seen(self, event: EventT, key: bytes) -> bool:
        with event_context(event):
            return self.table.get(key) is not None

    def mark(self, event: EventT, key: bytes, now_ms: int) -> None:
        with event_context(event):
            self.table[key] = now_ms

    async def purge_due(self, events: list[EventT], now_ms: int) -> int:
        """Purge expired keys of the partitions in ``events``, at most once per interval each."""
        purged = 0
        by_partition = {event.message.partition: event for event in events}
        for partition, event in by_partition.items():
            last = self._last_purge.get(partition)
            if last is not None and time.monotonic() - last < self.purge_interval:
                continue
            self._last_purge[partition] = time.monotonic()
            purged += await self._purge_partition(event, now_ms)
        return purged

    async def _purge_partition(self, event: EventT, now_ms: int) -> int:
        """Delete expired keys that live in ``event``'s partition (tombstones go there too)."""
        cutoff = now_ms - self.ttl_ms
        partition = event.message.partition
        db = self.table.data._dbs.get(partition)  # the partition's own RocksDB
        if db is None:
            return 0
        expired = []
        for index, (key, value) in enumerate(self.table.data._visible_items(db)):
            if int(value) < cutoff:
                expired.append(key)
            if index % 10_000 == 9_999:
                await asyncio.sleep(0)  # keep heartbeats and the web server responsive
        with event_context(event):
            for key in expired:
                del self.table[key]
        if expired:
            log.info(
                "dedupe: purged %d expired request ids from partition %d", len(expired), partition
            )
        return len(expired)
