"""The SQLite side of ``usage-stream replay``: staging and the atomic replace of one date.

1. :class:`ReplayStaging` — the replay's own deduplication, spilled to a temporary SQLite
   file next to the summary DB (memory stays bounded for tens of millions of events): one
   row per ``request_id`` (PRIMARY KEY, ``INSERT OR IGNORE``: the first copy read wins),
   only for events of the replayed date.
2. :func:`replace_day` — in ONE ``BEGIN IMMEDIATE`` transaction on the summary DB:
   a. delete the date's ledger rows whose source offset lies inside the replayed range
      ``[start, end)`` of a partition of the usage topic (they are all re-read by the
      replay; rows from outside the range, e.g. older offsets, are kept);
   b. add the staged events to the ledger unless the ledger holds their request already
      (a request recorded from outside the range keeps its first copy);
   c. recompute every ``usage_daily`` row of the date from the ledger with
      :func:`tables.summary_store.write_summaries` (rate from
      :func:`tables.reference.rate_for_date`, looked up inside the transaction), and delete
      the rows whose key has no ledger rows any more;
   d. drop the date's pending increments (the ledger rows they came from are counted in
      c) and provisional rows, mark it in ``closed_days``, and append a ``batch_runs`` row
      (kind ``replay``) — all before ``COMMIT``.

   That is the definition; the statements get the same result with less work, which
   matters because the transaction holds the write lock the live worker waits for:
   a row that (a) would delete and (b) put back unchanged (same bucket, same values, no
   other live copy of its request) is left in place, so replaying an intact date writes
   no ledger row; the date's rows are scanned twice (a count, then the totals, which are
   aggregated before the keys are named); only ``usage_daily`` rows whose values differ
   go through ``write_summaries`` (the same function computes the values compared), and
   the rows are re-read for the report only if something was written.
   ``tests/replay/test_replay.py`` checks the result against the plain (a)+(b) on every
   case where keeping a row could differ.

   The ledger keeps per-event rows for ``LEDGER_RETENTION_DAYS``. For a date older than
   that, the rows recorded from outside the replayed range are gone, so the date is
   rebuilt from what the replay reads: widen the range with ``--from-offsets`` when some
   of its events were produced long before or after it.
   Unchanged rows keep their ``revision`` and ``updated_at``, so replaying twice changes
   nothing. With ``dry_run`` the same work is done and then rolled back: only the
   differences are returned.

:func:`tables.ledger.ledger_events` is the one place where a validated event becomes a
ledger row (its usage date, and its cost: ``cost_usd`` when present, else estimated from
the model's latest stored price); the worker and the replay share it.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import NamedTuple

import aiosqlite

from tables.ledger import LedgerEvent
from tables.reference import rate_for_date, record_batch_run
from tables.schema import utc_now_text, write_transaction
from tables.summary_store import Rate, SummaryRow, _summary_values, write_summaries

__all__ = [
    "DailyRow",
    "ReplayOutcome",
    "ReplayRange",
    "ReplayStaging",
    "RowChange",
    "replace_day",
]

_CLOSED_BY = f"replay@{socket.gethostname()}"
#: Page cache of each database during the replace (MiB).
REPLACE_CACHE_MIB = 256


# Staging --------------------------------------------------------------------------------


class ReplayStaging:
    """The replay's unique events of the date, in a temporary SQLite file.

    Synchronous sqlite3 on purpose: one ``executemany`` per fetched batch, no thread hop
    per row (the replay calls :meth:`add` on a thread of its own, one call at a time).
    The file lives in a private temporary directory under ``directory`` (the summary DB's,
    so it is on a disk sized for the data) and is removed by :meth:`close`.
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix=".replay-", dir=directory))
        self.path = self._dir / "staging.db"
        self.read = 0  # events of the date offered to add()
        self.unique = 0  # of which distinct request ids
        try:
            # used by one thread at a time: the replay's staging thread, then the closer
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode = OFF")
            self._conn.execute("PRAGMA synchronous = OFF")
            self._conn.execute("PRAGMA cache_size = -65536")  # 64 MiB, then it spills
            self._conn.execute(
                """CREATE TABLE staged (
                    request_id TEXT PRIMARY KEY,
                    usage_day INTEGER NOT NULL,
                    client_org_id TEXT NOT NULL,
                    user_id TEXT NOT NULL,
                    model TEXT NOT NULL,
                    input_tokens INTEGER NOT NULL,
                    output_tokens INTEGER NOT NULL,
                    cost_nano INTEGER NOT NULL,
                    cost_estimated INTEGER NOT NULL,
                    source_partition INTEGER NOT NULL,
                    source_offset INTEGER NOT NULL
                ) WITHOUT ROWID"""
            )
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise

    @property
    def duplicates(self) -> int:
        return self.read - self.unique

    def add(self, entries: Sequence[LedgerEvent]) -> int:
        """Stage entries (first copy of a request_id wins); returns how many were new."""
        if not entries:
            return 0
        before = self._conn.total_changes
        self._conn.execute("BEGIN")
        try:
            self._conn.executemany(
                "INSERT OR IGNORE INTO staged VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        e.request_id,
                        e.usage_day,
                        e.client_org_id,
                        e.user_id,
                        e.model,
                        e.input_tokens,
                        e.output_tokens,
                        e.cost_nano,
                        int(e.cost_estimated),
                        e.partition,
                        e.offset,
                    )
                    for e in entries
                ],
            )
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        added = self._conn.total_changes - before
        self.read += len(entries)
        self.unique += added
        return added

    def close(self) -> None:
        try:
            self._conn.close()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> ReplayStaging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# The replace --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayRange:
    """Offsets ``[start, end)`` of one partition of the usage topic that were replayed."""

    partition: int
    start: int
    end: int


