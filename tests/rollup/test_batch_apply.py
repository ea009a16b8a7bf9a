"""The summary writer's transaction (tables/batch_apply.py) on a real migrated DB."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from streams.batch_log import BatchEntry, ChainHead, Fence, SumRow
from tables.batch_apply import BatchApplier
from tables.schema import connect

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
    assert (result.applied, result.not_in_chain, result.redelivered) == (2, 2, 0)
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
