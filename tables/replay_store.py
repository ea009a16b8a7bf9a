"""The SQLite side of ``usage-stream replay``: staging and the atomic replace of one date.

1. :class:`ReplayStaging` — the replay's own deduplication, spilled to a temporary SQLite
   file next to the summary DB (memory stays bounded for tens of millions of events): the
   request ids of the date read so far (PRIMARY KEY; the first copy read wins). The sums
   of the first copies are folded in memory, per summary key (:class:`DayTotals`). A
   replay that was killed (SIGKILL, the OOM killer, a lost host) cannot remove its file:
   the next replay on the same directory does (:func:`sweep_abandoned`).
2. :func:`replace_day` — in ONE ``BEGIN IMMEDIATE`` transaction on the summary DB:
   every ``usage_daily`` row of the date becomes the replay's totals
   (:func:`tables.summary_store.upsert_summary_values`, rate from
   :func:`tables.reference.rate_for_date` looked up inside the transaction; rows whose key
   has no staged event are deleted); the date's pending increments and provisional rows
   are dropped (they came from batches before the replay's fences, which the replay read
   itself: see agents/replay.py), the date is marked in ``closed_days``, a ``batch_runs``
   row (kind ``replay``) is appended and the replay is marked complete in
   ``replay_runs``, which lets the summary writer go on past its fences.

   Only rows whose values differ are upserted: unchanged rows keep
   their ``revision`` and ``updated_at``, so replaying twice changes nothing. With
   ``dry_run`` the same work is done and then rolled back: only the differences are
   returned.

:func:`tables.ledger.ledger_events` is the one place where a validated event becomes a
ledger row (its usage date, and its cost: ``cost_usd`` when present, else estimated from
the model's latest stored price); the worker and the replay share it.
"""

from __future__ import annotations

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
from tables.summary_store import (
    Rate,
    SummaryRow,
    _summary_values,
    upsert_summary_values,
)

__all__ = [
    "DailyRow",
    "ReplayOutcome",
    "DayTotals",
    "ReplayStaging",
    "RowChange",
    "replace_day",
    "sweep_abandoned",
]

log = logging.getLogger(__name__)

_CLOSED_BY = f"replay@{socket.gethostname()}"

Key = tuple[str, str, str]  # (client_org_id, user_id, model) within the date


# Staging --------------------------------------------------------------------------------

# A fetch's ids in two statements with the GIL released (the staging thread runs beside
# the thread that reads and validates; an executemany would take the GIL once per row,
# and against a busy thread 40k rows went 0.62 s -> 58 s here). A flat JSON array of
# strings costs json_each little; an array of rows read back with ``value->>N`` costs a
# re-parse of the row per column, which made staging whole rows ~4x dearer.
_KNOWN_JSON = "SELECT value FROM json_each(?) WHERE value IN (SELECT request_id FROM seen)"
_SEEN_JSON = "INSERT OR IGNORE INTO seen SELECT value FROM json_each(?)"
_ESCAPED_NUL = b"\\u0000"


