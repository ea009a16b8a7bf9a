"""The summary writer's sums and the rollup on a real SQLite file: exact, idempotent,
late-event aware, and bounded (request ids forgotten after the retention, late events of
a forgotten day still exact)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import aiosqlite
import pytest

from streams.clients.nbp import NbpRate
from streams.kafka.batch_log import BatchEntry, SumRow, decode, encode
from streams.model.business_time import local_midnight_ms, usage_date
from tables.dedupe.seen_requests import SeenRequests
from tables.summary_db.batch_apply import BatchApplier
from tables.summary_db.reference import rate_for_date, store_nbp_rates
from tables.summary_db.replay_staging import BilledEvent
from tables.summary_db.schema import connect
from tables.summary_db.summary_store import refresh_open_days, rollup_day
from tables.watermarks import DayCloser

WARSAW = ZoneInfo("Europe/Warsaw")
MARKUP = Decimal("1.3")
RETENTION_MS = 7 * 86_400_000


def entry(
    request_id: str,
    event_ms: int,
    cost_nano: int = 1000,
    client: str = "org-1",
    offset: int = 0,
    estimated: bool = False,
) -> BilledEvent:
    day = usage_date(event_ms, WARSAW)
    return BilledEvent(
        request_id,
        day.isoformat(),
        day.toordinal(),
        client,
        "user-1",
        "m",
        10,
        5,
        cost_nano,
        1 if estimated else 0,
        event_ms,
        0,
        offset,
    )


@dataclass(frozen=True, slots=True)
class Recorded:
    fresh: list[BilledEvent]
    duplicates: int  # copies inside the batch and requests seen before
    late: int  # fresh events of days that had closed already


class Pipeline:
    """Home partition 0 as the product handles it: the hot path's dedupe
    (:class:`SeenRequests`) and per-key sums into a :class:`BatchEntry` extending the
    chain head, encoded and decoded as on the batch log, then the summary writer's
    :class:`BatchApplier` on its own connection and its own single thread."""

    def __init__(self, path: Path) -> None:
        self.seen = SeenRequests(RETENTION_MS)
        self.applier = BatchApplier(path)
        self.writer = concurrent.futures.ThreadPoolExecutor(1, "summary-writer")
        self.head = -1  # the chain head's batch-log offset
        self.usage_next = 0

    def close(self) -> None:
        self.writer.submit(self.applier.close).result()
        self.writer.shutdown()

    def append(
        self, events: Sequence[BilledEvent], now_ms: int | None
    ) -> tuple[int, bytes, list[BilledEvent]]:
        """The hot path's prepare and append: the record's batch-log offset, its bytes,
        and the fresh events (the others are copies)."""
        fresh: dict[str, BilledEvent] = {}
        for e in events:  # the first copy of a request wins, also inside the batch
            if e.request_id not in fresh and e.request_id not in self.seen:
                fresh[e.request_id] = e
        sums: dict[tuple[str, str, str, str], list[int]] = {}
        for e in fresh.values():
            total = sums.setdefault((e.usage_date, e.client_org_id, e.user_id, e.model), [0] * 5)
            total[0] += e.input_tokens
            total[1] += e.output_tokens
            total[2] += 1
            total[3] += e.cost_estimated
            total[4] += e.cost_nano
        record = BatchEntry(
            self.head,
            self.usage_next,
            self.usage_next + len(events),
            0,
            0,
            max((e.event_ms for e in events), default=-1),
            [SumRow(*key, *total) for key, total in sums.items()],
            "test",
        )
        offset = self.head + 1
        self.head, self.usage_next = offset, record.usage_next
        self.seen.add(fresh, time.time_ns() // 1_000_000 if now_ms is None else now_ms)
        return offset, encode(record), list(fresh.values())


_pipelines: dict[int, Pipeline] = {}


@pytest.fixture
async def conn(tmp_path: Path):
    connection = await connect(tmp_path / "usage.db")
    _pipelines[id(connection)] = Pipeline(tmp_path / "usage.db")
    yield connection
    _pipelines.pop(id(connection)).close()
    await connection.close()


async def record_events(
    conn: aiosqlite.Connection, entries: Sequence[BilledEvent], now_ms: int | None = None
) -> Recorded:
    """A batch through the product path: deduplicated and summed as the hot path does,
    then applied by the summary writer in its thread (one transaction)."""
    pipeline = _pipelines[id(conn)]
    offset, value, fresh = pipeline.append(entries, now_ms)
    result, _ = await asyncio.get_running_loop().run_in_executor(
        pipeline.writer, pipeline.applier.apply, [(0, offset, decode(value))]
    )
    assert result.applied == 1 and result.requests == len(fresh)
    return Recorded(fresh, len(entries) - len(fresh), result.late)


async def no_rate(conn: aiosqlite.Connection, day: date) -> None:
    return None


async def daily(conn: aiosqlite.Connection) -> list[tuple]:
    async with conn.execute(
        "SELECT client_org_id, usage_date, requests, input_tokens, raw_cost_nano,"
        " markup_cost_nano, markup_cost_pln_nano, usd_pln_rate, nbp_table_no, revision"
        " FROM usage_daily ORDER BY 1, 2"
    ) as cursor:
        return list(await cursor.fetchall())


NOV20 = local_midnight_ms(date(2026, 11, 20), WARSAW) + 3_600_000


async def test_requests_seen_before_are_not_counted_again(conn: aiosqlite.Connection) -> None:
    first = await record_events(conn, [entry("a", NOV20), entry("b", NOV20), entry("a", NOV20)])
    assert [e.request_id for e in first.fresh] == ["a", "b"]
    assert first.duplicates == 1
    again = await record_events(conn, [entry("a", NOV20), entry("c", NOV20)])
    assert [e.request_id for e in again.fresh] == ["c"]
    assert again.duplicates == 1 and again.late == 0


async def test_close_late_reopen_and_idempotence(conn: aiosqlite.Connection) -> None:
    await record_events(conn, [entry(f"r{i}", NOV20 + i, cost_nano=1_000_001) for i in range(3)])
    result = await rollup_day(conn, "2026-11-20", MARKUP, no_rate)
    assert (result.summaries_written, result.records, result.late_rewrite) == (1, 3, False)
    # 3 × 1_000_001 = 3_000_003 nano; × 1.3 = 3_900_003.9 -> 3_900_004
    assert await daily(conn) == [
        ("org-1", "2026-11-20", 3, 30, 3_000_003, 3_900_004, None, None, None, 1)
    ]

    # a late event re-opens the day: counted late, row rewritten with revision 2
    late = await record_events(conn, [entry("late-1", NOV20 + 10, cost_nano=7)])
    assert late.late == 1
    result = await rollup_day(conn, "2026-11-20", MARKUP, no_rate)
    assert result.late_rewrite and result.summaries_written == 1
    assert await daily(conn) == [
        ("org-1", "2026-11-20", 4, 40, 3_000_010, 3_900_013, None, None, None, 2)
    ]

    # its duplicate changes nothing; a rollup with nothing new rewrites nothing
    dup = await record_events(conn, [entry("late-1", NOV20 + 10, cost_nano=7)])
    assert dup.fresh == [] and dup.duplicates == 1
    result = await rollup_day(conn, "2026-11-20", MARKUP, no_rate)
    assert result.summaries_written == 0
    assert (await daily(conn))[0][-1] == 2


async def test_pln_uses_the_rate_strictly_before_the_usage_date(
    conn: aiosqlite.Connection,
) -> None:
    await store_nbp_rates(
        conn,
        [
            NbpRate("USD", date(2026, 11, 19), "224/A/NBP/2026", Decimal("3.6581")),
            NbpRate("USD", date(2026, 11, 20), "225/A/NBP/2026", Decimal("3.7000")),
        ],
        covered=(date(2026, 11, 16), date(2026, 11, 20)),
    )
    await record_events(conn, [entry("x", NOV20, cost_nano=123_456_789)])
    await rollup_day(conn, "2026-11-20", MARKUP, rate_for_date)
    markup = int((Decimal(123_456_789) * MARKUP).to_integral_value(ROUND_HALF_EVEN))
    pln = int((Decimal(markup) * Decimal("3.6581")).to_integral_value(ROUND_HALF_EVEN))
    assert await daily(conn) == [
        ("org-1", "2026-11-20", 1, 10, 123_456_789, markup, pln, "3.6581", "224/A/NBP/2026", 1)
    ]


async def test_a_million_micro_dollar_events_sum_exactly(conn: aiosqlite.Connection) -> None:
    batch = 10_000
    for start in range(0, 1_000_000, batch):
        entries = [entry(f"m{i}", NOV20, cost_nano=1_000) for i in range(start, start + batch)]
        await record_events(conn, entries)
    await rollup_day(conn, "2026-11-20", MARKUP, no_rate)
    (row,) = await daily(conn)
    assert row[2] == 1_000_000
    assert row[4] == 1_000_000_000  # exactly 1.000000 USD
    assert row[5] == 1_300_000_000  # exactly 1.3 USD
    async with conn.execute("SELECT raw_cost_usd, markup_cost_usd FROM usage_daily") as cur:
        assert tuple(await cur.fetchone()) == (1.0, 1.3)


async def test_views_sum_and_keep_unknown_pln_null(conn: aiosqlite.Connection) -> None:
    await record_events(
        conn, [entry("a", NOV20, client="org-1"), entry("b", NOV20 + 1, client="org-1")]
    )
    await rollup_day(conn, "2026-11-20", MARKUP, no_rate)
    async with conn.execute(
        "SELECT client_org_id, usage_date, requests, raw_cost_nano, markup_cost_pln_nano"
        " FROM client_daily_usage"
    ) as cursor:
        assert list(await cursor.fetchall()) == [("org-1", "2026-11-20", 2, 2000, None)]
    async with conn.execute(
        "SELECT client_org_id, usage_month, requests FROM client_monthly_usage"
    ) as cursor:
        assert list(await cursor.fetchall()) == [("org-1", "2026-11", 2)]


async def test_a_reader_can_query_while_a_writer_holds_the_lock(
    conn: aiosqlite.Connection, tmp_path: Path
) -> None:
    await record_events(conn, [entry("a", NOV20)])
    await rollup_day(conn, "2026-11-20", MARKUP, no_rate)
    await conn.execute("BEGIN IMMEDIATE")
    await conn.execute("UPDATE usage_daily SET requests = 99")
    reader = sqlite3.connect(tmp_path / "usage.db", timeout=0.1)
    try:  # WAL: the reader sees the last committed state without waiting
        assert reader.execute("SELECT requests FROM usage_daily").fetchall() == [(1,)]
    finally:
        reader.close()
        await conn.execute("ROLLBACK")


def test_day_closes_by_watermark_or_by_wall_clock() -> None:
    now = {"ms": local_midnight_ms(date(2026, 11, 20), WARSAW) + 12 * 3_600_000}
    closer = DayCloser(WARSAW, 3600, clock=lambda: now["ms"])
    nov20 = date(2026, 11, 20)
    close_at = local_midnight_ms(date(2026, 11, 21), WARSAW) + 3_600_000
    assert not closer.is_due(nov20)
    # partition 0 passes the close time, partition 1 is behind: the lowest one decides
    closer.observe(0, close_at)
    closer.observe(1, close_at - 1)
    assert not closer.is_due(nov20)
    closer.observe(1, close_at)
    assert closer.is_due(nov20)
    # an idle partition: no event ever passes the close time, the wall clock does
    idle = DayCloser(WARSAW, 3600, clock=lambda: now["ms"])
    idle.observe(0, close_at - 5 * 3_600_000)
    assert not idle.is_due(nov20)
    now["ms"] = close_at - 1
    assert not idle.is_due(nov20)
    now["ms"] = close_at
    assert idle.is_due(nov20)


def test_grace_follows_local_midnight_on_the_25_hour_day() -> None:
    closer = DayCloser(WARSAW, 0, clock=lambda: 0)
    # 2026-10-25 lasts 25 h: it closes at 2026-10-25T23:00Z, not 22:00Z
    assert closer.close_ms(date(2026, 10, 25)) == 1_792_969_200_000


async def test_concurrent_writers_on_one_connection_do_not_undo_each_other(
    conn: aiosqlite.Connection,
) -> None:
    """The summary writer (its own connection, in its thread) and the rollup timer write
    at the same time: SQLite's write lock serialises them, nothing is lost or counted twice."""

    async def record(batch: int) -> None:
        entries = [entry(f"c{batch}-{i}", NOV20 + i, cost_nano=3) for i in range(200)]
        await record_events(conn, entries)

    async def roll() -> None:
        for _ in range(20):
            await rollup_day(conn, "2026-11-20", MARKUP, no_rate)
            await asyncio.sleep(0)

    await asyncio.gather(*(record(b) for b in range(20)), roll())
    await rollup_day(conn, "2026-11-20", MARKUP, no_rate)
    (row,) = await daily(conn)
    assert row[2] == 4000 and row[4] == 12_000
    async with conn.execute("SELECT COUNT(*) FROM daily_pending") as cursor:
        assert (await cursor.fetchone())[0] == 0