Key = tuple[str, str, str]  # (client_org_id, user_id, model) within the date

_DAILY_COLUMNS = (
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "requests",
    "estimated_requests",
    "raw_cost_nano",
    "markup_cost_nano",
    "markup_cost_pln_nano",
    "raw_cost_usd",
    "markup_cost_usd",
    "markup_cost_pln",
    "usd_pln_rate",
    "nbp_table_no",
    "revision",
    "updated_at",
)


class DailyRow(NamedTuple):
    """One stored ``usage_daily`` row of the date (every column but the key). A tuple:
    a replay that adds a whole date builds one per row (a frozen dataclass per row cost
    a noticeable part of the replace)."""

    input_tokens: int
    output_tokens: int
    total_tokens: int
    requests: int
    estimated_requests: int
    raw_cost_nano: int
    markup_cost_nano: int
    markup_cost_pln_nano: int | None
    raw_cost_usd: float
    markup_cost_usd: float
    markup_cost_pln: float | None
    usd_pln_rate: str | None
    nbp_table_no: str | None
    revision: int
    updated_at: str

    def content(self) -> tuple[object, ...]:
        """Every value but ``revision`` and ``updated_at``: what a correction changes."""
        return (
            self.input_tokens,
            self.output_tokens,
            self.total_tokens,
            self.requests,
            self.estimated_requests,
            self.raw_cost_nano,
            self.markup_cost_nano,
            self.markup_cost_pln_nano,
            self.raw_cost_usd,
            self.markup_cost_usd,
            self.markup_cost_pln,
            self.usd_pln_rate,
            self.nbp_table_no,
        )


class RowChange(NamedTuple):
    """A ``usage_daily`` row of the date that the replay adds, removes or changes."""

    kind: str  # "added", "removed", "changed"
    key: Key
    old: DailyRow | None
    new: DailyRow | None


