"""The per-client and per-client-and-model totals (migration 21) stay equal to
``usage_daily`` summed, whatever is written to it: inserts, the rollup's upserts, updates
of any column (a key too), deletes, PLN appearing and disappearing. Real SQLite, the real
migrations; the sums to compare with are computed here with GROUP BY."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tables.summary_db.schema import connect

SUMS = (
    "COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(total_tokens), SUM(requests),"
    " SUM(estimated_requests), SUM(raw_cost_nano), SUM(markup_cost_nano),"
    " COALESCE(SUM(markup_cost_pln_nano), 0), COUNT(markup_cost_pln_nano)"
)
COLUMNS = (
    "rows, input_tokens, output_tokens, total_tokens, requests, estimated_requests,"
    " raw_cost_nano, markup_cost_nano, markup_cost_pln_nano, pln_rows"
)
KEYS = st.tuples(
    st.sampled_from(["org-a", "org-b"]),
    st.sampled_from(["u1", "u2"]),
    st.sampled_from(["m1", "m2"]),
    st.sampled_from(["2026-11-01", "2026-11-02"]),
)
VALUES = st.tuples(
    st.integers(0, 10**12),
    st.integers(0, 10**12),
    st.integers(1, 10**6),
    st.integers(0, 10),
    st.integers(0, 10**15),
    st.one_of(st.none(), st.integers(0, 10**16)),
)
UPSERTS = st.lists(st.tuples(st.just("upsert"), KEYS, VALUES), min_size=1, max_size=12)
CHANGES = st.lists(
    st.one_of(
        st.tuples(st.just("upsert"), KEYS, VALUES),
        st.tuples(st.just("delete"), KEYS, st.none()),
        st.tuples(st.just("rekey"), KEYS, KEYS),
        st.tuples(st.just("pln"), KEYS, st.one_of(st.none(), st.integers(0, 10**9))),
    ),
    max_size=30,
)
#: rows first, so that the changes after them mostly meet rows (a rekey, a delete)
OPS = st.builds(lambda rows, changes: rows + changes, UPSERTS, CHANGES)

UPSERT = """
INSERT INTO usage_daily (client_org_id, user_id, model, usage_date, input_tokens,
    output_tokens, total_tokens, requests, estimated_requests, raw_cost_nano,
    markup_cost_nano, markup_cost_pln_nano, raw_cost_usd, markup_cost_usd, markup_cost_pln,
    revision, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, NULL, 1, 't')
ON CONFLICT (client_org_id, user_id, model, usage_date) DO UPDATE SET
    input_tokens = excluded.input_tokens, output_tokens = excluded.output_tokens,
    total_tokens = excluded.total_tokens, requests = excluded.requests,
    estimated_requests = excluded.estimated_requests, raw_cost_nano = excluded.raw_cost_nano,
    markup_cost_nano = excluded.markup_cost_nano,
    markup_cost_pln_nano = excluded.markup_cost_pln_nano, revision = revision + 1
"""
WHERE = " WHERE client_org_id = ? AND user_id = ? AND model = ? AND usage_date = ?"


def _apply(conn: sqlite3.Connection, op: str, key: tuple, arg: object) -> None:
    if op == "upsert":
        inp, out, requests, estimated, raw, pln = arg  # type: ignore[misc]
        markup = raw * 13 // 10
        conn.execute(UPSERT, (*key, inp, out, inp + out, requests, estimated, raw, markup, pln))
    elif op == "delete":
        conn.execute("DELETE FROM usage_daily" + WHERE, key)
    elif op == "rekey":
        try:
            conn.execute(
                "UPDATE usage_daily SET client_org_id = ?, user_id = ?, model = ?,"
                " usage_date = ?" + WHERE,
                (*arg, *key),  # type: ignore[misc]
            )
        except sqlite3.IntegrityError:  # the target key exists: nothing changes
            pass
    else:
        conn.execute("UPDATE usage_daily SET markup_cost_pln_nano = ?" + WHERE, (arg, *key))


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("totals") / "usage.db"

    async def migrate() -> None:
        await (await connect(path)).close()

    asyncio.run(migrate())
    return path


@settings(max_examples=100, deadline=None)
@given(OPS)
def test_totals_equal_usage_daily_summed_after_any_writes(db: Path, ops: list) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN")
        for op, key, arg in ops:
            _apply(conn, op, key, arg)
        for table, keys in (
            ("usage_client_daily", "client_org_id, usage_date"),
            ("usage_client_model_daily", "client_org_id, model, usage_date"),
        ):
            summed = conn.execute(
                f"SELECT {keys}, {SUMS} FROM usage_daily GROUP BY {keys} ORDER BY {keys}"
            ).fetchall()
            kept = conn.execute(f"SELECT {keys}, {COLUMNS} FROM {table} ORDER BY {keys}")
            assert kept.fetchall() == summed, table
        conn.execute("ROLLBACK")  # every example starts from the empty tables
    finally:
        conn.close()