async def test_pruned_day_still_takes_late_events_and_drops_their_copies_exactly(
    conn: aiosqlite.Connection,
) -> None:
    """Retention: request ids are forgotten after LEDGER_RETENTION_DAYS, the closed
    day's totals stay, and late events for it (with copies) still update it exactly."""
    day_ms = 86_400_000
    recorded = NOV20 + 2 * day_ms  # the wall clock when the day's events were recorded
    await record_events(
        conn, [entry(f"p{i}", NOV20 + i, cost_nano=1_000_001) for i in range(100)], recorded
    )
    await rollup_day(conn, "2026-11-20", MARKUP, no_rate)
    seen = _pipelines[id(conn)].seen
    assert seen.prune(recorded + 6 * day_ms) == 0  # within retention
    pruned = seen.prune(recorded + 8 * day_ms + seen.bucket_ms)
    assert pruned == 100
    assert len(seen) == 0  # no per-event state left
    assert await daily(conn) == [
        ("org-1", "2026-11-20", 100, 1000, 100_000_100, 130_000_130, None, None, None, 1)
    ]

    later = recorded + 9 * day_ms
    late = [entry(f"late{i}", NOV20 + i, cost_nano=3) for i in range(10)]
    first = await record_events(conn, late + late[:4], later)  # copies in the batch
    assert len(first.fresh) == 10 and first.duplicates == 4 and first.late == 10
    again = await record_events(conn, late[5:], later + 1000)  # copies in a later batch
    assert again.fresh == [] and again.duplicates == 5
    result = await rollup_day(conn, "2026-11-20", MARKUP, no_rate)
    assert result.late_rewrite and result.late_events == 10
    assert await daily(conn) == [
        ("org-1", "2026-11-20", 110, 1100, 100_000_130, 130_000_169, None, None, None, 2)
    ]


