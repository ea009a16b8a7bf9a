"""The SQLite side of ``usage-stream replay``: staging and the atomic replace of one date.

1. :class:`ReplayStaging` — the replay's own deduplication, spilled to a temporary SQLite
   file next to the summary DB (memory stays bounded for tens of millions of events): one
   row per ``request_id`` (PRIMARY KEY, ``INSERT OR IGNORE``: the first copy read wins),
   only for events of the replayed date. A replay that was killed (SIGKILL, the OOM
   killer, a lost host) cannot remove its file: the next replay on the same directory
   does (:func:`sweep_abandoned`).
2. :func:`replace_day` — in ONE ``BEGIN IMMEDIATE`` transaction on the summary DB:
   every ``usage_daily`` row of the date becomes the staged events' totals
   (:func:`tables.summary_store.write_summaries`, rate from
   :func:`tables.reference.rate_for_date` looked up inside the transaction; rows whose key
   has no staged event are deleted); the date's pending increments and provisional rows
   are dropped (they came from batches before the replay's fences, which the replay read
   itself: see agents/replay.py), the date is marked in ``closed_days``, a ``batch_runs``
   row (kind ``replay``) is appended and the replay is marked complete in
   ``replay_runs``, which lets the summary writer go on past its fences.

   Only rows whose values differ are handed to ``write_summaries``: unchanged rows keep
   their ``revision`` and ``updated_at``, so replaying twice changes nothing. With
   ``dry_run`` the same work is done and then rolled back: only the differences are
   returned.

:func:`tables.ledger.ledger_events` is the one place where a validated event becomes a
ledger row (its usage date, and its cost: ``cost_usd`` when present, else estimated from
the model's latest stored price); the worker and the replay share it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
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
import orjson

from tables.ledger import LedgerEvent
from tables.reference import rate_for_date, record_batch_run
from tables.schema import utc_now_text, write_transaction
from tables.summary_store import Rate, SummaryRow, _summary_values, write_summaries

__all__ = [
    "DailyRow",
    "ReplayOutcome",
    "ReplayStaging",
    "RowChange",
    "replace_day",
    "sweep_abandoned",
]

log = logging.getLogger(__name__)

_CLOSED_BY = f"replay@{socket.gethostname()}"
#: Page cache of each database during the replace (MiB).
REPLACE_CACHE_MIB = 256


# Staging --------------------------------------------------------------------------------

# A fetch's rows in ONE statement, in order (the first copy of a request_id wins): the
# staging thread runs beside the thread that reads and validates, and an executemany
# binds each row in Python, taking the GIL once per row; against a busy thread that cost
# 0.62 s -> 58 s for 40k rows here (tables/summary_store.py measured the same).
_STAGE_JSON = """
    INSERT OR IGNORE INTO staged
    SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6,
        value->>7, value->>8, value->>9, value->>10
    FROM json_each(?)
"""
_ESCAPED_NUL = b"\\u0000"


class ReplayStaging:
    """The replay's unique events of the date, in a temporary SQLite file.

    Synchronous sqlite3 on purpose: one ``executemany`` per fetched batch, no thread hop
    per row (the replay calls :meth:`add` on a thread of its own, one call at a time).
    The file lives in a private temporary directory under ``directory`` (the summary DB's,
    so it is on a disk sized for the data) and is removed by :meth:`close`.
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=directory))
        self.path = self._dir / "staging.db"
        self.read = 0  # events of the date offered to add()
        self.unique = 0  # of which distinct request ids
        self._owner = -1
        try:
            self._owner = _hold(self._dir)
            for gone in sweep_abandoned(directory):
                log.warning("removed %s, left by a replay that did not finish", gone)
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
            if self._owner >= 0:
                os.close(self._owner)
            raise

    @property
    def duplicates(self) -> int:
        return self.read - self.unique

    def add(self, entries: Sequence[LedgerEvent]) -> int:
        """Stage entries (first copy of a request_id wins); returns how many were new."""
        if not entries:
            return 0
        rows = [
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
        ]
        payload = orjson.dumps(rows)
        before = self._conn.total_changes
        self._conn.execute("BEGIN")
        try:
            if _ESCAPED_NUL in payload:  # SQLite's JSON functions would cut such text
                self._conn.executemany(
                    "INSERT OR IGNORE INTO staged VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows
                )
            else:
                self._conn.execute(_STAGE_JSON, (payload.decode(),))
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
            if self._owner >= 0:
                os.close(self._owner)  # after the removal: never swept while in use
                self._owner = -1

    def __enter__(self) -> ReplayStaging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_PREFIX = ".replay-"
