"""The ledger store: one SQLite transaction per batch of unique events.

In that one ``BEGIN IMMEDIATE`` transaction a batch

1. is checked against the **ledger** (``request_id`` recorded in the last
   ``LEDGER_RETENTION_DAYS``): copies recorded earlier, by any worker, from any partition,
   are dropped;
2. adds its new requests to the ledger;
3. folds its exact per-key increments into ``daily_pending`` (``usage_daily`` receives them
   when the day closes, or at the next rollup pass for a day that closed already: a late
   event re-opens its day);
4. stores each source partition's next offset in ``source_offsets``.

So a batch is applied entirely or not at all, and a redelivered batch (crash, SIGKILL,
rebalance, a zombie worker that lost its partitions) finds its requests in the ledger and
changes nothing. This is Kafka's "storing offsets outside Kafka" pattern: the consumer
seeks to ``source_offsets`` on assignment, and the Kafka commit is informational.

Totals of closed days are never recomputed from per-event rows, so per-event rows only
live as long as they are needed: the ledger is pruned in chunks by :meth:`prune`. Its key
is ``(bucket, request_id)``, ``bucket`` being the end of the wall-clock interval (an eighth
of the retention) in which the request was first recorded: pruning deletes whole key prefixes, and a
lookup probes the few live buckets (``ledger_buckets``) without a second index.

Synchronous ``sqlite3`` on purpose, on one connection used from one thread: a batch is a
handful of statements, and a thread hop per statement (aiosqlite) would cost more than
the statements. The hot path runs these methods in its own single-thread executor.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import orjson

from streams.business_time import UsageDates
from streams.event import UsageEvent
from streams.pricing import Price, estimate_cost_nano
from tables.schema import open_sync, utc_now_text
from tables.summary_keys import FOLD_SQL, SummaryKeyIds

__all__ = [
    "BatchResult",
    "Deduplicator",
    "LedgerEvent",
    "LedgerStore",
    "bucket_ms_for",
    "ledger_events",
]

log = logging.getLogger(__name__)

_PRUNE_CHUNK = 20_000


class LedgerEvent(NamedTuple):
    """A valid event on its way into the ledger (cost resolved or estimated). A tuple:
    the hot path builds one per event, and a frozen dataclass costs three times more."""

    request_id: str
    usage_date: str
    usage_day: int  # usage_date as date.toordinal()
    client_org_id: str
    user_id: str
    model: str
    input_tokens: int
    output_tokens: int
    cost_nano: int
    cost_estimated: int  # 0/1
    event_ms: int
    partition: int
    offset: int


def ledger_events(
    located: Sequence[tuple[UsageEvent, int, int]],
    prices: Mapping[str, Price],
    dates: UsageDates,
) -> list[LedgerEvent]:
    """Valid events read at ``(event, partition, offset)`` as ledger rows: the one place
    where an event gets its usage date and its cost (``cost_usd`` when present, else
    estimated from the model's latest stored price; no price → 0, still counted in
    ``estimated_requests``). The worker and the replay share it."""
    entries = []
    for event, partition, offset in located:
        cost = event.cost_nano
        estimated = cost is None
        if cost is None:
            cost = estimate_cost_nano(
                event.input_tokens, event.output_tokens, prices.get(event.model)
            )
        day, ordinal = dates(event.event_ms)
        entries.append(
            LedgerEvent(
                event.request_id,
                day,
                ordinal,
                event.client_org_id,
                event.user_id,
                event.model,
                event.input_tokens,
                event.output_tokens,
                cost,
                1 if estimated else 0,
                event.event_ms,
                partition,
                offset,
            )
        )
    return entries


class Deduplicator(Protocol):
    """What the hot path needs to drop copies of a request (OpenMeter's ``Deduplicator``).

    :class:`LedgerStore` is the implementation: its ``known`` is the read-only pre-check,
    and marking requests seen happens inside :meth:`LedgerStore.commit_batch`, in the
    transaction that adds their sums, so "seen" and "counted" can never disagree. Another
    implementation (an LSM store for larger volumes) must keep that property: mark seen
    atomically with the sums, or in a way a crash between the two cannot lose or double."""

    def known(self, request_ids: Sequence[str]) -> set[str]: ...


@dataclass(frozen=True, slots=True)
class BatchResult:
    fresh: list[LedgerEvent]
    duplicates: int  # found in the ledger inside the transaction
    late: int  # fresh events of days that had closed already


def bucket_ms_for(retention_days: float) -> int:
    """An eighth of the retention (at least a second): ids live retention..+1/8 of it."""
    return max(1000, int(retention_days * 86_400_000 / 8))


# Strings travel into SQLite as bound parameters only: SQLite's JSON functions stop at a
# NUL inside a string, and a NUL is valid in every field. Request ids are probed as one
# bound ``IN (?,?,…)`` list per chunk: SQLite sorts the list in memory and walks the
# ledger's key once per live bucket. (Filling a TEMP table instead cost ~1.5 s per 50,000
# ids with the default file-backed temp store, and was 40 % of the worker's time.)
_PROBE_CHUNK = 20_000
_KNOWN = (
    "SELECT request_id FROM ledger"
    " WHERE bucket IN (SELECT bucket FROM ledger_buckets) AND request_id IN ({marks})"
)
_OFFSET = """
    INSERT INTO source_offsets VALUES (?,?,?,?)
    ON CONFLICT (topic, partition) DO UPDATE SET
        next_offset = excluded.next_offset, updated_at = excluded.updated_at
"""


def _json_list(values: Iterable[str]) -> str:
    return orjson.dumps(list(values)).decode()


class LedgerStore:
    """The hot path's connection to the summary DB (see the module docstring)."""

    def __init__(self, path: Path, retention_days: float, cache_mib: int = 256) -> None:
        self.cache_mib = cache_mib
        self.path = path
        self.retention_ms = int(retention_days * 86_400_000)
        self.bucket_ms = bucket_ms_for(retention_days)
        self._conn: sqlite3.Connection | None = None
        self.keys = SummaryKeyIds()
        # One transaction at a time on the one connection, whichever thread asks.
        self._lock = threading.RLock()

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = open_sync(self.path, cache_mib=self.cache_mib)
        return self._conn

    def close(self) -> None:
        """Checkpoint the WAL into the database and truncate it (best effort: another
        connection may still be reading), then close."""
        if self._conn is not None:
            self.keys.forget_connection(self._conn)
            with self._lock:
                try:
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error as error:
                    log.info("ledger: WAL checkpoint at close skipped: %s", error)
                self._conn.close()
                self._conn = None

    def bucket_at(self, now_ms: int) -> int:
        """The ledger bucket of a request first recorded at ``now_ms`` (its interval's end)."""
        return now_ms - now_ms % self.bucket_ms + self.bucket_ms

    # Reads ---------------------------------------------------------------------------

    def known(self, request_ids: Sequence[str]) -> set[str]:
        """Request ids already in the ledger (a read; WAL: never waits for a writer)."""
        if not request_ids:
            return set()
        found: set[str] = set()
        with self._lock:
            conn = self.conn
            for start in range(0, len(request_ids), _PROBE_CHUNK):
                chunk = request_ids[start : start + _PROBE_CHUNK]
                sql = _KNOWN.format(marks=",".join("?" * len(chunk)))
                found.update(row[0] for row in conn.execute(sql, chunk))
        return found

    def stored_offsets(self, topic: str) -> dict[int, int]:
        rows = self.conn.execute(
            "SELECT partition, next_offset FROM source_offsets WHERE topic = ?", (topic,)
        )
        return {partition: offset for partition, offset in rows}

    # The batch transaction -------------------------------------------------------------

    def commit_batch(
        self,
        events: Sequence[LedgerEvent],
        offsets: Mapping[tuple[str, int], int],
        now_ms: int | None = None,
    ) -> BatchResult:
        """Apply one batch atomically (module docstring)."""
        now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        with self._lock:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = self._apply(conn, events, offsets, now_ms)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return result

    def _apply(
        self,
        conn: sqlite3.Connection,
        events: Sequence[LedgerEvent],
        offsets: Mapping[tuple[str, int], int],
        now_ms: int,
    ) -> BatchResult:
        known = self.known([e.request_id for e in events]) if events else set()
        fresh = []
        for e in events:  # the first copy of a request wins, also inside the batch
            if e.request_id not in known:
                known.add(e.request_id)
                fresh.append(e)
        late = 0
        if fresh:
            bucket = self.bucket_at(now_ms)
            conn.execute("INSERT OR IGNORE INTO ledger_buckets VALUES (?)", (bucket,))
            key_ids = self.keys.resolve(conn, fresh)
            closed = {
                row[0]
                for row in conn.execute(
                    "SELECT usage_date FROM closed_days"
                    " WHERE usage_date IN (SELECT value FROM json_each(?))",
                    (_json_list({e.usage_date for e in fresh}),),
                )
            }
            # one pass: the ledger rows and the folded increments per (date, key)
            rows = []
            sums: dict[tuple[str, int], list[int]] = {}
            for e in fresh:
                key_id = key_ids[(e.client_org_id, e.user_id, e.model)]
                rows.append(
                    (
                        bucket,
                        e.request_id,
                        e.usage_day,
                        key_id,
                        e.input_tokens,
                        e.output_tokens,
                        e.cost_nano,
                        e.cost_estimated,
                        e.partition,
                        e.offset,
                    )
                )
                total = sums.get((e.usage_date, key_id))
                if total is None:
                    total = sums[(e.usage_date, key_id)] = [0, 0, 0, 0, 0, 0]
                total[0] += e.input_tokens
                total[1] += e.output_tokens
                total[2] += 1
                total[3] += e.cost_estimated
                total[4] += e.cost_nano
                if e.usage_date in closed:
                    total[5] += 1
                    late += 1
            conn.executemany("INSERT INTO ledger VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
            conn.executemany(FOLD_SQL, [(*key, *total) for key, total in sums.items()])
        if offsets:
            updated_at = utc_now_text()
            conn.executemany(
                _OFFSET,
                [
                    (topic, partition, nxt, updated_at)
                    for (topic, partition), nxt in offsets.items()
                ],
            )
        return BatchResult(fresh, len(events) - len(fresh), late)

    # Retention ----------------------------------------------------------------------

    def prune(self, now_ms: int | None = None, chunk: int = _PRUNE_CHUNK) -> int:
        """Delete ledger rows recorded more than the retention ago, in small transactions
        (the hot path waits for at most one chunk). Returns the rows deleted."""
        now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        cutoff = now_ms - self.retention_ms
        conn = self.conn
        expired = [
            row[0]
            for row in conn.execute(
                "SELECT bucket FROM ledger_buckets WHERE bucket <= ? ORDER BY bucket",
                (cutoff,),
            )
        ]
        deleted = 0
        for bucket in expired:
            while True:
                with self._lock:
                    count = self._prune_chunk(conn, bucket, chunk)
                deleted += count
                if count < chunk:
                    break
        if deleted:
            log.info("ledger: pruned %d request ids recorded before %d (epoch ms)", deleted, cutoff)
        return deleted

    @staticmethod
    def _prune_chunk(conn: sqlite3.Connection, bucket: int, chunk: int) -> int:
        conn.execute("BEGIN IMMEDIATE")
        try:
            count = conn.execute(
                "DELETE FROM ledger WHERE bucket = ?1 AND request_id IN"
                " (SELECT request_id FROM ledger WHERE bucket = ?1 LIMIT ?2)",
                (bucket, chunk),
            ).rowcount
            if count < chunk:
                conn.execute("DELETE FROM ledger_buckets WHERE bucket = ?", (bucket,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return count
