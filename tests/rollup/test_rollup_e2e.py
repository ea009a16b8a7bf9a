"""Daily bills from real worker processes on the real broker, checked against ground truth
computed independently here with Decimal arithmetic.

Duplicates on other partitions, one client on every partition, shuffled order, DST days,
two workers sharing the partitions, a SIGKILL mid-stream, a clean restart, late events.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from zoneinfo import ZoneInfo

import orjson
from aiokafka.partitioner import murmur2

from streams.clients.nbp import NbpRate
from tables.summary_db.reference import store_nbp_rates
from tables.summary_db.schema import connect
from tests.harness import Stack, event_ms, wait_for

WARSAW = ZoneInfo("Europe/Warsaw")
MARKUP = Decimal("1.3")
NANO = Decimal(1_000_000_000)
# business days with a table; the usage date takes the latest one strictly before it
RATES = {
    date(2026, 10, 22): ("205/A/NBP/2026", Decimal("3.6412")),
    date(2026, 10, 23): ("206/A/NBP/2026", Decimal("3.6377")),
    date(2026, 10, 26): ("207/A/NBP/2026", Decimal("3.6290")),
    date(2026, 10, 27): ("208/A/NBP/2026", Decimal("3.6301")),
}
START = datetime(2026, 10, 23, 12, 0, tzinfo=UTC)  # events over Oct 23 .. Oct 28


def half_even(value: Decimal) -> int:
    return int(value.to_integral_value(rounding=ROUND_HALF_EVEN))


def make_events(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    events = []
    for i in range(count):
        moment = START + timedelta(seconds=rng.randrange(0, 5 * 86_400))
        kind = i % 4
        if kind == 0:
            cost: object = f"0.{rng.randrange(0, 10**12):012d}"  # 12 decimals: rounds
        elif kind == 1:
            cost = rng.randrange(0, 10**9) / 10**11  # a JSON number
        elif kind == 2:
            cost = str(rng.randrange(0, 3))  # whole dollars
        else:
            cost = None  # absent: estimated (no price known -> 0)
        event = {
            "request_id": f"req-{seed}-{i}",
            "client_org_id": "org-big" if i % 3 == 0 else f"org-{rng.randrange(5)}",
            "user_id": f"user-{rng.randrange(7)}",
            "model": rng.choice(["openai/gpt-4o-mini", "anthropic/claude-3.5-sonnet"]),
            "input_tokens": rng.randrange(0, 5000),
            "output_tokens": rng.randrange(0, 2000),
            "timestamp": moment.isoformat().replace("+00:00", "Z")
            if i % 2
            else int(moment.timestamp() * 1000),
        }
        if cost is not None:
            event["cost_usd"] = cost
        events.append(event)
    return events


COVERED = (date(2026, 10, 20), date(2026, 10, 30))  # days whose table status is known


def rate_for(day: date) -> tuple[str, Decimal] | None:
    """The latest rate strictly before ``day``, only when no unknown day lies in between."""
    earlier = [d for d in RATES if d < day]
    if not earlier or day - timedelta(days=1) > COVERED[1]:
        return None
    return RATES[max(earlier)]


def local_day(event: dict) -> str:
    """The event's usage date (Europe/Warsaw), without any of the pipeline's code."""
    moment = datetime.fromtimestamp(event_ms(event) / 1000, UTC)
    return moment.astimezone(WARSAW).date().isoformat()


def local_days(events: list[dict]) -> set[str]:
    return {local_day(event) for event in events}


def ground_truth(events: list[dict]) -> dict[tuple, tuple]:
    """Expected usage_daily rows, computed without any of the pipeline's code."""
    totals: dict[tuple, list] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for event in events:
        key = (event["client_org_id"], event["user_id"], event["model"], local_day(event))
        row = totals[key]
        row[0] += event["input_tokens"]
        row[1] += event["output_tokens"]
        row[2] += 1
        if "cost_usd" in event:
            row[4] += half_even(Decimal(str(event["cost_usd"])) * NANO)
        else:
            row[3] += 1
    expected = {}
    for key, (inp, out, requests, estimated, raw) in totals.items():
        markup = half_even(Decimal(raw) * MARKUP)
        rate = rate_for(date.fromisoformat(key[3]))
        pln = half_even(Decimal(markup) * rate[1]) if rate else None
        expected[key] = (
            inp,
            out,
            inp + out,
            requests,
            estimated,
            raw,
            markup,
            pln,
            str(rate[1]) if rate else None,
            rate[0] if rate else None,
        )
    return expected


