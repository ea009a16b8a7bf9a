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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from pathlib import Path

import aiosqlite

from tables.ledger import LedgerEvent
from tables.reference import rate_for_date, record_batch_run
from tables.schema import utc_now_text, write_transaction
from tables.summary_store import Rate, SummaryRow, write_summaries

__all__ = [
    "DailyRow",
    "ReplayOutcome",
    "ReplayRange",
    "ReplayStaging",
    "RowChange",
    "replace_day",
]

_CLOSED_BY = f"replay@{socket.gethostname()}"


# Staging --------------------------------------------------------------------------------


class ReplayStaging:
    """The replay's unique events of the date, in a temporary SQLite file.

    Synchronous sqlite3 on purpose: one ``executemany`` per fetched batch, no thread hop
    per row. The file lives in a private temporary directory under ``directory`` (the
    summary DB's, so it is on a disk sized for the data) and is removed by :meth:`close`.
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix=".replay-", dir=directory))
        self.path = self._dir / "staging.db"
        self.read = 0  # events of the date offered to add()
        self.unique = 0  # of which distinct request ids
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None)
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


@dataclass(frozen=True, slots=True)
class DailyRow:
    """One stored ``usage_daily`` row of the date (every column but the key)."""

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


@dataclass(frozen=True, slots=True)
class RowChange:
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
    ledger_removed: int  # rows of the replayed range deleted (a)
    ledger_inserted: int  # staged events inserted (b)
    rate: Rate | None
    committed: bool
    batch_run_id: int | None

    def count(self, kind: str) -> int:
        return sum(1 for change in self.changes if change.kind == kind)

    @property
    def corrections(self) -> int:
        return len(self.changes)


async def _daily_rows(conn: aiosqlite.Connection, day: str) -> dict[Key, DailyRow]:
    sql = (
        f"SELECT client_org_id, user_id, model, {', '.join(_DAILY_COLUMNS)}"
        " FROM usage_daily WHERE usage_date = ?"
    )
    async with conn.execute(sql, (day,)) as cursor:
        return {(row[0], row[1], row[2]): DailyRow(*row[3:]) for row in await cursor.fetchall()}


async def _count(conn: aiosqlite.Connection, sql: str, args: Iterable[object]) -> int:
    async with conn.execute(sql, tuple(args)) as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


def _diff(before: Mapping[Key, DailyRow], after: Mapping[Key, DailyRow]) -> list[RowChange]:
    changes: list[RowChange] = []
    for key in sorted(before.keys() | after.keys()):
        old, new = before.get(key), after.get(key)
        if old is None:
            changes.append(RowChange("added", key, None, new))
        elif new is None:
            changes.append(RowChange("removed", key, old, None))
        elif old.content() != new.content():
            changes.append(RowChange("changed", key, old, new))
    return changes


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
    try:
        async with write_transaction(conn, rollback=dry_run):
            outcome = await _replace(
                conn, day, ranges, markup, bucket, dry_run, started_at, records_processed
            )
    finally:
        with contextlib.suppress(sqlite3.Error):
            await conn.execute("DETACH DATABASE replay_staging")
    return outcome


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
    ordinal = date.fromisoformat(day).toordinal()
    rate = await rate_for_date(conn, date.fromisoformat(day))
    before = await _daily_rows(conn, day)
    ledger_sql = "SELECT COUNT(*) FROM ledger WHERE usage_day = ?"
    ledger_before = await _count(conn, ledger_sql, (ordinal,))

    # (a) the date's ledger rows that the replay has re-read (one scan for all ranges)
    mark = conn.total_changes
    read = [r for r in ranges if r.end > r.start]
    if read:
        inside = " OR ".join(
            "(source_partition = ? AND source_offset >= ? AND source_offset < ?)" for _ in read
        )
        await conn.execute(
            f"DELETE FROM ledger WHERE usage_day = ? AND ({inside})",
            (ordinal, *[value for r in read for value in (r.partition, r.start, r.end)]),
        )
    removed = conn.total_changes - mark

    # (b) the replay's unique events; a request already in the ledger keeps its first copy
    await conn.execute(
        "INSERT OR IGNORE INTO summary_keys (client_org_id, user_id, model)"
        " SELECT DISTINCT client_org_id, user_id, model FROM replay_staging.staged"
    )
    await conn.execute("INSERT OR IGNORE INTO ledger_buckets VALUES (?)", (bucket,))
    mark = conn.total_changes
    await conn.execute(
        """INSERT INTO main.ledger
        SELECT ?, s.request_id, s.usage_day, k.key_id, s.input_tokens, s.output_tokens,
               s.cost_nano, s.cost_estimated, s.source_partition, s.source_offset
        FROM replay_staging.staged s JOIN summary_keys k USING (client_org_id, user_id, model)
        WHERE s.usage_day = ? AND NOT EXISTS (
            SELECT 1 FROM ledger l WHERE l.bucket IN (SELECT bucket FROM ledger_buckets)
            AND l.request_id = s.request_id)""",
        (bucket, ordinal),
    )
    inserted = conn.total_changes - mark

    # (c) every usage_daily row of the date, from the ledger
    async with conn.execute(
        """SELECT k.client_org_id, k.user_id, k.model, ?, SUM(l.input_tokens),
               SUM(l.output_tokens), COUNT(*), SUM(l.cost_estimated), SUM(l.cost_nano)
        FROM ledger l JOIN summary_keys k USING (key_id)
        WHERE l.usage_day = ? GROUP BY l.key_id""",
        (day, ordinal),
    ) as cursor:
        rows = [SummaryRow(*row) for row in await cursor.fetchall()]
    written = await write_summaries(conn, rows, markup, rate)
    kept = {(row.client_org_id, row.user_id, row.model) for row in rows}
    gone = [key for key in before if key not in kept]
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

    after = await _daily_rows(conn, day)
    changes = _diff(before, after)
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
        ledger_after=await _count(conn, ledger_sql, (ordinal,)),
        ledger_removed=removed,
        ledger_inserted=inserted,
        rate=rate,
        committed=not dry_run,
        batch_run_id=run_id,
    )