@dataclass(frozen=True, slots=True)
class ReplayOutcome:
    usage_date: str
    changes: list[RowChange]
    rows: int  # usage_daily rows of the date after the replay
    summaries_written: int  # rows inserted or re-written (revision + 1) plus rows deleted
    clients: int
    ledger_before: int  # ledger rows of the date
    ledger_after: int
    ledger_removed: int  # rows of the date in the replayed ranges: replaced (a)
    ledger_inserted: int  # staged events now in the ledger (b; kept identical rows too)
    rate: Rate | None
    committed: bool
    batch_run_id: int | None
    #: seconds per step of the transaction (for the operator's timing line and profiling)
    timings: dict[str, float] = field(default_factory=dict)

    def count(self, kind: str) -> int:
        return sum(1 for change in self.changes if change.kind == kind)

    @property
    def corrections(self) -> int:
        return len(self.changes)


async def _daily_rows(conn: aiosqlite.Connection, day: str) -> dict[Key, tuple[object, ...]]:
    """The date's ``usage_daily`` rows as plain tuples (``_DAILY_COLUMNS`` order): a
    :class:`DailyRow` is built only for the few rows that change (tens of thousands of
    dataclass instances per date cost more than the query)."""
    sql = (
        f"SELECT client_org_id, user_id, model, {', '.join(_DAILY_COLUMNS)}"
        " FROM usage_daily WHERE usage_date = ?"
    )
    async with conn.execute(sql, (day,)) as cursor:
        return {(row[0], row[1], row[2]): row[3:] for row in await cursor.fetchall()}


async def _count(conn: aiosqlite.Connection, sql: str, args: Iterable[object]) -> int:
    async with conn.execute(sql, tuple(args)) as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


_CONTENT = len(_DAILY_COLUMNS) - 2  # every column but revision and updated_at


def _diff(
    before: Mapping[Key, tuple[object, ...]],
    after: Mapping[Key, tuple[object, ...]],
    candidates: Iterable[Key],
) -> list[RowChange]:
    """The changes among ``candidates`` (the only keys that may have changed), by key."""
    make = DailyRow._make  # tuple.__new__: a row of a whole added date costs little
    changes: list[RowChange] = []
    for key in sorted(candidates):
        old, new = before.get(key), after.get(key)
        if old is None:
            if new is not None:
                changes.append(RowChange("added", key, None, make(new)))
        elif new is None:
            changes.append(RowChange("removed", key, make(old), None))
        elif old[:_CONTENT] != new[:_CONTENT]:
            changes.append(RowChange("changed", key, make(old), make(new)))
    return changes


