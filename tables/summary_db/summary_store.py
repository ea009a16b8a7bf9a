"""The SQLite summary store: daily totals from folded increments, closed and provisional.

The summary writer folds the exact increments of every valid batch-log entry into
``daily_pending`` once, in the transaction that stores its partition's chain head
(:mod:`tables.summary_db.batch_apply`). Closing a day moves them into ``usage_daily``: each
row's new totals are its stored totals plus the pending increments, markup and PLN recomputed from
the totals (per row, half-even), and the pending rows deleted, in one ``BEGIN IMMEDIATE``
transaction. A batch-log record read again is below the stored next offset and skipped,
and a rollup pass applied twice finds nothing pending, so nothing counts twice; the cost
of closing a day is its number of summary keys, not its events. The keys are read and
written in chunks of :data:`CHUNK_KEYS` inside that one transaction, so the memory a
close needs is bounded by the chunk, not by the day's number of keys.

Markup is the price book's (tables/summary_db/pricebook.py): each row's multiplier for its date,
client and model, recorded in ``markup_multiplier``. A merge into a month whose statement
is issued records the difference in ``adjustments`` (tables/summary_db/statements.py).

Open days have provisional rows in ``usage_daily_open`` (rewritten at every pass), which
the view ``usage_daily_live`` shows beside ``usage_daily``.
"""

from __future__ import annotations

import functools
import socket
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import NamedTuple, Protocol

import aiosqlite
import orjson

from streams.model.money import NanoScaler, nano_to_float
from tables.summary_db.columns import VALUE_COLUMNS, SummaryValues
from tables.summary_db.pricebook import load_pricebook, multiplier_text
from tables.summary_db.schema import json_for_sqlite, utc_now_text, write_transaction
from tables.summary_db.statements import AdjustmentDeltas, Usage, month_is_closed, usage_of_values

__all__ = [
    "CHUNK_KEYS",
    "IF_CHANGED",
    "INSERT_DAILY",
    "DayRollup",
    "Rate",
    "SummaryRow",
    "closed_days",
    "pending_dates",
    "refresh_open_days",
    "rollup_day",
    "summary_values",
    "upsert_summary_values",
    "write_summaries",
]

_WORKER = f"{socket.gethostname()}"
_IN_CHUNK = 900  # bound parameters per IN (...) query
#: Summary keys per step of :func:`rollup_day` and :func:`refresh_open_days`. Why this
#: size: a step's keys are all in Python at once (the rows read, their
#: :class:`SummaryRow`, 19 values each, the JSON payload), ~3 kB a key at the peak, so
#: closing a date of 289k keys peaks at +65 MB with 20,000 (+36 MB with 10,000, +153 MB
#: with 50,000), where the whole date at once took +507 MB (bench/rollup_memory.py,
#: docs/performance.md); and the steps' own cost (two statements each) is lost against
#: their rows: 5,000 to 50,000 took the same ~6.2-6.6 s as the whole date.
CHUNK_KEYS = 20_000


class Rate(Protocol):
    """An applicable NBP rate (``tables.summary_db.reference.AppliedRate``)."""

    @property
    def mid(self) -> Decimal: ...
    @property
    def table_no(self) -> str: ...


class SummaryRow(NamedTuple):
    """One ``usage_daily`` row's exact totals, before markup and conversion. A tuple: a
    rollup or a replay builds one per key of a day, and a frozen dataclass costs several
    times more to build."""

    client_org_id: str
    user_id: str
    model: str
    usage_date: str
    input_tokens: int
    output_tokens: int
    requests: int
    estimated_requests: int
    raw_cost_nano: int

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.client_org_id, self.user_id, self.model, self.usage_date)

    def plus(self, other: SummaryRow) -> SummaryRow:
        return self._replace(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            requests=self.requests + other.requests,
            estimated_requests=self.estimated_requests + other.estimated_requests,
            raw_cost_nano=self.raw_cost_nano + other.raw_cost_nano,
        )


