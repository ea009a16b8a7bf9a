"""The summary-DB side of ``usage-stream replay``: the atomic replace of one date.

(The replay's deduplication and its per-key fold are tables/summary_db/replay_staging.py.)

:func:`replace_day`, in ONE ``BEGIN IMMEDIATE`` transaction on the summary DB: every
``usage_daily`` row of the date becomes the replay's totals (the rows that differ go
into a temporary table and ONE ``INSERT ... SELECT`` upserts them, see
:data:`_UPSERT_NEW`; rate from :func:`tables.reference.rate_for_date` looked up inside
the transaction; rows whose key has no event are deleted); the date's pending
increments and provisional rows are dropped (they came from batches before the replay's
fences, which the replay read itself: see agents/replay/run.py), the date is marked in
``closed_days``, a ``batch_runs`` row (kind ``replay``) is appended and the replay is
marked complete in ``replay_runs``, which lets the summary writer go on past its fences.

Each row is priced with the price book's multiplier in force on the date
(tables/summary_db/pricebook.py): rules apply forward only, so a replay of an old date keeps the
price it was billed at. When the date's month is closed (its statement issued), the
difference per client becomes an ``adjustments`` row with reason ``replay``
(tables/summary_db/statements.py), in the same transaction.

Only rows whose values differ are upserted: unchanged rows keep their ``revision`` and
``updated_at``, so replaying twice changes nothing. With ``dry_run`` the same work is
done and then rolled back: only the differences are returned.

:func:`streams.pricing.bill` is the one place where a validated event gets its usage
date and its cost (``cost_usd`` when present, else estimated from the model's latest
stored price); the worker and the replay share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import NamedTuple

import aiosqlite

from streams.model.money import NanoScaler, nano_to_float
from tables.summary_db.columns import VALUE_COLUMNS
from tables.summary_db.pricebook import load_pricebook
from tables.summary_db.reference import rate_for_date, record_batch_run
from tables.summary_db.schema import utc_now_text, write_transaction
from tables.summary_db.statements import Usage, month_is_closed, record_adjustments
from tables.summary_db.summary_store import (
    IF_CHANGED,
    INSERT_DAILY,
    Rate,
    SummaryRow,
    _markup_text,
    _scaler,
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


#: A stored row's content (``_DAILY_COLUMNS`` but revision and updated_at): what the
#: upsert stores and what "changed" compares.
_Content = tuple[
    int,  # input_tokens
    int,  # output_tokens
    int,  # total_tokens
    int,  # requests
    int,  # estimated_requests
    int,  # raw_cost_nano
    int,  # markup_cost_nano
    int | None,  # markup_cost_pln_nano
    float | None,  # raw_cost_usd
    float | None,  # markup_cost_usd
    float | None,  # markup_cost_pln
    str | None,  # usd_pln_rate
    str | None,  # nbp_table_no
    str,  # markup_multiplier
]
#: A stored row as :func:`_daily_rows` reads it: the values of a :class:`StoredRow`.
_Stored = tuple[
    int, int, int, int, int, int, int, int | None, float | None, float | None, float | None,
    str | None, str | None, str | None, int, str,
]  # fmt: skip
#: A row the replace writes (``_NEW_COLUMNS``): its key, sums, amounts and multiplier text.
_New = tuple[str, str, str, int, int, int, int, int, int, int | None, str]


class RowChange(NamedTuple):
    """A ``usage_daily`` row of the date that the replay adds, removes or changes."""

    kind: str  # "added", "removed", "changed"
    key: Key
    old: StoredRow | None
    new: StoredRow | None


@dataclass(frozen=True, slots=True)
class ReplayOutcome:
    usage_date: str
    #: the changes listed, by key: all of them, or the first ``list_changes`` of
    #: :func:`replace_day` (a real run shows 20; a dry run all)
    changes: list[RowChange]
    counts: dict[str, int]  # every change per kind ("added", "removed", "changed")
    rows: int  # usage_daily rows of the date after the replay
    summaries_written: int  # rows inserted or re-written (revision + 1) plus rows deleted
    clients: int
    rate: Rate | None
    committed: bool
    batch_run_id: int | None
    #: seconds per step of the transaction (for the operator's timing line and profiling)
    timings: dict[str, float] = field(default_factory=dict)

    def count(self, kind: str) -> int:
        return self.counts.get(kind, 0)

    @property
    def corrections(self) -> int:
        return sum(self.counts.values())


async def _daily_rows(conn: aiosqlite.Connection, day: str) -> dict[Key, _Stored]:
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
    before: Mapping[Key, _Stored],
    after: Mapping[Key, _Stored],
    candidates: Iterable[Key],
) -> list[RowChange]:
    """The changes among ``candidates`` (the only keys that may have changed), by key:
    the general comparison, for when the date had to be read back after the write."""
    make = StoredRow._make
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
    list_changes: int | None = None,
    before_commit: Awaitable[None] | None = None,
) -> ReplayOutcome:
    """Replace date ``day`` with ``totals`` (the staged events' sums, one row per key),
    atomically (module docstring). The outcome lists the first ``list_changes`` changes
    by key (None: all of them) and counts them all.

    ``before_commit`` (the replay publishing its result, agents/replay/run.py) runs
    while the transaction does its work and is awaited before the commit: an error in
    it rolls the replace back. Why not first: its Kafka round trips and encoding took
    the replay's main process ~0.3-0.5 s at 289k rows, and SQLite's work (on aiosqlite's
    thread, without the GIL) needs none of it.

    ``conn`` must be in autocommit mode (as :func:`tables.summary_db.schema.connect` opens it)
    with no transaction open. With ``dry_run`` nothing is written, not even ``batch_runs``.
    """
    alongside = None if before_commit is None else asyncio.ensure_future(before_commit)
    try:
        async with write_transaction(conn, rollback=dry_run):
            outcome = await _replace(
                conn,
                totals,
                day,
                markup,
                dry_run,
                started_at,
                records_processed,
                replay_id,
                list_changes,
            )
            lap = Lap(outcome.timings)
            if alongside is not None:
                await alongside
                lap("wait for the result")
    except asyncio.CancelledError:
        if alongside is not None:
            alongside.cancel()
        raise
    except BaseException:
        # the replace failed: let the result finish as it did when it went first (the
        # summary writer, held at the fences, may complete the replay from it)
        if alongside is not None and not alongside.done():
            with contextlib.suppress(Exception):
                await alongside
        raise
    lap("commit" if not dry_run else "rollback")
    return outcome


async def _complete(conn: aiosqlite.Connection, replay_id: str) -> bool:
    cursor = await conn.execute(
        "SELECT 1 FROM replay_runs WHERE replay_id = ? AND status = 'complete'", (replay_id,)
    )
    return await cursor.fetchone() is not None


# The rows that change, bound with only the values that are not derived from others or the
# same for every row of the date; the rest is computed in SQL (see _UPSERT_NEW).
_NEW_COLUMNS = (
    "client_org_id",
    "user_id",
    "model",
    "input_tokens",
    "output_tokens",
    "requests",
    "estimated_requests",
    "raw_cost_nano",
    "markup_cost_nano",
    "markup_cost_pln_nano",
    "markup_multiplier",
)
_NEW_TABLE = "temp.replay_new_rows"
# no declared types: every value is stored as bound (no affinity conversion)
_CREATE_NEW = f"CREATE TEMP TABLE replay_new_rows ({', '.join(_NEW_COLUMNS)})"
_INSERT_NEW = f"INSERT INTO {_NEW_TABLE} VALUES ({', '.join('?' * len(_NEW_COLUMNS))})"
#: ONE statement upserts every row that changes, in key order (neighbouring rows land on
#: the same B-tree pages). Why not ``executemany`` of the row's whole values, as before:
#: at 289k added rows (``bench/replace_time.py``, docs/performance.md) binding 19 values
#: per row and running the upsert (and the totals' triggers of schema migration 21) once
#: per statement took 4.7-5.1 s; 11 values per row into a temporary table and one
#: INSERT ... SELECT take 2.0 s. ``total_tokens`` and the REAL columns are derived here
#: (the REAL ones as :func:`streams.money.nano_to_float` does: below 2**53 a nano amount
#: is an exact double and ``x / 1e9`` is the correctly rounded quotient, as Python's
#: ``x / 10**9``), the rate, its table and ``updated_at`` are the same for every row.
_UPSERT_NEW = f"""{INSERT_DAILY}
SELECT client_org_id, user_id, model, :day, input_tokens, output_tokens,
    input_tokens + output_tokens, requests, estimated_requests, raw_cost_nano,
    markup_cost_nano, markup_cost_pln_nano, raw_cost_nano / 1e9, markup_cost_nano / 1e9,
    markup_cost_pln_nano / 1e9, :rate, :table_no, markup_multiplier, 1, :now
FROM {_NEW_TABLE} WHERE true ORDER BY client_org_id, user_id, model{IF_CHANGED}"""
_EXACT_IN_DOUBLE = 2**53
_MAX_INTEGER = 2**63 - 1


def _exact_in_sql(new_rows: Sequence[_New]) -> bool:
    """Whether :data:`_UPSERT_NEW` stores exactly what binding every value stores: every
    nano amount exact in a double (else ``x / 1e9`` rounds ``x`` first), and no
    ``input_tokens + output_tokens`` past SQLite's integers (it would become a REAL; a
    bound one is refused)."""
    for amounts in (
        [row[7] for row in new_rows],  # raw_cost_nano
        [row[8] for row in new_rows],  # markup_cost_nano
        [row[9] for row in new_rows if row[9] is not None],  # markup_cost_pln_nano
    ):
        if amounts and not (-_EXACT_IN_DOUBLE < min(amounts) and max(amounts) < _EXACT_IN_DOUBLE):
            return False
    return max(row[3] + row[4] for row in new_rows) <= _MAX_INTEGER


class _Pricing:
    """Per row: its markup in nano-USD, its PLN amount and the multiplier's text, with the
    price book's multiplier of its (client, model) looked up once per pair."""

    def __init__(self, markups: Callable[[str, str], Decimal], rate: Rate | None) -> None:
        self.markups = markups
        self.pln = _scaler(rate.mid) if rate is not None else None
        self.rate_text = str(rate.mid) if rate is not None else None
        self.table_no = rate.table_no if rate is not None else None
        self._pairs: dict[tuple[str, str], tuple[NanoScaler, str]] = {}

    def of(self, client: str, model: str) -> tuple[NanoScaler, str]:
        found = self._pairs.get((client, model))
        if found is None:
            factor = self.markups(client, model)
            found = self._pairs[(client, model)] = (_scaler(factor), _markup_text(factor))
        return found

    def content(self, new: _New) -> _Content:
        """The stored content (``_DAILY_COLUMNS`` but revision and updated_at) of a new
        row (``_NEW_COLUMNS``): what the upsert stores."""
        _, _, _, inp, out, requests, guesses, raw, markup, pln, text = new
        return (
            inp,
            out,
            inp + out,
            requests,
            guesses,
            raw,
            markup,
            pln,
            nano_to_float(raw),
            nano_to_float(markup),
            nano_to_float(pln),
            self.rate_text,
            self.table_no,
            text,
        )


