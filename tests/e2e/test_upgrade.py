"""Upgrading a summary DB billed by the single-file pipeline: nothing is billed twice.

That pipeline stored each usage partition's next offset in ``source_offsets``. The new
worker starts each batch-log chain there (agents/summary_writer/writer.py, carry_over_offsets),
so the records before it, already in the totals, are not read and billed again.
"""

from __future__ import annotations

import asyncio
import sqlite3

from streams.kafka.broker import ensure_topics
from streams.settings import load_settings
from tables.summary_db.schema import connect
from tests.e2e.test_pipeline import usage
from tests.harness import Stack, wait_for


def billed(stack: Stack) -> int:
    try:
        ((total,),) = stack.query(
            "SELECT (SELECT COALESCE(SUM(requests), 0) FROM usage_daily)"
            " + (SELECT COALESCE(SUM(requests), 0) FROM daily_pending)"
        )
    except sqlite3.Error:
        return -1
    return int(total)


def test_an_upgraded_db_is_not_billed_again_from_the_start(stack: Stack) -> None:
    settings = load_settings(**{k: v for k, v in stack.env.items() if k.isupper()})
    asyncio.run(ensure_topics(settings))
    # 30 events on partition 0 and 20 on partition 1, keyed by request_id
    values = [usage(f"old-{i}", i) for i in range(50)]
    stack.publish(values, [f"old-{i}".encode() for i in range(50)], [0] * 30 + [1] * 20)

    async def old_pipeline_state() -> None:
        conn = await connect(stack.db_path)  # migrated: the tables of every version
        try:
            await conn.executemany(
                "INSERT INTO source_offsets VALUES (?, ?, ?, 'old')",
                [(stack.topic, 0, 30), (stack.topic, 1, 20)],
            )
        finally:
            await conn.close()

    asyncio.run(old_pipeline_state())  # as if the old pipeline had billed all 50

    worker = stack.worker().start()
    worker.wait_assigned()
    new = [usage(f"new-{i}", i) for i in range(10)]
    stack.publish(new, [f"new-{i}".encode() for i in range(10)], [0] * 5 + [1] * 5)
    wait_for(lambda: billed(stack) == 10, 60, "the 10 new events billed")
    # and none of the 50 old ones, however long we wait for them
    wait_for(
        lambda: worker.metrics().get("usage_stream_events_consumed_total") == 10, 30, "consumed"
    )
    assert billed(stack) == 10
    heads = dict(stack.query("SELECT partition, usage_next FROM batch_log_heads"))
    assert heads[0] == 35 and heads[1] == 25
