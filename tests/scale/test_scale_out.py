"""Scale-out (issue 9) on the real broker with real worker processes.

One summary writer (default settings, the stack's DATA_DIR, so ``stack.query`` reads its
database) and workers with ``SUMMARY_WRITER=false``, each on its own DATA_DIR (another
host): every worker consumes, validates, deduplicates and writes raw points; only the
writer opens SQLite, fed with the workers' aggregates through Kafka. Totals are checked
row by row against a ground truth computed here with Decimal (markup 1.3, half-even to
the nano-USD, usage dates in Europe/Warsaw); no prices or NBP rates are reachable, so
estimated costs are 0 and PLN stays NULL.
"""

from __future__ import annotations

import asyncio
import random
import time
from datetime import datetime, timedelta
from pathlib import Path

import orjson
import pytest

from tests.ground_truth import WARSAW, local_midnight_ms, on_day
from tests.harness import Stack, consume_all, wait_for
from tests.scale.helpers import (
    PARTITIONS,
    Record,
    assert_no_sqlite,
    assigned,
    closed_days,
    daily,
    ground_truth,
    home,
    homed,
    invalid_records,
    make_event,
    metric,
    non_writer,
    past_events,
    publish,
    raw_lines,
    raw_points,
    scalar,
    spread,
    wait_billed,
    wait_group,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(280)]

CONSUMED = "usage_stream_events_consumed_total"
DUPLICATES = "usage_stream_events_duplicate_total"
APPLIED = "usage_stream_partials_applied_total"


def assert_raw_points_exact(data_dirs: list[Path], events: list[dict]) -> None:
    """Every unique request in the union of the raw files, nothing else, and every line
    of a request identical (one point in InfluxDB)."""
    points = raw_points(data_dirs)
    unique = {event["request_id"] for event in events}
    assert len(points) == len(unique)
    assert set(points) == unique
    differing = {rid: lines for rid, lines in points.items() if len(lines) != 1}
    assert differing == {}


def dead_letters(stack: Stack, bad: list[Record]) -> set[bytes]:
    records = asyncio.run(consume_all(stack.broker, stack.topic + "-dlq", len(bad), 30))
    return {record.value for record in records}


# 1 -------------------------------------------------------------------------------------


def test_writer_and_non_writer_bill_100k_events_exactly(stack: Stack, tmp_path: Path) -> None:
    events = past_events((5, 4, 3), 100_000, "one")
    records, copies = spread(events, 0.12, seed=1)
    assert copies >= len(events) // 10
    bad = invalid_records(int(time.time() * 1000), events[0])
    truth = ground_truth(events)

    writer = stack.worker()
    other_dir = tmp_path / "host-b"
    other = non_writer(stack, other_dir)
    writer.start()
    other.start()
    wait_group([writer, other])

    publish(stack, records[:50_000] + bad + records[50_000:])
    wait_billed(stack, truth, timeout=150)

    # both hosts worked: partitions shared, events consumed, raw points written
    sets = [assigned(writer), assigned(other)]
    assert sets[0] and sets[1]
    assert sets[0] | sets[1] == set(range(PARTITIONS)) and not sets[0] & sets[1]
    assert metric(writer, CONSUMED) > 0 and metric(other, CONSUMED) > 0
    assert metric(writer, CONSUMED) + metric(other, CONSUMED) >= len(records) + len(bad)
    assert metric(writer, DUPLICATES) + metric(other, DUPLICATES) >= copies
    assert metric(writer, APPLIED) > 0
    assert raw_lines(other_dir)
    assert_raw_points_exact([stack.db_path.parent, other_dir], events)

    # the non-writer never touched SQLite
    assert_no_sqlite(other_dir, other)
    # invalid messages dead-lettered, by whichever worker read them
    assert dead_letters(stack, bad) == {value for value, _, _ in bad}
    assert writer.alive() and other.alive()


# 2 -------------------------------------------------------------------------------------


