"""The summary-DB side of ``usage-stream replay``: the atomic replace of one date.

(The replay's deduplication and its per-key fold are tables/summary_db/replay_staging.py.)

:func:`replace_day`, in ONE ``BEGIN IMMEDIATE`` transaction on the summary DB: every
``usage_daily`` row of the date becomes the replay's totals
(:func:`tables.summary_db.summary_store.upsert_summary_values`, rate from
:func:`tables.summary_db.reference.rate_for_date` looked up inside the transaction; rows whose key
has no event are deleted); the date's pending increments and provisional rows are
dropped (they came from batches before the replay's fences, which the replay read
itself: see agents/replay/run.py), the date is marked in ``closed_days``, a ``batch_runs``
row (kind ``replay``) is appended and the replay is marked complete in ``replay_runs``,
which lets the summary writer go on past its fences.

Each row is priced with the price book's multiplier in force on the date
(tables/summary_db/pricebook.py): rules apply forward only, so a replay of an old date keeps the
price it was billed at. When the date's month is closed (its statement issued), the
difference per client becomes an ``adjustments`` row with reason ``replay``
(tables/summary_db/statements.py), in the same transaction.

Only rows whose values differ are upserted: unchanged rows keep their ``revision`` and
``updated_at``, so replaying twice changes nothing. With ``dry_run`` the same work is
done and then rolled back: only the differences are returned.

:func:`tables.ledger.ledger_events` is the one place where a validated event becomes a
ledger row (its usage date, and its cost: ``cost_usd`` when present, else estimated from
the model's latest stored price); the worker and the replay share it.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import NamedTuple

import aiosqlite

from tables.summary_db.columns import VALUE_COLUMNS
from tables.summary_db.pricebook import load_pricebook
from tables.summary_db.reference import rate_for_date, record_batch_run
from tables.summary_db.schema import utc_now_text, write_transaction
from tables.summary_db.statements import Usage, month_is_closed, record_adjustments
from tables.summary_db.summary_store import (
    Rate,
    SummaryRow,
    _summary_values,
    upsert_summary_values,
)

__all__ = [
    "StoredRow",
    "Lap",
    "ReplayOutcome",
    "RowChange",
    "replace_day",
]

log = logging.getLogger(__name__)

_CLOSED_BY = f"replay@{socket.gethostname()}"

Key = tuple[str, str, str]  # (client_org_id, user_id, model) within the date


# The replace --------------------------------------------------------------------------


#: every stored column of a row but its key, in table order
_DAILY_COLUMNS = (*VALUE_COLUMNS, "revision", "updated_at")


class StoredRow(NamedTuple):
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
    markup_multiplier: str | None
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
            self.markup_multiplier,
        )


class RowChange(NamedTuple):
    """A ``usage_daily`` row of the date that the replay adds, removes or changes."""

    kind: str  # "added", "removed", "changed"
    key: Key
    old: StoredRow | None
    new: StoredRow | None


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
    :class:`StoredRow` is built only for the few rows that change (tens of thousands of
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
    make = StoredRow._make  # tuple.__new__: a row of a whole added date costs little
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


def _usage(row: StoredRow | None) -> Usage | None:
    if row is None:
        return None
    return Usage(
        row.requests,
        row.estimated_requests,
        row.input_tokens,
        row.output_tokens,
        row.total_tokens,
        row.raw_cost_nano,
        row.markup_cost_nano,
        row.markup_cost_pln_nano,
    )


class Lap:
    """Records the seconds since the previous call under a step's name (the replay's
    timing line: its read and its replace)."""

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

    ``conn`` must be in autocommit mode (as :func:`tables.summary_db.schema.connect` opens it)
    with no transaction open. With ``dry_run`` nothing is written, not even ``batch_runs``.
    """
    async with write_transaction(conn, rollback=dry_run):
        outcome = await _replace(
            conn, totals, day, markup, dry_run, started_at, records_processed, replay_id
        )
        lap = Lap(outcome.timings)
    lap("commit" if not dry_run else "rollback")
    return outcome


async def _complete(conn: aiosqlite.Connection, replay_id: str) -> bool:
    cursor = await conn.execute(
        "SELECT 1 FROM replay_runs WHERE replay_id = ? AND status = 'complete'", (replay_id,)
    )
    return await cursor.fetchone() is not None


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
    lap = Lap(timings)
    if replay_id is not None and await _complete(conn, replay_id):
        # completed already (by the summary writer from the replay's published result,
        # or by this replay on an earlier try): replacing again would change nothing
        return ReplayOutcome(day, [], 0, 0, 0, None, False, None, timings)
    rate = await rate_for_date(conn, date.fromisoformat(day))
    markups = (await load_pricebook(conn, markup)).for_day(day)
    before = await _daily_rows(conn, day)
    lap("usage_daily before")
    now = utc_now_text()
    after = dict(before)
    differing = []  # usage_daily values (_summary_values) of the rows that change
    for row in totals:
        values = _summary_values(row, markups(row.client_org_id, row.model), rate, now)
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
    deleted = 0
    if gone:
        cursor = await conn.executemany(
            "DELETE FROM usage_daily WHERE client_org_id = ? AND user_id = ? AND model = ?"
            " AND usage_date = ?",
            [(*key, day) for key in gone],
        )
        deleted = cursor.rowcount  # the rows deleted, not the totals' triggers' writes
        await cursor.close()
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
    if await month_is_closed(conn, day[:7]):  # its statement is issued: adjust it
        await record_adjustments(
            conn,
            day,
            ((change.key[0], _usage(change.old), _usage(change.new)) for change in changes),
            "replay",
        )
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
            # an upsert: a summary DB restored from a backup taken before the replay
            # started has no row of it (the writer completes it from its result then)
            await conn.execute(
                "INSERT INTO replay_runs (replay_id, usage_date, status, started_at,"
                " finished_at) VALUES (?, ?, 'complete', ?, ?) ON CONFLICT (replay_id)"
                " DO UPDATE SET status = 'complete', finished_at = excluded.finished_at",
                (replay_id, day, started_at, utc_now_text()),
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