def _new_usage(new: _New) -> Usage:
    _, _, _, inp, out, requests, guesses, raw, markup, pln, _ = new
    return Usage(requests, guesses, inp, out, inp + out, raw, markup, pln)


def _old_usage(old: _Stored) -> Usage:
    return Usage(old[3], old[4], old[0], old[1], old[2], old[5], old[6], old[7])


async def _replace(
    conn: aiosqlite.Connection,
    totals: Sequence[SummaryRow],
    day: str,
    markup: Decimal,
    dry_run: bool,
    started_at: str,
    records_processed: int,
    replay_id: str | None,
    list_changes: int | None,
) -> ReplayOutcome:
    timings: dict[str, float] = {}
    lap = Lap(timings)
    if replay_id is not None and await _complete(conn, replay_id):
        # completed already (by the summary writer from the replay's published result,
        # or by this replay on an earlier try): replacing again would change nothing
        return ReplayOutcome(day, [], {}, 0, 0, 0, None, False, None, timings)
    rate = await rate_for_date(conn, date.fromisoformat(day))
    pricing = _Pricing((await load_pricebook(conn, markup)).for_day(day), rate)
    before = await _daily_rows(conn, day)
    lap("usage_daily before")
    now = utc_now_text()
    # the rows that change (_NEW_COLUMNS): new keys, and keys whose row differs
    added: list[_New] = []
    changed: list[_New] = []
    matched = 0  # keys of the totals that were there before
    pairs, pln = pricing.of, pricing.pln
    for row in totals:
        client, user, model, _, inp, out, requests, guesses, raw = row
        scale, text = pairs(client, model)
        marked = scale(raw)
        new: _New = (
            client,
            user,
            model,
            inp,
            out,
            requests,
            guesses,
            raw,
            marked,
            pln(marked) if pln is not None else None,
            text,
        )
        if before:
            old = before.get((client, user, model))
            if old is not None:
                matched += 1
                if old[:_CONTENT] != pricing.content(new):
                    changed.append(new)
                continue  # (unchanged: keeps its revision and updated_at)
        added.append(new)
    new_rows = added + changed
    lap("compare")
    written = await _upsert(conn, new_rows, day, pricing, now)
    lap("write_summaries")
    gone: list[Key] = []
    if matched < len(before):
        kept = {(row[0], row[1], row[2]) for row in totals}
        gone = sorted(key for key in before if key not in kept)
    deleted = 0
    if gone:
        cursor = await conn.executemany(
            "DELETE FROM usage_daily WHERE client_org_id = ? AND user_id = ? AND model = ?"
            " AND usage_date = ?",
            [(*key, day) for key in gone],
        )
        deleted = cursor.rowcount  # the rows deleted, not the totals' triggers' writes
        await cursor.close()

    # the date is settled: nothing pending, closed (later events of it count as late)
    await conn.execute("DELETE FROM daily_pending WHERE usage_date = ?", (day,))
    await conn.execute("DELETE FROM usage_daily_open WHERE usage_date = ?", (day,))
    await conn.execute(
        "INSERT OR IGNORE INTO closed_days VALUES (?, ?, ?)", (day, utc_now_text(), _CLOSED_BY)
    )
    month_closed = await month_is_closed(conn, day[:7])
    if written == len(new_rows) and deleted == len(gone):
        counts = {"added": len(added), "removed": len(gone), "changed": len(changed)}
        rows = len(before) + counts["added"] - counts["removed"]
        listed = _listed(before, new_rows, gone, pricing, now, list_changes)
        usages = (
            (
                *((new[0], None, _new_usage(new)) for new in added),
                *((new[0], _old_usage(before[new[:3]]), _new_usage(new)) for new in changed),
                *((key[0], _old_usage(before[key]), None) for key in gone),
            )
            if month_closed
            else ()
        )
    else:  # not expected: read the date back and compare it whole
        log.warning(
            "replace of %s: %d of %d rows upserted, %d of %d deleted; reading the date back",
            day,
            written,
            len(new_rows),
            deleted,
            len(gone),
        )
        after = await _daily_rows(conn, day)
        every = _diff(before, after, {*before, *after})
        counts = {kind: sum(1 for c in every if c.kind == kind) for kind in _KINDS}
        rows = len(after)
        listed = every if list_changes is None else every[:list_changes]
        usages = tuple((c.key[0], _usage(c.old), _usage(c.new)) for c in every)
    written += deleted
    if month_closed:  # its statement is issued: adjust it
        await record_adjustments(conn, day, usages, "replay")
    lap("settle and diff")
    corrections = sum(counts.values())
    clients = len({row[0] for row in totals})
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
            data_corrections=corrections,
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
        changes=listed,
        counts=counts,
        rows=rows,
        summaries_written=written,
        clients=clients,
        rate=rate,
        committed=not dry_run,
        batch_run_id=run_id,
        timings=timings,
    )