class _Lap:
    """Records the seconds since the previous call under a step's name."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings
        self.last = time.monotonic()

    def __call__(self, step: str) -> None:
        now = time.monotonic()
        self.timings[step] = self.timings.get(step, 0.0) + now - self.last
        self.last = now


async def replace_day(
    conn: aiosqlite.Connection,
    staging: ReplayStaging,
    day: str,
    topic: str,
    ranges: Sequence[ReplayRange],
    markup: Decimal,
    *,
    bucket: int,
    dry_run: bool,
    started_at: str,
    records_processed: int,
) -> ReplayOutcome:
    """Replace date ``day`` from the staged events, atomically (see the module docstring).

    ``bucket`` is the ledger bucket of requests recorded now
    (:meth:`tables.ledger.LedgerStore.bucket_at`).

    ``conn`` must be in autocommit mode (as :func:`tables.schema.connect` opens it) with no
    transaction open. With ``dry_run`` nothing is written, not even ``batch_runs``.
    """
    await conn.execute("ATTACH DATABASE ? AS replay_staging", (str(staging.path),))
    # Page caches sized like the hot path's: the transaction scans the date's ledger rows
    # and probes both B-trees by random request id; with SQLite's 2 MiB default nearly
    # every probe reads its page from the OS again. Per connection, bounded.
    await conn.execute(f"PRAGMA main.cache_size = -{REPLACE_CACHE_MIB * 1024}")
    await conn.execute(f"PRAGMA replay_staging.cache_size = -{REPLACE_CACHE_MIB * 1024}")
    try:
        async with write_transaction(conn, rollback=dry_run):
            outcome = await _replace(
                conn, day, ranges, markup, bucket, dry_run, started_at, records_processed
            )
            lap = _Lap(outcome.timings)
        lap("commit" if not dry_run else "rollback")
    finally:
        with contextlib.suppress(sqlite3.Error):
            await conn.execute("DETACH DATABASE replay_staging")
    return outcome


def _inside(alias: str, ranges: Sequence[ReplayRange]) -> tuple[str, dict[str, int]]:
    """SQL true for a ledger row read from one of the ranges, with its named arguments."""
    if not ranges:
        return "0", {}
    sql = " OR ".join(
        f"({alias}.source_partition = :p{i} AND {alias}.source_offset >= :s{i}"
        f" AND {alias}.source_offset < :e{i})"
        for i in range(len(ranges))
    )
    args = {}
    for i, r in enumerate(ranges):
        args.update({f"p{i}": r.partition, f"s{i}": r.start, f"e{i}": r.end})
    return f"({sql})", args


# (a) A ledger row of the date read from a replayed range is deleted, unless the replay's
# own row for that request would put back exactly the same row: same bucket (the one the
# replay records in), same values, and no other live row of the request survives (then
# the original "delete, insert where not exists" would re-insert it). Keeping such a row
# leaves the ledger byte for byte as deleting and re-inserting it would, without
# rewriting the B-tree: a replay of an intact date writes no ledger row at all.
_DELETE = """
    DELETE FROM ledger WHERE usage_day = :day AND {inside} AND NOT (
        bucket = :bucket
        AND EXISTS (
            SELECT 1 FROM replay_staging.staged s JOIN summary_keys k
                ON k.client_org_id = s.client_org_id AND k.user_id = s.user_id
                AND k.model = s.model
            WHERE s.request_id = ledger.request_id AND s.usage_day = ledger.usage_day
                AND k.key_id = ledger.key_id AND s.input_tokens = ledger.input_tokens
                AND s.output_tokens = ledger.output_tokens AND s.cost_nano = ledger.cost_nano
                AND s.cost_estimated = ledger.cost_estimated
                AND s.source_partition = ledger.source_partition
                AND s.source_offset = ledger.source_offset)
        AND NOT EXISTS (
            SELECT 1 FROM ledger o
            WHERE o.bucket IN (SELECT bucket FROM ledger_buckets) AND o.bucket <> :bucket
                AND o.request_id = ledger.request_id
                AND NOT (o.usage_day = :day AND {inside_o})))
"""
# (b) the replay's unique events; a request already in the ledger keeps its first copy
_INSERT = """
    INSERT INTO main.ledger
    SELECT ?, s.request_id, s.usage_day, k.key_id, s.input_tokens, s.output_tokens,
           s.cost_nano, s.cost_estimated, s.source_partition, s.source_offset
    FROM replay_staging.staged s JOIN summary_keys k USING (client_org_id, user_id, model)
    WHERE s.usage_day = ? AND NOT EXISTS (
        SELECT 1 FROM ledger l WHERE l.bucket IN (SELECT bucket FROM ledger_buckets)
        AND l.request_id = s.request_id)
"""
# (c) the date's totals per key: aggregate first, then name the keys (one scan of ledger)
_TOTALS = """
    SELECT k.client_org_id, k.user_id, k.model, ?, t.input_tokens, t.output_tokens,
           t.requests, t.estimated_requests, t.raw_cost_nano
    FROM (SELECT key_id, SUM(input_tokens) AS input_tokens,
                 SUM(output_tokens) AS output_tokens, COUNT(*) AS requests,
                 SUM(cost_estimated) AS estimated_requests, SUM(cost_nano) AS raw_cost_nano
          FROM ledger WHERE usage_day = ? GROUP BY key_id) t
    JOIN summary_keys k USING (key_id)
