"""The summary writer's transaction (tables/summary_db/batch_apply.py) on a real migrated DB."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.kafka.batch_log import (
    BatchEntry,
    BatchPart,
    ChainHead,
    Fence,
    SumRow,
    decode_rows_raw,
    encode,
    encode_parts,
)
from tables.summary_db.batch_apply import BatchApplier
from tables.summary_db.schema import connect

DAY = "2026-11-28"


def migrated(tmp_path: Path) -> Path:
    path = tmp_path / "usage.db"

    async def create() -> None:
        await (await connect(path)).close()

    asyncio.run(create())
    return path


def row(user: str, tokens: int, requests: int = 1, cost: int = 1_000, day: str = DAY) -> SumRow:
    return SumRow(day, "org", user, "model\x00x", tokens, tokens * 2, requests, 0, cost)


def entry(prev: int, start: int, end: int, rows: list[SumRow], newest: int = 100) -> BatchEntry:
    return BatchEntry(prev, start, end, 0, 0, newest, rows, "test")


def pending(path: Path) -> dict[tuple[str, str], tuple[int, ...]]:
    with sqlite3.connect(path) as conn:
        return {
            (day, user): tuple(rest)
            for day, user, *rest in conn.execute(
                "SELECT p.usage_date, k.user_id, p.input_tokens, p.output_tokens, p.requests,"
                " p.raw_cost_nano, p.late_events FROM daily_pending p JOIN summary_keys k"
                " USING (key_id)"
            )
        }


def test_each_record_counts_once_and_only_along_the_chain(tmp_path: Path) -> None:
    path = migrated(tmp_path)
    applier = BatchApplier(path)
    log0 = [
        (0, 0, entry(-1, 0, 10, [row("u1", 5), row("u2", 7, requests=2, cost=3)])),
        (0, 1, entry(0, 10, 20, [row("u1", 1)], newest=300)),
        (0, 2, entry(0, 10, 15, [row("u1", 1000)])),  # a zombie's: extends 0, not the head
        (0, 3, None),  # not a chain record
    ]
    result, heads = applier.apply(log0)
    assert (result.applied, result.not_in_chain, result.redelivered) == (2, 1, 0)
    assert result.not_a_record == 1
    assert result.requests == 4 and result.late == 0
    assert heads[0].next_offset == 4
    assert heads[0].head == ChainHead(1, 20, 0, 300)
    assert pending(path) == {(DAY, "u1"): (6, 12, 2, 2_000, 0), (DAY, "u2"): (7, 14, 2, 3, 0)}

    # the same records again (a writer restarted before its Kafka position moved): nothing
    result, _ = applier.apply(log0)
    assert result.redelivered == 4 and result.applied == 0
    # a new applier (a restarted writer) continues from the stored heads
    applier.close()
    again = BatchApplier(path)
    assert again.heads()[0].head.offset == 1
    result, heads = again.apply(
        [(0, 4, entry(1, 20, 25, [row("u2", 1)])), (1, 0, entry(-1, 0, 3, [row("u3", 2)]))]
    )
    assert result.applied == 2
    assert heads[1].head == ChainHead(0, 3, 0, 100)
    assert pending(path)[(DAY, "u2")] == (8, 16, 3, 1_003, 0)
    assert pending(path)[(DAY, "u3")] == (2, 4, 1, 1_000, 0)


def test_fences_move_the_head_and_sums_of_closed_days_count_as_late(tmp_path: Path) -> None:
    path = migrated(tmp_path)
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO closed_days VALUES (?, 'x', 'test')", (DAY,))
    applier = BatchApplier(path)
    result, heads = applier.apply(
        [
            (2, 0, entry(-1, 0, 5, [row("u1", 1)])),
            (2, 1, Fence(0, "r1", DAY, 5, 0)),
            (2, 2, entry(0, 5, 9, [row("u1", 50)])),  # built before the fence: out
            (2, 3, entry(1, 5, 9, [row("u1", 2, day="2026-11-29")])),
        ]
    )
    assert (result.applied, result.fences, result.not_in_chain) == (2, 1, 1)
    assert result.late == 1
    assert heads[2].head == ChainHead(3, 9, 0, 100)
    assert pending(path) == {
        (DAY, "u1"): (1, 2, 1, 1_000, 1),
        ("2026-11-29", "u1"): (2, 4, 1, 1_000, 0),
    }


def test_a_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    path = migrated(tmp_path)
    applier = BatchApplier(path)
    blocker = sqlite3.connect(path, timeout=0.1)
    blocker.execute("BEGIN IMMEDIATE")
    applier.conn.execute("PRAGMA busy_timeout = 100")
    try:
        applier.apply([(0, 0, entry(-1, 0, 1, [row("u1", 1)]))])
    except sqlite3.OperationalError:
        pass
    else:
        raise AssertionError("the write lock was held: apply must fail")
    blocker.rollback()
    assert pending(path) == {} and applier.heads() == {}
    result, _ = applier.apply([(0, 0, entry(-1, 0, 1, [row("u1", 1)]))])
    assert result.applied == 1


def as_writer_reads(record: BatchEntry | Fence) -> BatchEntry | Fence:
    """The record as the summary writer decodes it: rows left as JSON text."""
    return decode_rows_raw(encode(record))


_TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
_AMOUNT = st.integers(min_value=0, max_value=2**40)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([DAY, "2026-11-29"]),
            st.sampled_from(["org", 'o"rg\\', "org\x00", "żółw"]),
            _TEXT,
            st.sampled_from(["m", "m\x00x", "m\n\t"]),
            _AMOUNT,
            _AMOUNT,
            st.integers(min_value=1, max_value=1000),
            _AMOUNT,
        ),
        min_size=1,
        max_size=30,
    )
)
def test_rows_folded_from_json_text_equal_rows_folded_as_values(
    tmp_path_factory: pytest.TempPathFactory, rows: list[tuple]
) -> None:
    """Same sums whether SQLite reads the rows from the record's JSON text (the writer)
    or they are bound as decoded values: escapes, NULs, non-ASCII text, big integers."""
    sums = [
        SumRow(day, org, user, model, inp, out, requests, requests // 2, cost)
        for day, org, user, model, inp, out, requests, cost in rows
    ]
    log = [(0, 0, entry(-1, 0, 9, sums[: len(sums) // 2])), (0, 1, entry(0, 9, 20, sums))]
    folded = {}
    for how in ("values", "json"):
        path = migrated(tmp_path_factory.mktemp(how))
        with sqlite3.connect(path) as conn:
            conn.execute("INSERT INTO closed_days VALUES ('2026-11-29', 'x', 'test')")
        records = log if how == "values" else [(p, o, as_writer_reads(r)) for p, o, r in log]
        result, _ = BatchApplier(path).apply(records)
        with sqlite3.connect(path) as conn:
            folded[how] = (
                result.requests,
                result.late,
                sorted(
                    conn.execute(
                        "SELECT p.usage_date, k.client_org_id, k.user_id, k.model,"
                        " p.input_tokens, p.output_tokens, p.requests, p.estimated_requests,"
                        " p.raw_cost_nano, p.late_events FROM daily_pending p"
                        " JOIN summary_keys k USING (key_id)"
                    )
                ),
            )
    assert folded["json"] == folded["values"]
    expected: dict[tuple, list[int]] = {}
    for row_ in sums[: len(sums) // 2] + sums:
        total = expected.setdefault(
            (row_.usage_date, row_.client_org_id, row_.user_id, row_.model), [0, 0, 0, 0, 0]
        )
        for i, value in enumerate(
            (row_.input_tokens, row_.output_tokens, row_.requests, row_.estimated_requests)
        ):
            total[i] += value
        total[4] += row_.raw_cost_nano
    assert [tuple(r[:9]) for r in folded["json"][2]] == sorted(
        (*key, *total) for key, total in expected.items()
    )


def test_a_sum_beyond_64_bits_is_an_error_not_a_rounded_value(tmp_path: Path) -> None:
    path = migrated(tmp_path)
    applier = BatchApplier(path)
    huge = [row("u1", 1, cost=2**63 - 10), row("u1", 1, cost=20)]
    for record in (entry(-1, 0, 1, huge), entry(-1, 0, 1, [row("u1", 1, cost=2**64)])):
        with pytest.raises((sqlite3.Error, OverflowError)):
            applier.apply([(0, 0, as_writer_reads(record))])
    assert pending(path) == {} and applier.heads() == {}


def parts_of(rows: list[SumRow]) -> list[BatchPart]:
    return [decode_rows_raw(part) for part in encode_parts(rows, "w", limit=300)]  # type: ignore[misc]


def test_a_split_batch_counts_whole_through_its_entry_even_across_transactions(
    tmp_path: Path,
) -> None:
    path = migrated(tmp_path)
    applier = BatchApplier(path)
    many = [row(f"u{i}", i + 1) for i in range(12)]
    parts = parts_of(many)
    assert len(parts) >= 3
    # the parts in one transaction, the entry naming them in the next one
    first, _ = applier.apply([(0, offset, part) for offset, part in enumerate(parts)])
    assert first.parts == len(parts) and pending(path) == {}
    named = BatchEntry(-1, 0, 10, 0, 0, 100, [], "w", parts=list(range(len(parts))))
    second, _ = applier.apply([(0, len(parts), decode_rows_raw(encode(named)))])
    assert second.applied == 1 and second.requests == 12 and second.missing_parts == 0
    assert pending(path) == {(DAY, f"u{i}"): (i + 1, 2 * (i + 1), 1, 1_000, 0) for i in range(12)}
    with sqlite3.connect(path) as conn:  # the parts are gone once their entry counted
        assert conn.execute("SELECT COUNT(*) FROM batch_log_parts").fetchone() == (0,)


def test_parts_nobody_names_never_count_and_are_dropped(tmp_path: Path) -> None:
    path = migrated(tmp_path)
    applier = BatchApplier(path)
    orphan = parts_of([row("zombie", 1000)])
    # a worker died after its part; the next owner's entry extends the chain
    records = [(0, 0, orphan[0]), (0, 1, entry(-1, 0, 5, [row("u1", 1)]))]
    # a zombie's split batch: its part, then its entry that is not in the chain
    zombie_part = parts_of([row("zombie", 2000)])[0]
    zombie = BatchEntry(-1, 0, 5, 0, 0, 100, [], "z", parts=[2])
    records += [(0, 2, zombie_part), (0, 3, zombie), (0, 4, entry(1, 5, 9, [row("u1", 1)]))]
    result, _ = applier.apply(records)
    assert (result.applied, result.not_in_chain, result.parts) == (2, 1, 2)
    assert pending(path) == {(DAY, "u1"): (2, 4, 2, 2_000, 0)}
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM batch_log_parts").fetchone() == (0,)


def test_a_part_named_but_never_read_is_counted(tmp_path: Path) -> None:
    path = migrated(tmp_path)
    named = BatchEntry(-1, 0, 10, 0, 0, 100, [row("u1", 1)], "w", parts=[7])
    result, _ = BatchApplier(path).apply([(0, 8, named)])
    assert result.applied == 1 and result.missing_parts == 1
    assert pending(path) == {(DAY, "u1"): (1, 2, 1, 1_000, 0)}