@dataclass(frozen=True, slots=True)
class DayRollup:
    usage_date: str
    records: int  # requests moved from pending into usage_daily
    summaries_written: int
    clients: int
    late_rewrite: bool
    late_events: int


def _chunks(items: Sequence[str], size: int = _IN_CHUNK) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def _existing(conn: aiosqlite.Connection, sql: str, values: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for chunk in _chunks(values):
        marks = ",".join("?" * len(chunk))
        async with conn.execute(sql.format(marks=marks), chunk) as cursor:
            found.update(row[0] for row in await cursor.fetchall())
    return found


async def pending_dates(conn: aiosqlite.Connection) -> list[str]:
    async with conn.execute("SELECT DISTINCT usage_date FROM daily_pending ORDER BY 1") as cur:
        return [row[0] for row in await cur.fetchall()]


async def closed_days(conn: aiosqlite.Connection, dates: Sequence[str]) -> set[str]:
    return await _existing(
        conn, "SELECT usage_date FROM closed_days WHERE usage_date IN ({marks})", list(dates)
    )


#: The keys of one date's pending rows, in key order: what :func:`_day_chunks` pages
#: through. A TEMP table (spilled to a temporary file past the page cache, not held in
#: memory), because ``daily_pending`` is ordered by ``key_id``: paging it in that order
#: would scatter every chunk's writes over all of ``usage_daily``'s B-tree, where key
#: order writes each page once, as the unchunked rollup did.
_DAY_KEYS_TABLE = """
    CREATE TEMP TABLE IF NOT EXISTS day_keys (
        client_org_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        model TEXT NOT NULL,
        key_id INTEGER NOT NULL,
        PRIMARY KEY (client_org_id, user_id, model)
    ) WITHOUT ROWID
"""
_FILL_DAY_KEYS = """
    INSERT INTO temp.day_keys
    SELECT k.client_org_id, k.user_id, k.model, k.key_id
    FROM daily_pending p JOIN summary_keys k USING (key_id)
    WHERE p.usage_date = :day{dirty}
    ORDER BY 1, 2, 3
"""
_PENDING_COLUMNS = """r.client_org_id, r.user_id, r.model, p.usage_date, p.input_tokens,
    p.output_tokens, p.requests, p.estimated_requests, p.raw_cost_nano"""
#: A chunk of an open date: the pending rows (:class:`SummaryRow` order).
_OPEN_CHUNK_SQL = f"""
    SELECT {_PENDING_COLUMNS}
    FROM temp.day_keys r JOIN daily_pending p ON p.usage_date = :day AND p.key_id = r.key_id
"""
#: A chunk of a date being closed: the pending rows (:class:`SummaryRow` order), whether
#: ``usage_daily`` has the row already, and its stored sums (:class:`Usage` order).
_ROLLUP_CHUNK_SQL = f"""
    SELECT {_PENDING_COLUMNS}, d.usage_date IS NOT NULL, d.requests, d.estimated_requests,
        d.input_tokens, d.output_tokens, d.total_tokens, d.raw_cost_nano,
        d.markup_cost_nano, d.markup_cost_pln_nano
    FROM temp.day_keys r JOIN daily_pending p ON p.usage_date = :day AND p.key_id = r.key_id
    LEFT JOIN usage_daily d ON d.client_org_id = r.client_org_id AND d.user_id = r.user_id
        AND d.model = r.model AND d.usage_date = :day
"""
_AFTER = " WHERE (r.client_org_id, r.user_id, r.model) > (:client, :user, :model)"
_PAGE = " ORDER BY r.client_org_id, r.user_id, r.model LIMIT :keys"


async def _day_chunks(
    conn: aiosqlite.Connection, day: str, chunk_sql: str, *, dirty_only: bool = False
) -> AsyncIterator[list[sqlite3.Row]]:
    """The date's pending rows (only those with ``live_dirty`` set, if ``dirty_only``) as
    ``chunk_sql`` reads them, at most :data:`CHUNK_KEYS` at a time, in key order, inside
    the caller's transaction.

    Why chunks: a date can have hundreds of thousands of keys, and every key's rows and
    values in Python at once cost ~3 kB each (bench/rollup_memory.py). Keyset pagination
    (after the last key of the previous chunk) on :data:`_DAY_KEYS_TABLE`, so each chunk
    costs its own keys, and the caller writes each chunk before the next is read: the
    chunks are disjoint, so what a chunk reads of ``usage_daily`` is still as it was
    before the transaction.
    """
    await conn.execute(_DAY_KEYS_TABLE)
    await conn.execute("DELETE FROM temp.day_keys")
    dirty = " AND p.live_dirty = 1" if dirty_only else ""
    await conn.execute(_FILL_DAY_KEYS.format(dirty=dirty), {"day": day})
    params: dict[str, object] = {"day": day, "keys": CHUNK_KEYS}
    sql = chunk_sql + _PAGE
    while True:
        async with conn.execute(sql, params) as cursor:
            chunk = list(await cursor.fetchall())
        if chunk:
            yield chunk
        if len(chunk) < CHUNK_KEYS:
            break
        params.update(zip(("client", "user", "model"), chunk[-1][:3], strict=True))
        sql = chunk_sql + _AFTER + _PAGE
    await conn.execute("DELETE FROM temp.day_keys")


async def _late_events(conn: aiosqlite.Connection, day: str) -> int:
    async with conn.execute(
        "SELECT COALESCE(SUM(late_events), 0) FROM daily_pending WHERE usage_date = ?", (day,)
    ) as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


#: The head of every ``usage_daily`` upsert: all its columns, in table order.
INSERT_DAILY = f"""
INSERT INTO usage_daily (
    client_org_id, user_id, model, usage_date, {", ".join(VALUE_COLUMNS)}, revision, updated_at
)"""
#: The tail of every ``usage_daily`` upsert (the rollup's and the replay's): a row whose
#: values all equal the stored ones is left alone, one that differs is rewritten with
#: ``revision`` + 1. Why one rule: a revision counts real changes of a bill, whoever
#: writes the row, and a consumer re-reads the rows whose revision moved.
IF_CHANGED = f"""
ON CONFLICT (client_org_id, user_id, model, usage_date) DO UPDATE SET
    {", ".join(f"{c} = excluded.{c}" for c in VALUE_COLUMNS)},
    revision = usage_daily.revision + 1,
    updated_at = excluded.updated_at
WHERE {" OR ".join(f"usage_daily.{c} IS NOT excluded.{c}" for c in VALUE_COLUMNS)}
"""
_UPSERT = f"{INSERT_DAILY} VALUES (?,?,?,?,{','.join('?' * len(VALUE_COLUMNS))},1,?){IF_CHANGED}"


def _json_rows(revision: int) -> str:
    """``usage_daily`` columns in table order from :func:`_as_json`'s rows, the REAL ones
    derived from the nano ones as :func:`streams.model.money.nano_to_float` does."""
    return f"""SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5,
    value->>6, value->>7, value->>8, value->>9, value->>10, value->>11,
    (value->>9) / 1e9, (value->>10) / 1e9, (value->>11) / 1e9,
    value->>12, value->>13, value->>14, {revision}, value->>15
FROM json_each(?)"""


#: The same upsert for a whole group of rows in ONE statement (rows as JSON, REAL columns
#: derived from the nano ones as :func:`streams.model.money.nano_to_float` does). Why: an
#: ``executemany`` binds each row in Python, taking the GIL once per row, and the rollup
#: runs on aiosqlite's thread beside the CPU-bound hot path: 40k rows took 0.62 s alone
#: and 58 s beside a busy Python thread here; in the worker a closed day's rollup held
#: SQLite's write lock for 6-9 s and stalled the summary writer. One statement releases
#: the GIL for its whole run.
_UPSERT_JSON = f"{INSERT_DAILY}\n{_json_rows(revision=1)} WHERE true{IF_CHANGED}"
_EXACT_IN_DOUBLE = 2**53
_OPEN_COLUMNS = f"client_org_id, user_id, model, usage_date, {', '.join(VALUE_COLUMNS)}"
_OPEN_UPSERT = (
    f"INSERT OR REPLACE INTO usage_daily_open ({_OPEN_COLUMNS}, revision, updated_at)"
    f" VALUES (?,?,?,?,{','.join('?' * len(VALUE_COLUMNS))},0,?)"
)
_OPEN_UPSERT_JSON = f"""
INSERT OR REPLACE INTO usage_daily_open ({_OPEN_COLUMNS}, revision, updated_at)
{_json_rows(revision=0)}
"""


@functools.lru_cache(maxsize=256)
def _scaler(factor: Decimal) -> NanoScaler:
    """:func:`streams.model.money.scale_nano` by a fixed factor, without a Decimal per row."""
    return NanoScaler(factor)


@functools.lru_cache(maxsize=256)
def _markup_text(factor: Decimal) -> str:
    return multiplier_text(factor)


#: The multiplier of each row: one for all (a Decimal), or the price book's for the
#: row's date (:class:`tables.summary_db.pricebook.DayMarkups`, called with client and model).
Markups = Decimal | Callable[[str, str], Decimal]


def _markup_of(markups: Markups) -> Callable[[str, str], Decimal]:
    if isinstance(markups, Decimal):
        return lambda client, model: markups
    return markups


def _summary_values(
    row: SummaryRow, markup: Decimal, rate: Rate | None, updated_at: str
) -> SummaryValues:
    """The ``usage_daily`` values of one row (key, then ``VALUE_COLUMNS`` order, then
    ``updated_at``): markup and PLN applied per row, half-even; ``markup`` is the row's
    multiplier, recorded in ``markup_multiplier``."""
    markup_nano = _scaler(markup)(row.raw_cost_nano)
    pln_nano = _scaler(rate.mid)(markup_nano) if rate is not None else None
    return (
        row.client_org_id,
        row.user_id,
        row.model,
        row.usage_date,
        row.input_tokens,
        row.output_tokens,
        row.input_tokens + row.output_tokens,
        row.requests,
        row.estimated_requests,
        row.raw_cost_nano,
        markup_nano,
        pln_nano,
        nano_to_float(row.raw_cost_nano),
        nano_to_float(markup_nano),
        nano_to_float(pln_nano),
        str(rate.mid) if rate is not None else None,
        rate.table_no if rate is not None else None,
        _markup_text(markup),
        updated_at,
    )


def summary_values(
    rows: Sequence[SummaryRow], markups: Markups, rate: Rate | None, updated_at: str
) -> list[SummaryValues]:
    """:func:`_summary_values` of every row, each with its own multiplier."""
    markup = _markup_of(markups)
    return [
        _summary_values(row, markup(row.client_org_id, row.model), rate, updated_at) for row in rows
    ]


async def write_summaries(
    conn: aiosqlite.Connection,
    rows: Sequence[SummaryRow],
    markups: Markups,
    rate: Rate | None,
) -> int:
    """Upsert rows inside the caller's transaction; returns rows inserted or changed.

    Unchanged rows are left alone (same ``revision``), so re-running a rollup or a replay
    over the same events changes nothing.
    """
    values = summary_values(rows, markups, rate, utc_now_text())
    return await upsert_summary_values(conn, values)


async def upsert_summary_values(
    conn: aiosqlite.Connection, values: Sequence[SummaryValues], *, row_by_row: bool = False
) -> int:
    """Upsert rows already turned into ``usage_daily`` values (:func:`_summary_values`)
    inside the caller's transaction; returns rows inserted or changed.

    ``row_by_row`` binds the rows one by one (``executemany``) instead of as one JSON
    statement. Why both: binding takes the GIL once per row, so beside a busy Python
    thread (the worker's hot path) only the one statement is usable; with no other thread
    busy (the replay's replace) binding is faster, because ``value->>N`` re-parses each
    row's JSON text per column: 78k rows took 1.0 s as JSON and 0.4 s bound, here.
    """
    if not values:
        return 0
    # in key order: neighbouring rows land on the same B-tree pages (78k rows into a
    # date's 236k: 1.23 -> 0.70 s bound, 2.79 -> 1.80 s as JSON, here)
    values = sorted(values, key=_row_key)
    payload = None if row_by_row else _as_json(values)
    if payload is None:
        cursor = await conn.executemany(_UPSERT, values)
    else:
        cursor = await conn.execute(_UPSERT_JSON, (payload,))
    # the statement's own rows (sqlite3_changes), not total_changes: that also counts
    # what the totals' triggers write (schema migration 21)
    changed = cursor.rowcount
    await cursor.close()
    return changed


def _row_key(values: SummaryValues) -> tuple[str, str, str, str]:
    return values[:4]


def _as_json(values: Sequence[SummaryValues]) -> str | None:
    """The rows for :data:`_UPSERT_JSON` (the REAL columns left out: SQLite derives them),
    or None when only bound values are exact: an escaped NUL (SQLite's JSON functions
    would cut the text) or a nano amount of 2**53 or more (SQLite's ``x / 1e9`` rounds
    ``x`` first; below that it equals Python's correctly rounded ``x / 10**9``)."""
    rows = []
    for row in values:
        nanos = row[9:12]
        if any(n is not None and not -_EXACT_IN_DOUBLE < n < _EXACT_IN_DOUBLE for n in nanos):
            return None
        rows.append(row[:12] + row[15:])
    return json_for_sqlite(orjson.dumps(rows))


RateLookup = Callable[[aiosqlite.Connection, date], Awaitable[Rate | None]]


class _Merge(NamedTuple):
    """One key of a date being closed."""

    pending: SummaryRow  # the increments
    total: SummaryRow  # the row's new totals: stored plus pending
    before: Usage | None  # the stored sums (None: no row yet); an adjustment's "before"


def _merged(row: sqlite3.Row) -> _Merge:
    """A :data:`_ROLLUP_CHUNK_SQL` row as a :class:`_Merge`."""
    pending = SummaryRow(*row[:9])
    if not row[9]:
        return _Merge(pending, pending, None)
    before = Usage(*row[10:18])
    stored = SummaryRow(
        pending.client_org_id,
        pending.user_id,
        pending.model,
        pending.usage_date,
        before.input_tokens,
        before.output_tokens,
        before.requests,
        before.estimated_requests,
        before.raw_cost_nano,
    )
    return _Merge(pending, stored.plus(pending), before)


async def rollup_day(
    conn: aiosqlite.Connection,
    usage_date: date | str,
    markup: Decimal,
    rate_lookup: RateLookup,
) -> DayRollup:
    """Move one date's pending increments into ``usage_daily``, in one transaction.

    The rate is looked up inside the transaction, so a concurrent PLN fill by the refresh
    is never overwritten with a stale "no rate yet". Each row is priced with the price
    book's multiplier for its date, client and model (``markup``: the default one). Marks
    the date closed (so later events for it count as late) and deletes its pending rows.
    A merge into a month whose statement is closed records the difference per client in
    ``adjustments`` (reason ``late_events``; tables/summary_db/statements.py).

    The date's keys are taken in chunks (:func:`_day_chunks`), all in the one
    transaction, so a crash anywhere leaves the date as it was.
    """
    day = usage_date if isinstance(usage_date, str) else usage_date.isoformat()
    async with write_transaction(conn):
        rate = await rate_lookup(conn, date.fromisoformat(day))
        markups = (await load_pricebook(conn, markup)).for_day(day)
        was_closed = bool(await closed_days(conn, [day]))
        late = await _late_events(conn, day)
        adjustments = AdjustmentDeltas() if await month_is_closed(conn, day[:7]) else None
        now = utc_now_text()
        records = written = clients = 0
        last_client: str | None = None
        async for chunk in _day_chunks(conn, day, _ROLLUP_CHUNK_SQL):
            merged = [_merged(row) for row in chunk]
            values = summary_values([m.total for m in merged], markups, rate, now)
            if adjustments is not None:
                adjustments.add(
                    (str(v[0]), m.before, usage_of_values(v))
                    for m, v in zip(merged, values, strict=True)
                )
            written += await upsert_summary_values(conn, values)
            for m in merged:
                records += m.pending.requests
                client = m.pending.client_org_id
                if client != last_client:  # in key order, a client's keys come together
                    clients += 1
                    last_client = client
        if adjustments is not None:
            await adjustments.write(conn, day, "late_events")
        await conn.execute("DELETE FROM daily_pending WHERE usage_date = ?", (day,))
        await conn.execute("DELETE FROM usage_daily_open WHERE usage_date = ?", (day,))
        await conn.execute(
            "INSERT OR IGNORE INTO closed_days VALUES (?, ?, ?)", (day, utc_now_text(), _WORKER)
        )
    return DayRollup(
        usage_date=day,
        records=records,
        summaries_written=written,
        clients=clients,
        late_rewrite=was_closed,
        late_events=late,
    )


async def refresh_open_days(
    conn: aiosqlite.Connection,
    open_dates: Sequence[str],
    markup: Decimal,
    rate_lookup: RateLookup,
) -> int:
    """Bring the provisional rows of the open dates (``usage_daily_live``, final = 0) up
    to their pending totals, with the same money rules as a closed day (the price book's
    multipliers; ``markup`` is the default one). Only keys whose totals changed since the
    last pass are rewritten (``live_dirty``; a new price-book rule marks the dates it
    covers), so a pass costs what arrived since the previous one, not the size of the
    day; and like :func:`rollup_day` it takes a date's keys in chunks (:func:`_day_chunks`),
    so a date whose every key is dirty (its rate arrived) does not need them all at once."""
    written = 0
    async with write_transaction(conn):
        now = utc_now_text()
        book = await load_pricebook(conn, markup) if open_dates else None
        for day in open_dates:
            rate = await rate_lookup(conn, date.fromisoformat(day))
            async with conn.execute(
                "SELECT 1 FROM usage_daily_open WHERE usage_date = ? AND usd_pln_rate IS NOT ?"
                " LIMIT 1",
                (day, str(rate.mid) if rate is not None else None),
            ) as cursor:
                if await cursor.fetchone() is not None:  # the day's rate arrived: all rows
                    await conn.execute(
                        "UPDATE daily_pending SET live_dirty = 1 WHERE usage_date = ?", (day,)
                    )
            assert book is not None
            markups = book.for_day(day)
            day_written = 0
            async for chunk in _day_chunks(conn, day, _OPEN_CHUNK_SQL, dirty_only=True):
                values = summary_values([SummaryRow(*row) for row in chunk], markups, rate, now)
                payload = _as_json(values)
                if payload is None:
                    await conn.executemany(_OPEN_UPSERT, values)
                else:  # one statement, like write_summaries (see _UPSERT_JSON)
                    await conn.execute(_OPEN_UPSERT_JSON, (payload,))
                day_written += len(values)
            if not day_written:
                continue
            await conn.execute(
                "UPDATE daily_pending SET live_dirty = 0 WHERE usage_date = ? AND live_dirty = 1",
                (day,),
            )
            written += day_written
    return written