class ReplayStaging:
    """The replay's deduplication: the request ids of the date read so far, in a
    temporary SQLite file (memory stays bounded for tens of millions of events).

    :meth:`add` keeps the first copy of each request id and returns those first copies;
    their sums are folded in memory (:class:`DayTotals`), so the file holds ids only.
    Synchronous sqlite3 on purpose: the replay calls :meth:`add` on a thread of its own,
    one call at a time, in read order. The file lives in a private temporary directory
    under ``directory`` (the summary DB's, so it is on a disk sized for the data) and is
    removed by :meth:`close`.
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
            self._conn.execute("CREATE TABLE seen (request_id TEXT PRIMARY KEY) WITHOUT ROWID")
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            if self._owner >= 0:
                os.close(self._owner)
            raise

    @property
    def duplicates(self) -> int:
        return self.read - self.unique

    def add(self, entries: Sequence[LedgerEvent]) -> list[LedgerEvent]:
        """The entries whose request id no earlier entry had (the first copy wins, also
        within ``entries``), in order; their ids are recorded as seen."""
        if not entries:
            return []
        first: dict[str, LedgerEvent] = {}
        for entry in entries:
            first.setdefault(entry.request_id, entry)
        ids = list(first)
        payload = orjson.dumps(ids)
        self._conn.execute("BEGIN")
        try:
            if _ESCAPED_NUL in payload:  # SQLite's JSON functions would cut such text
                known = {
                    rid
                    for rid in ids
                    if self._conn.execute(
                        "SELECT 1 FROM seen WHERE request_id = ?", (rid,)
                    ).fetchone()
                }
                self._conn.executemany(
                    "INSERT OR IGNORE INTO seen VALUES (?)", [(rid,) for rid in ids]
                )
            else:
                text = payload.decode()
                known = {row[0] for row in self._conn.execute(_KNOWN_JSON, (text,))}
                self._conn.execute(_SEEN_JSON, (text,))
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        new = (
            [entry for rid, entry in first.items() if rid not in known]
            if known
            else list(first.values())
        )
        self.read += len(entries)
        self.unique += len(new)
        return new

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


class DayTotals:
    """The date's exact totals per (client, user, model), folded from first copies.

    In memory: a date has as many of these as summary keys (tens of thousands), not
    events, and folding in Python costs less than grouping the events again in SQL."""

    def __init__(self) -> None:
        # key -> [input_tokens, output_tokens, requests, estimated_requests, cost_nano]
        self._sums: dict[Key, list[int]] = {}

    def add(self, entries: Iterable[LedgerEvent]) -> None:
        sums = self._sums
        for e in entries:
            key = (e.client_org_id, e.user_id, e.model)
            row = sums.get(key)
            if row is None:
                sums[key] = [e.input_tokens, e.output_tokens, 1, e.cost_estimated, e.cost_nano]
            else:
                row[0] += e.input_tokens
                row[1] += e.output_tokens
                row[2] += 1
                row[3] += e.cost_estimated
                row[4] += e.cost_nano

    def add_sums(self, rows: Iterable[Sequence]) -> None:
        """Add another fold's :meth:`sums` (a group of partitions read elsewhere)."""
        sums = self._sums
        for org, user, model, *values in rows:
            key = (org, user, model)
            row = sums.get(key)
            if row is None:
                sums[key] = list(values)
            else:
                for i, value in enumerate(values):
                    row[i] += value

    def sums(self) -> list[list]:
        """``[client, user, model, input_tokens, output_tokens, requests,
        estimated_requests, cost_nano]`` per key (JSON-friendly, for :meth:`add_sums`)."""
        return [[*key, *sums] for key, sums in self._sums.items()]

    def rows(self, day: str) -> list[SummaryRow]:
        return [SummaryRow(*key, day, *sums) for key, sums in self._sums.items()]


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
    totals: Sequence[SummaryRow],
    day: str,
    markup: Decimal,
    *,
    dry_run: bool,
    started_at: str,
    records_processed: int,
    replay_id: str | None = None,
) -> ReplayOutcome:
    """Replace date ``day`` with ``totals`` (the staged events' sums, one row per key),
    atomically (module docstring).

    ``conn`` must be in autocommit mode (as :func:`tables.schema.connect` opens it) with no
    transaction open. With ``dry_run`` nothing is written, not even ``batch_runs``.
    """
    async with write_transaction(conn, rollback=dry_run):
        outcome = await _replace(
            conn, totals, day, markup, dry_run, started_at, records_processed, replay_id
        )
        lap = _Lap(outcome.timings)
    lap("commit" if not dry_run else "rollback")
    return outcome


async def _replace(
    conn: aiosqlite.Connection,
    totals: Sequence[SummaryRow],
    day: str,
    markup: Decimal,
    dry_run: bool,
    started_at: str,
    records_processed: int,
    replay_id: str | None,
) -> ReplayOutcome:
    timings: dict[str, float] = {}
    lap = _Lap(timings)
    rate = await rate_for_date(conn, date.fromisoformat(day))
    before = await _daily_rows(conn, day)
    lap("usage_daily before")
    now = utc_now_text()
    after = dict(before)
    differing = []  # usage_daily values (_summary_values) of the rows that change
    for row in totals:
        values = _summary_values(row, markup, rate, now)
        key = (row.client_org_id, row.user_id, row.model)
        old = before.get(key)
        content = values[4:-1]
        if old is None or old[:_CONTENT] != content:
            differing.append(values)
            # what the upsert stores: a new row, or the old one re-written (revision + 1)
            after[key] = (*content, 1 if old is None else old[_CONTENT] + 1, now)
    lap("compare")
    # no other thread of the replay is busy now: binding row by row is the faster way
    written = await upsert_summary_values(conn, differing, row_by_row=True)
    lap("write_summaries")
    kept_keys = {(row.client_org_id, row.user_id, row.model) for row in totals}
    gone = [key for key in before if key not in kept_keys]
    mark = conn.total_changes
    await conn.executemany(
        "DELETE FROM usage_daily WHERE client_org_id = ? AND user_id = ? AND model = ?"
        " AND usage_date = ?",
        [(*key, day) for key in gone],
    )
    deleted = conn.total_changes - mark
    for key in gone:
        del after[key]
    if written != len(differing) or deleted != len(gone):  # not expected: read them back
        log.warning(
            "replace of %s: %d of %d rows upserted, %d of %d deleted; reading the date back",
            day,
            written,
            len(differing),
            deleted,
            len(gone),
        )
        after = await _daily_rows(conn, day)
    written += deleted

    # the date is settled: nothing pending, closed (later events of it count as late)
    await conn.execute("DELETE FROM daily_pending WHERE usage_date = ?", (day,))
    await conn.execute("DELETE FROM usage_daily_open WHERE usage_date = ?", (day,))
    await conn.execute(
        "INSERT OR IGNORE INTO closed_days VALUES (?, ?, ?)", (day, utc_now_text(), _CLOSED_BY)
    )
    # only rows handed to the upsert or deleted can differ from before
    candidates = {tuple(values[:3]) for values in differing}.union(gone)
    changes = _diff(before, after, candidates)
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