async def test_open_days_have_provisional_rows_in_the_live_view(
    conn: aiosqlite.Connection,
) -> None:
    await record_events(conn, [entry("o1", NOV20, cost_nano=1_000_001), entry("o2", NOV20)])
    assert await refresh_open_days(conn, ["2026-11-20"], MARKUP, no_rate) == 1
    async with conn.execute(
        "SELECT usage_date, requests, raw_cost_nano, markup_cost_nano, final FROM usage_daily_live"
    ) as cursor:
        assert list(await cursor.fetchall()) == [("2026-11-20", 2, 1_001_001, 1_301_301, 0)]
    await rollup_day(conn, "2026-11-20", MARKUP, no_rate)
    async with conn.execute("SELECT usage_date, requests, final FROM usage_daily_live") as cur:
        assert list(await cur.fetchall()) == [("2026-11-20", 2, 1)]


async def test_nul_and_control_characters_in_ids_and_keys(conn: aiosqlite.Connection) -> None:
    """A NUL is valid in every string field: copies are still found, and keys survive the
    batch log's JSON and reach SQLite as bound values, so they still resolve (SQLite's
    JSON functions would cut them)."""
    odd = ["a\x00b", "a\x00c", "a", 'q"\\,= #\n\x7f']
    entries = [entry(rid, NOV20, client=f"org\x00{i % 2}") for i, rid in enumerate(odd)]
    first = await record_events(conn, entries)
    assert [e.request_id for e in first.fresh] == odd
    again = await record_events(conn, entries)
    assert again.fresh == [] and again.duplicates == len(odd)
    await rollup_day(conn, "2026-11-20", MARKUP, no_rate)
    async with conn.execute("SELECT client_org_id, requests FROM usage_daily ORDER BY 1") as cursor:
        assert list(await cursor.fetchall()) == [("org\x000", 2), ("org\x001", 2)]