_KINDS = ("added", "removed", "changed")


async def _upsert(
    conn: aiosqlite.Connection,
    new_rows: Sequence[_New],
    day: str,
    pricing: _Pricing,
    now: str,
) -> int:
    """Upsert the rows that change (``_NEW_COLUMNS``); returns the rows inserted or
    re-written (the statement's own, not what the totals' triggers write)."""
    if not new_rows:
        return 0
    if not _exact_in_sql(new_rows):  # absurd amounts: every value bound, as computed here
        content = pricing.content
        values = [(*new[:3], day, *content(new), now) for new in new_rows]
        return await upsert_summary_values(conn, values, row_by_row=True)
    await conn.execute(f"DROP TABLE IF EXISTS {_NEW_TABLE}")
    await conn.execute(_CREATE_NEW)
    await conn.executemany(_INSERT_NEW, new_rows)
    cursor = await conn.execute(
        _UPSERT_NEW,
        {"day": day, "rate": pricing.rate_text, "table_no": pricing.table_no, "now": now},
    )
    written = cursor.rowcount
    await cursor.close()
    await conn.execute(f"DROP TABLE {_NEW_TABLE}")
    return written


def _listed(
    before: Mapping[Key, _Stored],
    new_rows: Sequence[_New],
    gone: Sequence[Key],
    pricing: _Pricing,
    now: str,
    limit: int | None,
) -> list[RowChange]:
    """The first ``limit`` changes by key (None: all), as :class:`RowChange` objects: a
    real run shows 20 of a whole added date's 289k, so only those are built."""
    if limit is None:
        first_new = sorted(new_rows)
        first_gone = list(gone)
    else:  # keys are unique, so comparing tuples compares keys
        first_new = heapq.nsmallest(limit, new_rows)
        first_gone = list(gone[:limit])
    make = StoredRow._make
    changes = []
    for new in first_new:
        key = new[:3]
        old = before.get(key)
        old_row = None if old is None else make(old)
        revision = 1 if old_row is None else old_row.revision + 1
        row = make((*pricing.content(new), revision, now))
        if old_row is None:
            changes.append(RowChange("added", key, None, row))
        else:
            changes.append(RowChange("changed", key, old_row, row))
    if first_gone:
        changes += [RowChange("removed", key, make(before[key]), None) for key in first_gone]
        changes.sort(key=lambda change: change.key)
    return changes if limit is None else changes[:limit]
