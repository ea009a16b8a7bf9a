"""The replay's replace (tables/summary_db/replay_store.py) against the per-row semantics it
replaced, on real SQLite with the real migrations.

Two references: the money rules written out (every row of the date is what
:func:`tables.summary_store._summary_values` gives its totals: the price book's
multiplier, the date's rate, REAL columns to the bit; unchanged rows keep their
``revision`` and ``updated_at``, changed ones get revision + 1, rows without totals are
deleted, other dates are untouched, the changes are listed by key and counted, the
per-client totals of migration 21's triggers stay exact, a closed month gets the
per-client adjustments), and the previous implementation itself, re-stated here
(:func:`_per_row_replace`: ``_summary_values`` per row, the differing ones upserted with
every value bound), whose tables the new replace must reproduce exactly. Amounts past
2**53 take the path that binds every value; NULs and non-ASCII text in keys are bound
like any value."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tables.summary_db.replay_store as replay_store
from tables.summary_db.columns import SUMMED_COLUMNS as DELTA_COLUMNS
from tables.summary_db.pricebook import MarkupRule, Pricebook, load_pricebook
from tables.summary_db.replay_store import ReplayOutcome, replace_day
from tables.summary_db.schema import connect, write_transaction
from tables.summary_db.statements import Usage, month_is_closed, record_adjustments
from tables.summary_db.summary_store import (
    VALUE_COLUMNS,
    SummaryRow,
    _summary_values,
    summary_values,
    upsert_summary_values,
    write_summaries,
)

DAY, OTHER_DAY = "2026-11-28", "2026-11-27"
DEFAULT = Decimal("1.3")
#: the replace's ``updated_at``, fixed so two runs can be compared to the byte
NOW = "2026-12-01T00:00:00.000000Z"


class _Rate(NamedTuple):
    mid: Decimal
    table_no: str


RATES = st.sampled_from(
    [None, _Rate(Decimal("4.0123"), "230/A/NBP/2026"), _Rate(Decimal("3.9"), "231/A/NBP/2026")]
)
KEYS = st.tuples(
    st.sampled_from(["org-a", "org-b", "o\x00rg"]),
    st.sampled_from(["u1", "u2", "żółw"]),
    st.sampled_from(["m1", "m2"]),
)
SUMS = st.tuples(
    st.integers(0, 10**12),
    st.integers(0, 10**12),
    st.integers(1, 10**6),
    st.integers(0, 10),
    st.one_of(st.integers(0, 10**15), st.integers(2**53 - 10, 2**53 + 10**9)),
)
ROWS = st.dictionaries(KEYS, SUMS, max_size=14)
#: (client, model, multiplier) rules in force on the date (None: every client / model)
RULES = st.lists(
    st.tuples(
        st.sampled_from([None, "org-a"]),
        st.sampled_from([None, "m2"]),
        st.sampled_from([Decimal("1.5"), Decimal("2"), Decimal("0.75")]),
    ),
    max_size=3,
)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated summary DB, copied for each example (migrating costs more than a run)."""
    path = tmp_path_factory.mktemp("template") / "usage.db"

    async def migrated() -> None:
        await (await connect(path)).close()

    asyncio.run(migrated())
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


def _copy(template: Path, directory: Path, name: str = "usage.db") -> Path:
    path = directory / name
    shutil.copyfile(template, path)
    return path


def _rows(day: str, sums: dict) -> list[SummaryRow]:
    return [SummaryRow(*key, day, *values) for key, values in sums.items()]


def _table(path: Path, sql: str) -> list[tuple]:
    """The rows of ``sql``, floats as their exact hex (a REAL must match to the bit)."""
    with sqlite3.connect(path) as conn:
        return [
            tuple(value.hex() if isinstance(value, float) else value for value in row)
            for row in conn.execute(sql)
        ]


_DAILY = f"SELECT client_org_id, user_id, model, usage_date, {', '.join(VALUE_COLUMNS)},"
_DAILY += " revision, updated_at FROM usage_daily ORDER BY 1, 2, 3, 4"
_ADJUSTMENTS = (
    f"SELECT client_org_id, usage_date, statement_month, {', '.join(DELTA_COLUMNS)}, reason"
    " FROM adjustments ORDER BY 1, 2"
)