_OWNER = "owner.lock"


def _hold(staging_dir: Path) -> int:
    """An exclusive ``flock`` on ``staging_dir/owner.lock``, held until the descriptor is
    closed, which the kernel does when the process dies however it dies. The lock is
    taken on a file of another name, then renamed: a sweeper never finds ``owner.lock``
    unlocked while its replay lives."""
    pending = staging_dir / f"{_OWNER}.new"
    fd = os.open(pending, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(pending, staging_dir / _OWNER)
    except BaseException:
        os.close(fd)
        raise
    return fd


def sweep_abandoned(directory: Path) -> list[Path]:
    """Remove the staging directories under ``directory`` whose replay is gone (its
    ``owner.lock`` can be locked); leave those of running replays, and any without the
    lock file (one being created). Returns what was removed."""
    removed: list[Path] = []
    for candidate in sorted(directory.glob(f"{_PREFIX}*")):
        try:
            fd = os.open(candidate / _OWNER, os.O_RDWR | os.O_CLOEXEC)
        except OSError:  # no lock file: being created, or not a staging directory
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # its replay holds it: running
                continue
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
        finally:
            os.close(fd)
    return removed


# The replace --------------------------------------------------------------------------


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
    markup: Decimal,
    *,
    dry_run: bool,
    started_at: str,
    records_processed: int,
    replay_id: str | None = None,
) -> ReplayOutcome:
    """Replace date ``day`` with the staged events' totals, atomically (module docstring).

    ``conn`` must be in autocommit mode (as :func:`tables.schema.connect` opens it) with no
    transaction open. With ``dry_run`` nothing is written, not even ``batch_runs``.
    """
    await conn.execute("ATTACH DATABASE ? AS replay_staging", (str(staging.path),))
    await conn.execute(f"PRAGMA replay_staging.cache_size = -{REPLACE_CACHE_MIB * 1024}")
    try:
        async with write_transaction(conn, rollback=dry_run):
            outcome = await _replace(
                conn, day, markup, dry_run, started_at, records_processed, replay_id
            )
            lap = _Lap(outcome.timings)
        lap("commit" if not dry_run else "rollback")
    finally:
        with contextlib.suppress(sqlite3.Error):
            await conn.execute("DETACH DATABASE replay_staging")
    return outcome


# the date's totals per key, from the staged events (one per request)
_TOTALS = """
    SELECT client_org_id, user_id, model, ?, SUM(input_tokens), SUM(output_tokens),
           COUNT(*), SUM(cost_estimated), SUM(cost_nano)
    FROM replay_staging.staged WHERE usage_day = ?
    GROUP BY client_org_id, user_id, model
"""


async def _replace(
    conn: aiosqlite.Connection,
    day: str,
    markup: Decimal,
    dry_run: bool,
    started_at: str,
    records_processed: int,
    replay_id: str | None,
) -> ReplayOutcome:
    timings: dict[str, float] = {}
    lap = _Lap(timings)
    ordinal = date.fromisoformat(day).toordinal()
    rate = await rate_for_date(conn, date.fromisoformat(day))
    before = await _daily_rows(conn, day)
    lap("usage_daily before")
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

    # the date is settled: nothing pending, closed (later events of it count as late)
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
        if replay_id is not None:
            await conn.execute(
                "UPDATE replay_runs SET status = 'complete', finished_at = ? WHERE replay_id = ?",
                (utc_now_text(), replay_id),
            )
    return ReplayOutcome(
        usage_date=day,
        changes=changes,
        rows=len(after),
        summaries_written=written,
        clients=clients,
        rate=rate,
        committed=not dry_run,
        batch_run_id=run_id,
        timings=timings,
    )