def actual(stack: Stack) -> dict[tuple, tuple]:
    rows = stack.query(
        "SELECT client_org_id, user_id, model, usage_date, input_tokens, output_tokens,"
        " total_tokens, requests, estimated_requests, raw_cost_nano, markup_cost_nano,"
        " markup_cost_pln_nano, usd_pln_rate, nbp_table_no FROM usage_daily"
    )
    return {tuple(row[:4]): tuple(row[4:]) for row in rows}


def seed_rates(stack: Stack) -> None:
    async def store() -> None:
        conn = await connect(stack.db_path)
        try:
            rates = [NbpRate("USD", d, no, mid) for d, (no, mid) in RATES.items()]
            await store_nbp_rates(conn, rates, covered=COVERED)
        finally:
            await conn.close()

    asyncio.run(store())


def positions_committed(stack: Stack) -> int:
    """Records of the usage and the rerouted topic read and committed (chain heads)."""
    ((total,),) = stack.query(
        "SELECT COALESCE(SUM(usage_next + rerouted_next), 0) FROM batch_log_heads"
    )
    return int(total)


def publish_shuffled(stack: Stack, events: list[dict], copies: list[dict], seed: int) -> None:
    """Events plus duplicate copies, shuffled, on random partitions with random keys."""
    rng = random.Random(seed)
    values = [orjson.dumps(event) for event in events + copies]
    rng.shuffle(values)
    keys = [rng.choice([None, b"not-the-request-id", None]) for _ in values]
    partitions = [rng.randrange(4) for _ in values]
    stack.publish(values, keys, partitions)


def wait_settled(stack: Stack, unique: int, records: int, timeout: float = 240) -> None:
    """Every one of ``records`` usage records read and committed, ``unique`` requests
    billed (pending and closed days), and nothing pending any more."""

    def settled() -> bool:
        try:
            committed = stack.records_committed()
            billed = stack.billed_requests()
            (pending,) = stack.query("SELECT COUNT(*) FROM daily_pending")[0]
            (closed,) = stack.query("SELECT COALESCE(SUM(requests), 0) FROM usage_daily")[0]
        except Exception:  # noqa: BLE001 - DB not created yet
            return False
        return committed == records and billed == unique and pending == 0 and closed == unique

    wait_for(settled, timeout, f"{records} records read and {unique} unique events billed", 1.0)


def test_100k_events_two_workers_and_a_sigkill_bill_exactly(stack: Stack) -> None:
    events = make_events(100_000, seed=1)
    # DST edges and the late-evening-local case, with known local dates
    edges = {
        "dst-spring-a": ("2026-03-29T00:59:59.999Z", "2026-03-29"),
        "dst-spring-b": ("2026-03-28T22:59:59.999Z", "2026-03-28"),
        "dst-autumn-a": ("2026-10-25T01:30:00Z", "2026-10-25"),
        "dst-autumn-b": ("2026-10-25T22:59:59Z", "2026-10-25"),
        "dst-autumn-c": ("2026-10-25T23:00:00Z", "2026-10-26"),
        "late-evening": ("2026-11-20T22:30:00Z", "2026-11-20"),
    }
    for request_id, (stamp, _) in edges.items():
        events.append({**events[0], "request_id": request_id, "timestamp": stamp})
    rng = random.Random(7)
    copies = [dict(event) for event in rng.sample(events, 10_000)]
    seed_rates(stack)

    first = stack.worker().start()
    # one summary writer per batch log: the second worker only runs the hot path
    second = stack.worker(SUMMARY_WRITER="false").start()
    first.wait_assigned()
    second.wait_assigned()
    half = len(events) // 2
    publish_shuffled(stack, events[:half], copies[:5_000], seed=2)
    # kill one worker while it is busy: its partitions move to the other one
    wait_for(
        lambda: second.metrics().get("usage_stream_events_consumed_total", 0) > 1_000,
        120,
        "the second worker to be busy",
    )
    second.kill()
    publish_shuffled(stack, events[half:], copies[5_000:], seed=3)
    replacement = stack.worker(WEB_PORT=second.env["WEB_PORT"], SUMMARY_WRITER="false").start()
    replacement.wait_assigned()

    wait_settled(stack, len(events), len(events) + len(copies))
    assert actual(stack) == ground_truth(events)
    # each edge event on its local date (there is no per-request row to look up any more):
    # the oracle agrees with the hand-written dates, and the dates only edge events have
    # hold exactly those events
    for request_id, (stamp, local_date) in edges.items():
        event = {"timestamp": stamp}
        assert local_day(event) == local_date, request_id
    only_edges = sorted({d for _, d in edges.values()} - set(local_days(events[:100_000])))
    assert only_edges == ["2026-03-28", "2026-03-29", "2026-11-20"]
    marks = ",".join("?" * len(only_edges))
    assert stack.query(
        f"SELECT usage_date, SUM(requests) FROM usage_daily WHERE usage_date IN ({marks})"
        " GROUP BY usage_date ORDER BY usage_date",
        tuple(only_edges),
    ) == [(day, sum(1 for _, d in edges.values() if d == day)) for day in only_edges]
    runs = stack.query("SELECT COUNT(*) FROM batch_runs WHERE kind = 'rollup' AND success = 1")
    assert runs[0][0] >= 6
    assert first.alive() and replacement.alive()