def test_lost_non_writer_host_and_a_joining_worker_keep_totals_exact(
    stack: Stack, tmp_path: Path
) -> None:
    events = past_events((6, 5, 4), 40_000, "two")
    records, copies = spread(events, 0.15, seed=2)
    bad = invalid_records(int(time.time() * 1000), events[0])
    truth = ground_truth(events)
    small = {"BATCH_MAX_EVENTS": "4000"}  # many batches, so many aggregates in flight

    writer = stack.worker(**small)
    lost_dir, new_dir, joining_dir = tmp_path / "host-b", tmp_path / "host-b2", tmp_path / "c"
    lost = non_writer(stack, lost_dir, **small)
    writer.start()
    lost.start()
    wait_group([writer, lost])

    cut = len(records) * 55 // 100
    publish(stack, records[:cut] + bad)
    wait_for(lambda: metric(lost, CONSUMED) >= 3_000, 90, "the non-writer to be busy")
    lost.kill()  # the host is gone, with its disk: the replacement starts empty

    replacement = non_writer(stack, new_dir, **small).start()
    joining = non_writer(stack, joining_dir, **small).start()
    rest = records[cut:]
    publish(stack, rest[: len(rest) // 2])
    wait_group([writer, replacement, joining], timeout=120)
    publish(stack, rest[len(rest) // 2 :])  # every partition gets some after the join
    wait_billed(stack, truth, timeout=150)

    assert metric(replacement, CONSUMED) > 0 and metric(joining, CONSUMED) > 0
    assert metric(writer, APPLIED) > 0
    # one point per request over every host's raw files, the lost host's included
    assert_raw_points_exact([stack.db_path.parent, lost_dir, new_dir, joining_dir], events)
    assert raw_lines(new_dir) and raw_lines(joining_dir)
    assert_no_sqlite(lost_dir)
    assert_no_sqlite(new_dir, replacement)
    assert_no_sqlite(joining_dir, joining)
    assert dead_letters(stack, bad) == {value for value, _, _ in bad}
    assert writer.alive() and replacement.alive() and joining.alive()


# 3 -------------------------------------------------------------------------------------


def test_writer_sigkill_and_restart_applies_no_partial_twice(stack: Stack, tmp_path: Path) -> None:
    events = past_events((7, 6, 5), 40_000, "three")
    records, _ = spread(events, 0.12, seed=3)
    truth = ground_truth(events)
    small = {"BATCH_MAX_EVENTS": "4000"}

    writer = stack.worker(**small)
    other_dir = tmp_path / "host-b"
    other = non_writer(stack, other_dir, **small)
    writer.start()
    other.start()
    wait_group([writer, other])

    half = len(records) // 2
    publish(stack, records[:half])
    wait_for(
        lambda: metric(writer, CONSUMED) >= 3_000 and metric(other, CONSUMED) >= 3_000,
        90,
        "both workers to be busy",
    )
    writer.kill()
    # aggregates keep coming while the writer is down
    publish(stack, records[half:])
    restarted = stack.worker(**small).start()  # the same DATA_DIR: the same summary DB
    restarted.wait_assigned()
    wait_billed(stack, truth, timeout=150)  # a partial applied twice would show here

    # the second half's aggregates were produced after the kill: the restart applied them
    assert metric(restarted, APPLIED) > 0
    assert_no_sqlite(other_dir, other)
    assert restarted.alive() and other.alive()


# 4 -------------------------------------------------------------------------------------


def homed_events(tag: str, partition: int, moments: list[int], seed: int) -> list[dict]:
    rng = random.Random(seed)
    ids = homed(tag, partition, len(moments))
    return [make_event(rid, moment, rng) for rid, moment in zip(ids, moments, strict=True)]


def at_home(events: list[dict]) -> list[Record]:
    """Keyed by request_id, on its home partition."""
    return [(orjson.dumps(e), e["request_id"].encode(), home(e["request_id"])) for e in events]


def revision(stack: Stack, key: tuple) -> int:
    sql = (
        "SELECT revision FROM usage_daily WHERE client_org_id = ? AND user_id = ?"
        " AND model = ? AND usage_date = ?"
    )
    return stack.query(sql, key)[0][0]


def late_count(stack: Stack, day: str) -> int:
    sql = (
        "SELECT COALESCE(SUM(late_events), 0) FROM batch_runs"
        " WHERE kind = 'rollup' AND processing_date = ?"
    )
    return stack.query(sql, (day,))[0][0]


def requests_on(stack: Stack, day: str, table: str = "usage_daily") -> int | None:
    sql = f"SELECT COALESCE(SUM(requests), 0) FROM {table} WHERE usage_date = ?"
    return scalar(stack, sql, (day,))


def test_days_close_across_hosts_by_watermark_and_wall_clock_and_reopen(
    stack: Stack, tmp_path: Path
) -> None:
    # The watermark case needs a date the wall clock will not close during the test and
    # events past its close that are valid (at most 24 h ahead). Yesterday, with a grace
    # that puts its close an hour from now, works at any time of day and across DST
    # changes: the events that close it are an hour ahead, whatever the hour.
    now_ms = int(time.time() * 1000)
    today = datetime.fromtimestamp(now_ms / 1000, WARSAW).date()
    yesterday = today - timedelta(days=1)
    old_day = today - timedelta(days=3)
    grace = -(-(now_ms + 3_600_000 - local_midnight_ms(today)) // 1000)  # 1-26 h, rounded up
    close_ms = local_midnight_ms(today) + grace * 1000  # yesterday's close: >= now + 1 h
    ahead_ms = close_ms + 4_000
    ahead_day = datetime.fromtimestamp(ahead_ms / 1000, WARSAW).date()  # today or tomorrow
    # the wall clock closes the day 3 days ago at once (its close is over 20 h ago)
    assert local_midnight_ms(old_day + timedelta(days=1)) + grace * 1000 < now_ms
    env = {"WINDOW_GRACE_SECONDS": str(grace)}
    writer = stack.worker(**env)
    other_dir = tmp_path / "host-b"
    other = non_writer(stack, other_dir, **env)
    writer.start()
    other.start()
    wait_group([writer, other])
    everything: list[dict] = []

    # (b) by the wall clock: a day 3 days ago, on one partition only (its watermark stays
    # inside that day, so only the wall clock can close it)
    start = local_midnight_ms(old_day)
    length = local_midnight_ms(old_day + timedelta(days=1)) - start  # 23, 24 or 25 h
    rng = random.Random(4)
    old = homed_events("old", 0, [start + rng.randrange(length) for _ in range(100)], 5)
    publish(stack, at_home(old))
    everything += old
    wait_for(
        lambda: old_day.isoformat() in closed_days(stack),
        60,
        "the day 3 days ago to close by the wall clock",
    )
    wait_for(lambda: requests_on(stack, old_day.isoformat()) == 100, 30, "its 100 requests")
    assert daily(stack, where="WHERE usage_date = ?", params=(old_day.isoformat(),)) == on_day(
        ground_truth(everything), old_day
    )

    # (a) by the watermark: yesterday on all four partitions ...
    day = yesterday.isoformat()
    midnight = local_midnight_ms(yesterday)
    span = local_midnight_ms(today) - midnight  # 23, 24 or 25 h
    day_events: list[dict] = []
    for partition in range(PARTITIONS):
        moments = [midnight + rng.randrange(span) for _ in range(50)]
        day_events += homed_events(f"day-p{partition}", partition, moments, 10 + partition)
    publish(stack, at_home(day_events))
    everything += day_events
    wait_for(lambda: requests_on(stack, day, "usage_daily_live") == 200, 60, "yesterday's rows")
    assert day not in closed_days(stack)

    # ... then events past its close on three partitions: the fourth holds it open
    def ahead(partition: int, seed: int) -> list[dict]:
        return homed_events(
            f"ahead-p{partition}", partition, [ahead_ms + i for i in range(30)], seed
        )

    three = [event for partition in range(3) for event in ahead(partition, 20 + partition)]
    publish(stack, at_home(three))
    everything += three
    later = ahead_day.isoformat()
    wait_for(
        lambda: requests_on(stack, later, "usage_daily_live") == 90,
        60,
        "the events ahead of three partitions to reach the writer",
    )
    held_until = time.monotonic() + 4  # eight rollup intervals
    while time.monotonic() < held_until:
        assert day not in closed_days(stack), "yesterday closed while partition 3 lags"
        assert requests_on(stack, day) == 0
        finals = stack.query(
            "SELECT DISTINCT final FROM usage_daily_live WHERE usage_date = ?", (day,)
        )
        assert finals == [(0,)]
        time.sleep(0.25)

    fourth = ahead(3, 23)
    publish(stack, at_home(fourth))
    everything += fourth
    wait_for(lambda: day in closed_days(stack), 30, "yesterday to close by the watermark")
    assert time.time() * 1000 < close_ms, "the wall clock could have closed it"
    wait_for(lambda: requests_on(stack, day) == 200, 30, "yesterday's rows in usage_daily")
    truth = ground_truth(everything)
    assert daily(stack, where="WHERE usage_date = ?", params=(day,)) == on_day(truth, yesterday)
    assert stack.query(
        "SELECT DISTINCT final FROM usage_daily_live WHERE usage_date = ?", (day,)
    ) == [(1,)]
    assert later not in closed_days(stack)
    assert daily(stack, "usage_daily_live", "WHERE usage_date = ?", (later,)) == on_day(
        truth, ahead_day
    )

    # (c) late events for both closed days, read by the non-writer, re-open them
    owned = sorted(assigned(other))
    assert owned, "the non-writer holds no partition"
    late: list[dict] = []
    for n, (template, closed) in enumerate(((day_events[7], yesterday), (old[3], old_day))):
        rid = homed(f"late{n}", owned[n % len(owned)], 1)[0]
        moment = local_midnight_ms(closed) + 3_600_000 + n
        late.append({**template, "request_id": rid, "timestamp": moment, "cost_usd": "0.5"})
    keys = [
        (e["client_org_id"], e["user_id"], e["model"], d.isoformat())
        for e, d in zip(late, (yesterday, old_day), strict=True)
    ]
    revisions = [revision(stack, key) for key in keys]
    late_before = [late_count(stack, key[3]) for key in keys]
    records = at_home(late)
    # and a copy of each elsewhere, unkeyed: still one event
    records += [(value, None, (p + 1) % PARTITIONS) for value, _, p in records]
    publish(stack, records)
    everything += late
    truth = ground_truth(everything)
    for key, count in zip(keys, (200, 100), strict=True):
        wait_for(lambda k=key, c=count: requests_on(stack, k[3]) == c + 1, 60, f"late on {key}")
        wait_for(lambda k=key: k[3] in closed_days(stack), 30, f"{key[3]} closed again")
    time.sleep(2)
    for key, before, runs_before in zip(keys, revisions, late_before, strict=True):
        day_truth = on_day(truth, key[3])
        assert daily(stack, where="WHERE usage_date = ?", params=(key[3],)) == day_truth
        assert daily(stack, "usage_daily_live", "WHERE usage_date = ?", (key[3],)) == day_truth
        assert revision(stack, key) > before
        wait_for(
            lambda d=key[3], b=runs_before: late_count(stack, d) >= b + 1,
            30,
            f"batch_runs.late_events for {key[3]}",
        )
    assert_no_sqlite(other_dir, other)
    assert writer.alive() and other.alive()


# 5 -------------------------------------------------------------------------------------


def test_non_writer_creates_a_missing_nested_data_dir(stack: Stack, tmp_path: Path) -> None:
    """A new host's DATA_DIR need not exist: the worker creates it with its parents (Faust
    creates its own data dir, DATA_DIR/faust-<port>, without parents: a non-writer, which
    opens nothing there first, crashed at start). A path that cannot be created stops the
    worker with one line naming the setting."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    refused = stack.cli(
        "worker", DATA_DIR=str(blocker / "data"), SUMMARY_WRITER="false", timeout=60
    )
    err = refused.stderr.decode()
    assert refused.returncode == 1, err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        f"usage-stream: DATA_DIR: cannot create {blocker / 'data'}: Not a directory"
    ]

    events = past_events((2,), 2_000, "five")
    records, _ = spread(events, 0.1, seed=5)
    writer = stack.worker()
    host = tmp_path / "host-b"
    nested = host / "not" / "there" / "yet"
    other = stack.worker(DATA_DIR=str(nested), SUMMARY_WRITER="false")
    writer.start()
    other.start()
    wait_group([writer, other])
    assert nested.is_dir()
    assert (nested / f"faust-{other.env['WEB_PORT']}").is_dir()

    publish(stack, records)
    wait_billed(stack, ground_truth(events), timeout=90)
    assert metric(other, CONSUMED) > 0
    assert raw_lines(nested)
    assert_raw_points_exact([stack.db_path.parent, nested], events)
    assert_no_sqlite(host, other)
    assert writer.alive() and other.alive()