"""


async def _replace(
    conn: aiosqlite.Connection,
    day: str,
    ranges: Sequence[ReplayRange],
    markup: Decimal,
    bucket: int,
    dry_run: bool,
    started_at: str,
    records_processed: int,
) -> ReplayOutcome:
    timings: dict[str, float] = {}
    lap = _Lap(timings)
    ordinal = date.fromisoformat(day).toordinal()
    rate = await rate_for_date(conn, date.fromisoformat(day))
    before = await _daily_rows(conn, day)
    lap("usage_daily before")
    read = [r for r in ranges if r.end > r.start]
    inside, args = _inside("ledger", read)
    args.update({"day": ordinal, "bucket": bucket})
    # the date's ledger rows, and how many of them lie in the replayed ranges (one scan)
    async with conn.execute(
        f"SELECT COUNT(*), COALESCE(SUM({inside}), 0) FROM ledger WHERE usage_day = :day",
        args,
    ) as cursor:
        ledger_before, in_ranges = await cursor.fetchone()
    lap("ledger count")

    await conn.execute(
        "INSERT OR IGNORE INTO summary_keys (client_org_id, user_id, model)"
        " SELECT DISTINCT client_org_id, user_id, model FROM replay_staging.staged"
    )
    await conn.execute("INSERT OR IGNORE INTO ledger_buckets VALUES (?)", (bucket,))
    mark = conn.total_changes
    if read:
        inside_o, _ = _inside("o", read)
        await conn.execute(_DELETE.format(inside=inside, inside_o=inside_o), args)
    deleted = conn.total_changes - mark
    lap("ledger delete")
    mark = conn.total_changes
    await conn.execute(_INSERT, (bucket, ordinal))
    inserted = conn.total_changes - mark
    kept = in_ranges - deleted  # identical rows left in place instead of re-inserted
    lap("ledger insert")

    # (c) every usage_daily row of the date, from the ledger; only rows whose values
    # differ are handed to write_summaries (which would leave the others untouched too)
    async with conn.execute(_TOTALS, (day, ordinal)) as cursor:
        rows = [SummaryRow(*row) for row in await cursor.fetchall()]
    lap("totals")
    now = utc_now_text()
    differing = []
    for row in rows:
        old = before.get((row.client_org_id, row.user_id, row.model))
        # the values write_summaries would store, by the same function
        if old is None or old[:_CONTENT] != _summary_values(row, markup, rate, now)[4:-1]:
            differing.append(row)
    lap("compare")
    written = await write_summaries(conn, differing, markup, rate)
    lap("write_summaries")
    kept_keys = {(row.client_org_id, row.user_id, row.model) for row in rows}
    gone = [key for key in before if key not in kept_keys]
    mark = conn.total_changes
    await conn.executemany(
        "DELETE FROM usage_daily WHERE client_org_id = ? AND user_id = ? AND model = ?"
        " AND usage_date = ?",
        [(*key, day) for key in gone],
    )
    written += conn.total_changes - mark

    # (d) the date is settled: nothing pending, closed (later events of it count as late)
    await conn.execute("DELETE FROM daily_pending WHERE usage_date = ?", (day,))
    await conn.execute("DELETE FROM usage_daily_open WHERE usage_date = ?", (day,))
    await conn.execute(
        "INSERT OR IGNORE INTO closed_days VALUES (?, ?, ?)", (day, utc_now_text(), _CLOSED_BY)
    )

    after = await _daily_rows(conn, day) if written else before
    # only rows handed to write_summaries or deleted can differ from before
    candidates = {(r.client_org_id, r.user_id, r.model) for r in differing}.union(gone)
    changes = _diff(before, after, candidates) if written else []
    lap("settle and diff")
    clients = len({key[0] for key in after})
    run_id = None
    if not dry_run:
        run_id = await record_batch_run(
            conn,
            "replay",
            day,
            started_at,
            utc_now_text(),
            True,
            records_processed=records_processed,
            summaries_written=written,
            clients_processed=clients,
            data_corrections=len(changes),
            late_events=0,
        )
    return ReplayOutcome(
        usage_date=day,
        changes=changes,
        rows=len(after),
        summaries_written=written,
        clients=clients,
        ledger_before=ledger_before,
        ledger_after=ledger_before - deleted + inserted,
        ledger_removed=in_ranges,
        ledger_inserted=inserted + kept,
        rate=rate,
        committed=not dry_run,
        batch_run_id=run_id,
        timings=timings,
    )