def test_clean_restart_and_late_events_reopen_the_day(stack: Stack) -> None:
    events = make_events(3_000, seed=11)
    seed_rates(stack)
    worker = stack.worker().start()
    worker.wait_assigned()
    publish_shuffled(stack, events[:1_500], events[:300], seed=12)
    wait_for(
        lambda: worker.metrics().get("usage_stream_events_consumed_total", 0) >= 600,
        60,
        "some progress",
    )
    assert worker.stop() == 0  # clean stop mid-stream
    publish_shuffled(stack, events[1_500:], events[1_400:1_700], seed=13)
    restarted = stack.worker(WEB_PORT=worker.env["WEB_PORT"]).start()
    restarted.wait_assigned()
    wait_settled(stack, len(events), 1_500 + 300 + 1_500 + 300)
    assert actual(stack) == ground_truth(events)

    # a late event for a closed day re-opens it: revision 2, counted late
    late = {**events[5], "request_id": "late-1", "cost_usd": "0.5"}
    key = (late["client_org_id"], late["user_id"], late["model"])
    before = stack.query(
        "SELECT usage_date, revision FROM usage_daily WHERE client_org_id = ? AND user_id = ?"
        " AND model = ?",
        key,
    )
    # (the days are in the past: they closed at once, so events that arrived after the
    # first rollup were already late; count only this one)
    late_before = restarted.metrics()["usage_stream_events_late_total"]
    runs_late_before = stack.query(
        "SELECT COALESCE(SUM(late_events), 0) FROM batch_runs WHERE kind = 'rollup'"
    )[0][0]
    stack.publish([orjson.dumps(late)])
    wait_settled(stack, len(events) + 1, 1_500 + 300 + 1_500 + 300 + 1)
    assert actual(stack) == ground_truth(events + [late])
    day = datetime.fromtimestamp(event_ms(late) / 1000, UTC).astimezone(WARSAW).date()
    revision = stack.query(
        "SELECT revision FROM usage_daily WHERE client_org_id = ? AND user_id = ? AND model = ?"
        " AND usage_date = ?",
        (*key, day.isoformat()),
    )
    old = dict(before)[day.isoformat()]
    assert revision == [(old + 1,)]
    assert restarted.metrics()["usage_stream_events_late_total"] == late_before + 1
    # the rollup that merged it records it in batch_runs.late_events
    wait_for(
        lambda: (
            stack.query(
                "SELECT COALESCE(SUM(late_events), 0) FROM batch_runs WHERE kind = 'rollup'"
            )[0][0]
            == runs_late_before + 1
        ),
        30,
        "batch_runs.late_events",
    )
    (day_runs,) = stack.query(
        "SELECT COUNT(*) FROM batch_runs WHERE kind = 'rollup' AND processing_date = ?"
        " AND late_events = 1",
        (day.isoformat(),),
    )[0]
    assert day_runs >= 1

    # its duplicate changes nothing
    snapshot = stack.query("SELECT * FROM usage_daily ORDER BY 1, 2, 3, 4")
    positions = positions_committed(stack)
    stack.publish([orjson.dumps(late)], partitions=[3])
    wait_for(
        lambda: (
            restarted.metrics()["usage_stream_events_duplicate_total"] >= 1
            and restarted.metrics()["usage_stream_events_consumed_total"] >= 2
        ),
        30,
        "the duplicate to be dropped",
    )
    # ...once its batch is committed and applied: the usage record, and the rerouted copy
    # too when partition 3 is not its home (Kafka's default partitioner for its id)
    home = (murmur2(late["request_id"].encode()) & 0x7FFFFFFF) % 4
    moved = 1 if home == 3 else 2
    wait_for(lambda: positions_committed(stack) == positions + moved, 30, "its batch applied")
    assert stack.query("SELECT COUNT(*) FROM daily_pending") == [(0,)]
    assert stack.query("SELECT * FROM usage_daily ORDER BY 1, 2, 3, 4") == snapshot