def _billing(path: Path) -> dict[str, list[tuple]]:
    """What the replace bills: the date's rows, the triggers' per-client totals, the
    adjustments (without their ids and creation times)."""
    return {
        "usage_daily": _table(path, _DAILY),
        "usage_client_daily": _table(path, "SELECT * FROM usage_client_daily ORDER BY 1, 2"),
        "adjustments": _table(path, _ADJUSTMENTS),
    }


def _everything(path: Path) -> dict[str, list[tuple]]:
    """Every row of every table (a dry run must leave all of them as they were)."""
    with sqlite3.connect(path) as conn:
        names = [
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
                " AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
    return {name: sorted(_table(path, f'SELECT * FROM "{name}"'), key=repr) for name in names}


async def _setup(
    path: Path,
    before: dict,
    other: dict,
    rules: list,
    rate_before: _Rate | None,
    rate: _Rate | None,
    month_closed: bool,
) -> None:
    """The DB before the replay: the date's rows priced with the default multiplier and
    ``rate_before``, another date's rows, the price book's ``rules``, maybe a closed month."""
    conn = await connect(path)
    try:
        async with write_transaction(conn):
            for number, (client, model, factor) in enumerate(rules):
                await conn.execute(
                    "INSERT INTO markup_rules (client_org_id, model, multiplier, effective_from,"
                    " created_at, note) VALUES (?, ?, ?, ?, 't', NULL)",
                    (client, model, str(factor), f"2026-11-{number + 1:02d}"),
                )
            book = Pricebook([], DEFAULT)  # what the rows were written with before
            await write_summaries(conn, _rows(DAY, before), book.for_day(DAY), rate_before)
            await write_summaries(conn, _rows(OTHER_DAY, other), book.for_day(DAY), rate)
            if month_closed:
                await conn.execute("INSERT INTO closed_months VALUES ('2026-11', 't')")
    finally:
        await conn.close()


@contextmanager
def _fixed(rate: _Rate | None) -> Iterator[None]:
    """The replace with the date's rate ``rate`` and ``updated_at`` :data:`NOW`."""

    async def fixed_rate(_conn: object, _day: object) -> _Rate | None:
        return rate

    originals = replay_store.rate_for_date, replay_store.utc_now_text
    replay_store.rate_for_date = fixed_rate  # type: ignore[assignment]
    replay_store.utc_now_text = lambda: NOW
    try:
        yield
    finally:
        replay_store.rate_for_date, replay_store.utc_now_text = originals


async def _replace(
    path: Path,
    after: dict,
    rate: _Rate | None,
    dry_run: bool = False,
    limit: int | None = None,
) -> ReplayOutcome:
    conn = await connect(path)
    try:
        with _fixed(rate):
            return await replace_day(
                conn,
                _rows(DAY, after),
                DAY,
                DEFAULT,
                dry_run=dry_run,
                started_at="2026-11-29T00:00:00.000000Z",
                records_processed=1,
                list_changes=limit,
            )
    finally:
        await conn.close()


def _usage(values: tuple) -> Usage:
    """A :class:`Usage` from a row's ``VALUE_COLUMNS`` values."""
    inp, out, total, requests, guesses, raw, markup, pln = values[:8]
    return Usage(requests, guesses, inp, out, total, raw, markup, pln)


async def _per_row_replace(path: Path, after: dict, rate: _Rate | None) -> None:
    """The replace as it was before the one-statement upsert: every row's values computed
    in Python (:func:`tables.summary_store.summary_values`), the rows whose stored values
    differ upserted with every value bound, one statement per row; rows without totals
    deleted; a closed month adjusted per client."""
    conn = await connect(path)
    try:
        async with write_transaction(conn):
            markups = (await load_pricebook(conn, DEFAULT)).for_day(DAY)
            cursor = await conn.execute(
                f"SELECT client_org_id, user_id, model, {', '.join(VALUE_COLUMNS)}"
                " FROM usage_daily WHERE usage_date = ?",
                (DAY,),
            )
            before = {tuple(row[:3]): tuple(row[3:]) for row in await cursor.fetchall()}
            values = summary_values(_rows(DAY, after), markups, rate, NOW)
            differing = [v for v in values if before.get(tuple(v[:3])) != tuple(v[4:-1])]
            await upsert_summary_values(conn, differing, row_by_row=True)
            gone = [key for key in before if key[:3] not in after]
            await conn.executemany(
                "DELETE FROM usage_daily WHERE client_org_id = ? AND user_id = ?"
                " AND model = ? AND usage_date = ?",
                [(*key, DAY) for key in gone],
            )
            if await month_is_closed(conn, DAY[:7]):
                changes = [
                    (
                        v[0],
                        _usage(before[tuple(v[:3])]) if tuple(v[:3]) in before else None,
                        _usage(tuple(v[4:-1])),
                    )
                    for v in differing
                ]
                changes += [(key[0], _usage(before[key]), None) for key in gone]
                await record_adjustments(conn, DAY, changes, "replay")
    finally:
        await conn.close()


def _content(row: tuple) -> tuple:
    return row[4:18]


@settings(max_examples=60, deadline=None)
@given(
    ROWS,
    ROWS,
    ROWS,
    RULES,
    RATES,
    RATES,
    st.booleans(),
    st.booleans(),
    st.sampled_from([None, 0, 2]),
)
def test_the_replace_stores_the_money_rules_and_lists_every_change(
    tmp_path_factory: pytest.TempPathFactory,
    template: Path,
    before: dict,
    other: dict,
    after: dict,
    rules: list,
    rate_before: _Rate | None,
    rate: _Rate | None,
    month_closed: bool,
    dry_run: bool,
    limit: int | None,
) -> None:
    if not after:
        after = {("org-a", "u1", "m1"): (1, 2, 1, 0, 5)}
    # some keys of the date keep their totals: unchanged unless the price or rate moved
    after = {**{key: before[key] for key in list(before)[::2]}, **after}
    path = _copy(template, tmp_path_factory.mktemp("db"))
    asyncio.run(_setup(path, before, other, rules, rate_before, rate, month_closed))
    stored_before = {row[:4]: row for row in _table(path, _DAILY)}
    everything_before = _everything(path)
    outcome = asyncio.run(_replace(path, after, rate, dry_run, limit))
    if dry_run:
        assert _everything(path) == everything_before
    stored = {row[:4]: row for row in _table(path, _DAILY)}
    book = Pricebook(
        [
            MarkupRule(number + 1, client, model, factor, f"2026-11-{number + 1:02d}", "t", None)
            for number, (client, model, factor) in enumerate(rules)
        ],
        DEFAULT,
    ).for_day(DAY)
    expected = {key: row for key, row in stored_before.items() if key[3] != DAY}
    changes = []
    for key, sums in after.items():
        values = _summary_values(SummaryRow(*key, DAY, *sums), book(key[0], key[2]), rate, NOW)
        content = tuple(v.hex() if isinstance(v, float) else v for v in values[4:18])
        old = stored_before.get((*key, DAY))
        if old is None:
            changes.append(("added", key))
            expected[(*key, DAY)] = (*key, DAY, *content, 1, NOW)
        elif _content(old) != content:
            changes.append(("changed", key))
            expected[(*key, DAY)] = (*key, DAY, *content, old[18] + 1, NOW)
        else:  # unchanged: keeps its revision and updated_at
            expected[(*key, DAY)] = old
    for key in stored_before:
        if key[3] == DAY and key[:3] not in after:
            changes.append(("removed", key[:3]))
    changes.sort(key=lambda change: change[1])
    if not dry_run:
        assert stored == expected
        _assert_totals(path)
    for kind in ("added", "removed", "changed"):
        assert outcome.count(kind) == sum(1 for change in changes if change[0] == kind)
    assert outcome.corrections == len(changes)
    shown = changes if limit is None else changes[:limit]
    assert [(change.kind, change.key) for change in outcome.changes] == shown
    for change in outcome.changes:
        if change.new is not None:
            row = expected[(*change.key, DAY)]
            new = tuple(v.hex() if isinstance(v, float) else v for v in change.new[:-2])
            assert new == row[4:18]
            assert (change.new.revision, change.new.updated_at) == row[18:]
        if change.old is not None:
            old = tuple(v.hex() if isinstance(v, float) else v for v in change.old[:-2])
            assert old == stored_before[(*change.key, DAY)][4:18]
    assert outcome.rows == len(after)
    assert outcome.clients == len({key[0] for key in after})
    expected_written = sum(1 for change in changes if change[0] != "removed")
    assert outcome.summaries_written == expected_written + outcome.count("removed")
    adjustments = _table(
        path,
        f"SELECT client_org_id, {', '.join(DELTA_COLUMNS)} FROM adjustments ORDER BY 1",
    )
    if month_closed and not dry_run:
        assert adjustments == _expected_adjustments(stored_before, expected)
    else:
        assert adjustments == []


@settings(max_examples=40, deadline=None)
@given(ROWS, ROWS, ROWS, RULES, RATES, RATES, st.booleans())
def test_the_replace_stores_what_the_per_row_replace_stored_and_twice_changes_nothing(
    tmp_path_factory: pytest.TempPathFactory,
    template: Path,
    before: dict,
    other: dict,
    after: dict,
    rules: list,
    rate_before: _Rate | None,
    rate: _Rate | None,
    month_closed: bool,
) -> None:
    after = {**{key: before[key] for key in list(before)[::2]}, **after}
    directory = tmp_path_factory.mktemp("db")
    new, old = _copy(template, directory, "new.db"), _copy(template, directory, "old.db")
    for path in (new, old):
        asyncio.run(_setup(path, before, other, rules, rate_before, rate, month_closed))
    # both start from the same rows (updated_at too): copy the first one's DB
    shutil.copyfile(new, old)
    outcome = asyncio.run(_replace(new, after, rate))
    asyncio.run(_per_row_replace(old, after, rate))
    assert _billing(new) == _billing(old)
    billed = _billing(new)
    again = asyncio.run(_replace(new, after, rate))
    assert (again.corrections, again.summaries_written, again.changes) == (0, 0, [])
    assert again.rows == outcome.rows == len(after)
    assert _billing(new) == billed


def _one_day(count: int, raw: int = 1_000_000, user: str = "u") -> dict:
    return {
        ("org-a" if number % 3 else "org-b", f"{user}{number:03d}", "m1"): (
            number,
            2 * number,
            1,
            0,
            raw + number,
        )
        for number in range(count)
    }


def test_every_kind_of_change_counted_and_the_first_listed_by_key(
    tmp_path: Path, template: Path
) -> None:
    """30 rows before: 10 kept as they were, 10 changed, 10 gone; 25 new keys. A real run
    lists the first 20 changes by key and counts all 45."""
    before = _one_day(30)
    keys = sorted(before)
    after = {key: before[key] for key in keys[:10]}
    after |= {key: (*before[key][:4], before[key][4] + 7) for key in keys[10:20]}
    after |= _one_day(25, user="v")
    new, old = _copy(template, tmp_path, "new.db"), _copy(template, tmp_path, "old.db")
    asyncio.run(_setup(new, before, {}, [], None, None, True))
    shutil.copyfile(new, old)
    outcome = asyncio.run(_replace(new, after, None, limit=20))
    asyncio.run(_per_row_replace(old, after, None))
    assert _billing(new) == _billing(old)
    assert {kind: outcome.count(kind) for kind in ("added", "removed", "changed")} == {
        "added": 25,
        "removed": 10,
        "changed": 10,
    }
    assert (outcome.corrections, outcome.summaries_written, outcome.rows) == (45, 45, 45)
    every = sorted(
        [("changed", key) for key in keys[10:20]]
        + [("removed", key) for key in keys[20:]]
        + [("added", key) for key in _one_day(25, user="v")],
        key=lambda change: change[1],
    )
    assert [(change.kind, change.key) for change in outcome.changes] == every[:20]
    revisions = {row[:3]: row[18] for row in _table(new, _DAILY)}
    assert {revisions[key] for key in keys[:10]} == {1}
    assert {revisions[key] for key in keys[10:20]} == {2}


def _spy_binding(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rows each call of the path that binds every value upserted."""
    calls: list[int] = []
    bind = replay_store.upsert_summary_values

    async def spy(conn: object, values: list, *, row_by_row: bool = False) -> int:
        calls.append(len(values))
        return await bind(conn, values, row_by_row=row_by_row)  # type: ignore[arg-type]

    monkeypatch.setattr(replay_store, "upsert_summary_values", spy)
    return calls


@pytest.mark.parametrize("raw", [2**53, 2**53 + 1, 2**60 + 123_456_789])
def test_amounts_past_2_53_bind_every_value(
    tmp_path: Path, template: Path, monkeypatch: pytest.MonkeyPatch, raw: int
) -> None:
    """SQLite's ``x / 1e9`` rounds ``x`` to a double first: past 2**53 the REAL columns
    would differ from Python's correctly rounded quotient, so the replace binds them."""
    before = _one_day(6)
    after = {**_one_day(4), ("org-c", "big", "m1"): (1, 1, 1, 0, raw)}
    rate = _Rate(Decimal("4.0123"), "230/A/NBP/2026")
    new, old = _copy(template, tmp_path, "new.db"), _copy(template, tmp_path, "old.db")
    asyncio.run(_setup(new, before, {}, [], None, rate, False))
    shutil.copyfile(new, old)
    calls = _spy_binding(monkeypatch)
    asyncio.run(_replace(new, after, rate))
    assert calls == [5]  # 4 changed (the rate is new), 1 added
    asyncio.run(_per_row_replace(old, after, rate))
    assert _billing(new) == _billing(old)
    stored = {row[:3]: row for row in _table(new, _DAILY)}
    assert stored[("org-c", "big", "m1")][9] == raw
    assert stored[("org-c", "big", "m1")][12] == (raw / 10**9).hex()
    again = asyncio.run(_replace(new, after, rate))
    assert again.corrections == 0


def test_ordinary_amounts_take_the_one_statement(
    tmp_path: Path, template: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below 2**53 in every nano column (the markup of 1.3 included) nothing is bound
    row by row."""
    path = _copy(template, tmp_path)
    asyncio.run(_setup(path, _one_day(6), {}, [], None, None, False))
    calls = _spy_binding(monkeypatch)
    outcome = asyncio.run(_replace(path, _one_day(9, raw=2**52), None))
    assert calls == []
    assert outcome.summaries_written == 9


def test_a_dry_run_writes_nothing_and_lists_every_change(tmp_path: Path, template: Path) -> None:
    path = _copy(template, tmp_path)
    asyncio.run(_setup(path, _one_day(30), {}, [], None, None, True))
    everything = _everything(path)
    outcome = asyncio.run(_replace(path, _one_day(40, raw=5), None, dry_run=True))
    assert _everything(path) == everything
    assert outcome.corrections == len(outcome.changes) == 40
    assert (outcome.count("added"), outcome.count("changed")) == (10, 30)
    assert outcome.batch_run_id is None


_USAGE = {  # DELTA_COLUMNS by their index in a row of _DAILY
    "requests": 7,
    "estimated_requests": 8,
    "input_tokens": 4,
    "output_tokens": 5,
    "total_tokens": 6,
    "raw_cost_nano": 9,
    "markup_cost_nano": 10,
    "markup_cost_pln_nano": 11,
}


def _expected_adjustments(before: dict, after: dict) -> list[tuple]:
    deltas: dict[str, list] = {}
    for key in {*before, *after}:
        if key[3] != DAY:
            continue
        old, new = before.get(key), after.get(key)
        if old is not None and new is not None and _content(old) == _content(new):
            continue
        delta = deltas.setdefault(key[0], [0] * len(DELTA_COLUMNS))
        for index, column in enumerate(DELTA_COLUMNS):
            was = old[_USAGE[column]] if old is not None else 0
            now = new[_USAGE[column]] if new is not None else 0
            if was is None or now is None or delta[index] is None:
                delta[index] = None
            else:
                delta[index] += now - was
    return [
        (client, *delta)
        for client, delta in sorted(deltas.items())
        if any(value != 0 for value in delta)
    ]


def _assert_totals(path: Path) -> None:
    sums = (
        "COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(total_tokens), SUM(requests),"
        " SUM(estimated_requests), SUM(raw_cost_nano), SUM(markup_cost_nano),"
        " COALESCE(SUM(markup_cost_pln_nano), 0), COUNT(markup_cost_pln_nano)"
    )
    columns = (
        "rows, input_tokens, output_tokens, total_tokens, requests, estimated_requests,"
        " raw_cost_nano, markup_cost_nano, markup_cost_pln_nano, pln_rows"
    )
    assert _table(
        path, f"SELECT client_org_id, usage_date, {columns} FROM usage_client_daily ORDER BY 1, 2"
    ) == _table(
        path,
        f"SELECT client_org_id, usage_date, {sums} FROM usage_daily GROUP BY 1, 2 ORDER BY 1, 2",
    )
