"""``usage-stream replay`` on the real broker with real worker processes.

Ground truth is computed here, independently of the pipeline (Decimal, half-even, markup
1.3, the NBP rate of the day before, estimated costs from the seeded prices). The worker
bills several past days (duplicates on other partitions, late events, Kafka timestamps far
from the event times, invalid messages); then a day is damaged in ``usage_daily``,
and the replay must restore exactly that day and touch nothing else.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from agents.replay.topic_slice import choose_start, parse_from_offsets
from bench.procwatch import child_processes
from streams.clients.nbp import NbpRate
from streams.clients.openrouter import ModelPrice
from streams.kafka.broker import EmbeddedBroker, ensure_topics, free_port
from streams.model.partitioning import home_partition
from streams.settings import load_settings
from tables.summary_db.reference import store_model_prices, store_nbp_rates
from tables.summary_db.schema import connect
from tests.ground_truth import WARSAW, local_midnight_ms, on_day
from tests.ground_truth import ground_truth as expected_rows
from tests.harness import REPO, Batch, Stack, event_ms, live_traffic, wait_for

DAY = date.today() - timedelta(days=10)  # the replayed date; every test day is in the past
PRICES = {
    "openai/gpt-4o-mini": (Decimal("0.00000015"), Decimal("0.0000006"), Decimal("0")),
    "anthropic/claude-3.5-sonnet": (Decimal("0.000003"), Decimal("0.000015"), Decimal("0.0001")),
}
MODELS = [*PRICES, "mystery/model-without-price"]  # no price: estimated at 0
# a (synthetic) NBP table for every day around DAY, so each date's rate is the previous day's
RATES = {
    DAY + timedelta(days=k): (f"{300 + k}/A/NBP/2026", Decimal("3.6") + Decimal(k + 9) / 73)
    for k in range(-9, 10)
}
RATES = {d: (no, mid.quantize(Decimal("0.0001"))) for d, (no, mid) in RATES.items()}

DAILY_COLUMNS = (
    "input_tokens, output_tokens, total_tokens, requests, estimated_requests, raw_cost_nano,"
    " markup_cost_nano, markup_cost_pln_nano, raw_cost_usd, markup_cost_usd, markup_cost_pln,"
    " usd_pln_rate, nbp_table_no"
)


# Test data and ground truth --------------------------------------------------------------


def make_events(day: date, count: int, tag: str, seed: int) -> list[dict]:
    """``count`` events with event times on local date ``day`` (both edges included)."""
    rng = random.Random(seed)
    start = local_midnight_ms(day)
    length = local_midnight_ms(day + timedelta(days=1)) - start
    events = []
    for i in range(count):
        if i == 0:
            moment = start  # 00:00:00.000 local
        elif i == 1:
            moment = start + length - 1  # 23:59:59.999 local
        else:
            moment = start + rng.randrange(length)
        kind = i % 4
        event: dict = {
            "request_id": f"{tag}-{i}",
            "client_org_id": f"org-{rng.randrange(4)}",
            "user_id": f"user-{rng.randrange(3)}",
            "model": rng.choice(MODELS),
            "input_tokens": rng.randrange(0, 4000),
            "output_tokens": rng.randrange(0, 1500),
        }
        if kind == 0:
            event["cost_usd"] = f"0.{rng.randrange(10**12):012d}"  # rounds to the nano
        elif kind == 1:
            event["cost_usd"] = rng.randrange(10**9) / 10**11  # a JSON number
        elif kind == 2:
            event["cost_usd"] = str(rng.randrange(3))
        # kind 3: no cost_usd, estimated from the stored price
        if i % 3 == 0:
            event["timestamp"] = moment
        else:
            local = datetime.fromtimestamp(moment / 1000, UTC)
            if i % 3 == 2:
                local = local.astimezone(WARSAW)
            event["timestamp"] = local.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        events.append(event)
    return events


def rate_for(day: date) -> tuple[str, Decimal] | None:
    """The seeded table of the day before (every day around DAY has one)."""
    return RATES.get(day - timedelta(days=1))


def ground_truth(events: list[dict]) -> dict[tuple, tuple]:
    """Expected ``usage_daily`` rows (key → DAILY_COLUMNS) of unique events (first copy),
    with the seeded prices and rates (tests/ground_truth.py)."""
    return dict(expected_rows(events, PRICES, rate_for))


# Stack helpers -------------------------------------------------------------------------

Record = tuple[bytes, bytes | None, int, int]  # value, key, partition, Kafka timestamp ms


async def _send(broker: EmbeddedBroker, topic: str, records: list[Record]) -> list[tuple]:
    producer = AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{broker.port}", linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, value, key=key, partition=partition, timestamp_ms=ts)
            for value, key, partition, ts in records
        ]
        return [(meta.partition, meta.offset) for meta in [await f for f in futures]]
    finally:
        await producer.stop()


def send(stack: Stack, records: list[Record]) -> list[tuple[int, int]]:
    """Produce with explicit partitions and Kafka timestamps; returns (partition, offset)."""
    return asyncio.run(_send(stack.broker, stack.topic, records))


def rec(event: dict, partition: int, ts: int | None = None, key: bytes | None = b"") -> Record:
    return (
        orjson.dumps(event),
        event["request_id"].encode() if key == b"" else key,
        partition,
        event_ms(event) if ts is None else ts,
    )


def seed_reference(stack: Stack) -> None:
    async def store() -> None:
        conn = await connect(stack.db_path)
        try:
            await store_nbp_rates(
                conn,
                [NbpRate("USD", d, no, mid) for d, (no, mid) in RATES.items()],
                covered=(min(RATES), max(RATES)),
            )
            await store_model_prices(
                conn, [ModelPrice(model, *price) for model, price in PRICES.items()]
            )
        finally:
            await conn.close()

    asyncio.run(store())


def actual(stack: Stack) -> dict[tuple, tuple]:
    rows = stack.query(
        f"SELECT client_org_id, user_id, model, usage_date, {DAILY_COLUMNS} FROM usage_daily"
    )
    return {tuple(row[:4]): tuple(row[4:]) for row in rows}


def table(stack: Stack, name: str, where: str = "", params: tuple = ()) -> list[tuple]:
    order = "1" if name in ("closed_days", "batch_runs") else "1, 2, 3, 4"
    return stack.query(f"SELECT * FROM {name} {where} ORDER BY {order}", params)


def dump(stack: Stack) -> dict[str, list[tuple]]:
    """Every table the replay may write, in full."""
    names = ("usage_daily", "closed_days", "daily_pending", "batch_runs", "replay_runs")
    return {name: table(stack, name) for name in names}


def settled(stack: Stack, unique: int) -> bool:
    try:
        (pending,) = stack.query("SELECT COUNT(*) FROM daily_pending")[0]
        (billed,) = stack.query("SELECT COALESCE(SUM(requests), 0) FROM usage_daily")[0]
    except Exception:  # noqa: BLE001 - DB not created yet
        return False
    return pending == 0 and billed == unique


def wait_settled(stack: Stack, unique: int, timeout: float = 90) -> None:
    wait_for(lambda: settled(stack, unique), timeout, f"{unique} unique events billed", 0.5)


def replay(stack: Stack, *args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    return stack.cli("replay", *args, **env)


def one_line_error(result: subprocess.CompletedProcess[bytes]) -> str:
    err = result.stderr.decode()
    assert result.returncode != 0, result
    assert "Traceback" not in err, err
    # progress lines may come first; the error is one line, the last one
    errors = [line for line in err.splitlines() if line.startswith("usage-stream: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


def plan(result: subprocess.CompletedProcess[bytes]) -> dict[int, tuple[int, int, str]]:
    """The replayed ranges from the command's plan line: {partition: (start, end, origin)}."""
    line = next(x for x in result.stderr.decode().splitlines() if x.startswith("replay "))
    found = re.findall(r"p(\d+) (\d+)\.\.(\d+)(?: \(([\w-]+)\))?", line.split(": ", 1)[1])
    return {int(p): (int(s), int(e), origin or "timestamp") for p, s, e, origin in found}


def read_count(result: subprocess.CompletedProcess[bytes]) -> int:
    return int(re.search(r"(\d+) records read", result.stdout.decode())[1])


# Pure parts ------------------------------------------------------------------------------


def test_start_offsets_and_from_offsets_parsing() -> None:
    # offsets_for_times answer, clamped to the beginning (retention); None = at the end
    assert choose_start(120, 100, None) == (120, "timestamp")
    assert choose_start(0, 100, None) == (100, "timestamp")  # Tansu's 0 / -1 answer
    assert choose_start(None, 100, None) == (None, "end")
    assert choose_start(None, 100, 150) == (150, "from-offsets")
    assert choose_start(120, 100, 7) == (100, "from-offsets")
    assert parse_from_offsets("0:15, 3:0") == {0: 15, 3: 0}
    for bad in ("", "x", "0:1,0:2", "-1:3", "1:2:3", "1:-2"):
        with pytest.raises(ValueError, match="--from-offsets"):
            parse_from_offsets(bad)


# End to end ------------------------------------------------------------------------------


def test_replay_restores_a_damaged_day_exactly_and_touches_nothing_else(stack: Stack) -> None:
    seed_reference(stack)
    worker = stack.worker().start()
    worker.wait_assigned()
    now = int(time.time() * 1000)

    # 1. earlier days first on every partition, Kafka timestamps = event times, so the
    #    replayed day starts in the middle of each partition's log
    earlier = make_events(DAY - timedelta(days=2), 200, "a", 1)
    earlier += make_events(DAY - timedelta(days=1), 200, "b", 2)
    sent = [rec(e, i % 4) for i, e in enumerate(earlier)]
    produced = send(stack, sent)

    # 2. the day and the next, interleaved; Kafka timestamps far from the event times
    #    (a backfill 3 days later, a producer clock 20 h early, or the wall clock);
    #    duplicates on other partitions, keyed by something else or by nothing; invalid ones
    day_events = make_events(DAY, 500, "d", 3)
    next_events = make_events(DAY + timedelta(days=1), 200, "n", 4)
    records: list[Record] = []
    for i, event in enumerate(day_events):
        skew = (0, 3 * 86_400_000, -20 * 3_600_000)[i % 3]
        records.append(rec(event, i % 4, event_ms(event) + skew))
        if i < len(next_events):
            records.append(rec(next_events[i], (i + 1) % 4, now))
    duplicated = day_events[::7]
    for j, event in enumerate(duplicated):
        original = day_events.index(event) % 4
        key = (None, b"not-the-request-id")[j % 2]
        records.append(rec(event, (original + 1 + j % 3) % 4, now, key=key))
    invalid = [
        b"not json at all",
        orjson.dumps({**day_events[5], "request_id": "bad-1", "input_tokens": -1}),
        orjson.dumps({**day_events[6], "request_id": "bad-2", "timestamp": now + 3 * 86_400_000}),
    ]
    records += [(value, None, k % 4, now) for k, value in enumerate(invalid)]
    produced += send(stack, records)
    sent += records
    valid = earlier + day_events + next_events + duplicated
    wait_settled(stack, len(earlier) + len(day_events) + len(next_events))

    # 3. late events for the closed day (and copies of earlier ones)
    late_before = worker.metrics()["usage_stream_events_late_total"]
    late = make_events(DAY, 40, "late", 5)
    late_records = [rec(e, i % 4, now) for i, e in enumerate(late)]
    late_records += [rec(e, (i + 2) % 4, now, key=None) for i, e in enumerate(day_events[1::25])]
    produced += send(stack, late_records)
    sent += late_records
    valid += late + day_events[1::25]
    unique = len(earlier) + len(day_events) + len(next_events) + len(late)
    wait_settled(stack, unique)
    assert worker.metrics()["usage_stream_events_late_total"] - late_before == len(late)
    truth = ground_truth(valid)
    assert actual(stack) == truth  # the live pipeline got it right; now damage the day
    per_partition = Counter(partition for partition, _ in produced)

    day = DAY.isoformat()
    other_days_daily = table(stack, "usage_daily", "WHERE usage_date != ?", (day,))
    before_damage = {
        row[:4]: row for row in table(stack, "usage_daily", "WHERE usage_date = ?", (day,))
    }
    keys = sorted(before_damage)
    deleted, altered = keys[:3], keys[3:7]
    row_sql = " WHERE client_org_id = ? AND user_id = ? AND model = ? AND usage_date = ?"
    copy_row = (
        "INSERT INTO usage_daily SELECT 'org-ghost', user_id, model, usage_date, input_tokens,"
        " output_tokens, total_tokens, requests, estimated_requests, raw_cost_nano,"
        " markup_cost_nano, markup_cost_pln_nano, raw_cost_usd, markup_cost_usd,"
        " markup_cost_pln, usd_pln_rate, nbp_table_no, revision, updated_at,"
        " markup_multiplier FROM usage_daily"
    )
    damage = [("DELETE FROM usage_daily" + row_sql, key) for key in deleted]
    damage += [
        ("UPDATE usage_daily SET requests = requests + 5" + row_sql, altered[0]),
        (
            "UPDATE usage_daily SET raw_cost_nano = raw_cost_nano + 7, markup_cost_nano = 1"
            + row_sql,
            altered[1],
        ),
        ("UPDATE usage_daily SET total_tokens = 0" + row_sql, altered[2]),
        ("UPDATE usage_daily SET usd_pln_rate = '9.9999'" + row_sql, altered[3]),
        (copy_row + row_sql, keys[8]),
    ]
    with sqlite3.connect(stack.db_path, timeout=30) as conn:
        for sql, params in damage:
            assert conn.execute(sql, params).rowcount == 1, sql
    ghost = ("org-ghost", *keys[8][1:])

    # dry run: reports every difference, writes nothing (not even batch_runs)
    snapshot = dump(stack)
    result = replay(stack, "--date", day, "--dry-run")
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert f"dry run {day}: would change 8 usage_daily rows (3 added, 1 removed, 4 changed)" in out
    for key in deleted:
        assert f"  added {' / '.join(key[:3])}: requests {before_damage[key][7]}," in out
    for key in altered:
        assert f"  changed {' / '.join(key[:3])}: requests " in out
    old_requests = before_damage[altered[0]][7]
    assert f"requests {old_requests + 5} -> {old_requests}," in out
    assert "(also usd_pln_rate)" in out
    assert f"  removed {' / '.join(ghost[:3])}: requests " in out
    assert "3 invalid" in out
    assert dump(stack) == snapshot

    # the replay restores exactly the ground truth of the day, and nothing else changes
    result = replay(stack, "--date", day)
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    ranges = plan(result)
    assert {p: end for p, (_, end, _) in ranges.items()} == dict(per_partition)
    assert read_count(result) == sum(end - start for start, end, _ in ranges.values())
    assert f"{len(day_events) + len(late)} unique events of {day}" in out
    assert f"{len(duplicated) + len(day_events[1::25])} duplicates, 3 invalid" in out
    assert actual(stack) == truth
    assert table(stack, "usage_daily", "WHERE usage_date != ?", (day,)) == other_days_daily
    after = {row[:4]: row for row in table(stack, "usage_daily", "WHERE usage_date = ?", (day,))}
    revision = 17  # column index of revision in SELECT *
    for key, row in after.items():
        if key in deleted:
            assert row[revision] == 1
        elif key in altered:
            assert row[revision] == before_damage[key][revision] + 1
        else:
            assert row == before_damage[key]  # untouched: same revision and updated_at
    (run,) = stack.query(
        "SELECT processing_date, success, records_processed, summaries_written,"
        " clients_processed, data_corrections, late_events, error FROM batch_runs"
        " WHERE kind = 'replay'"
    )
    clients = len({key[0] for key in after})
    assert run == (day, 1, read_count(result), 8, clients, 8, 0, None)
    assert stack.query("SELECT COUNT(*) FROM closed_days WHERE usage_date = ?", (day,)) == [(1,)]
    assert stack.query("SELECT COUNT(*) FROM daily_pending") == [(0,)]

    # replaying again changes nothing: same rows, same revisions and updated_at
    first = table(stack, "usage_daily")
    result = replay(stack, "--date", day)
    assert result.returncode == 0, result.stderr.decode()
    assert f"replay {day}: 0 usage_daily rows written (0 added, 0 removed, 0 changed" in (
        result.stdout.decode()
    )
    assert table(stack, "usage_daily") == first
    assert stack.query(
        "SELECT summaries_written, data_corrections FROM batch_runs WHERE kind = 'replay'"
        " ORDER BY id DESC LIMIT 1"
    ) == [(0, 0)]

    # --from-offsets: partition 0 read from its end, so nothing of it is re-read. A
    # request is then missing from the replay exactly when it is homed at partition 0 and
    # every copy of it was produced to partition 0 (a copy produced elsewhere reached
    # partition 0 through the rerouted topic, which is read in full).
    end_p0 = per_partition[0]
    result = replay(stack, "--date", day, "--from-offsets", f"0:{end_p0}")
    assert result.returncode == 0, result.stderr.decode()
    ranges = plan(result)
    assert ranges[0] == (end_p0, end_p0, "from-offsets")
    copies: dict[str, set[int]] = {}
    for value, _, partition, _ in sent:
        try:
            copies.setdefault(orjson.loads(value)["request_id"], set()).add(partition)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
    missing = {rid for rid, where in copies.items() if home_partition(rid, 4) == 0 and where == {0}}
    assert missing & {e["request_id"] for e in day_events + late}  # the case is exercised
    assert on_day(actual(stack), DAY) == on_day(
        ground_truth([e for e in valid if e["request_id"] not in missing]), DAY
    )
    # and a full replay puts it back
    assert replay(stack, "--date", day).returncode == 0
    assert actual(stack) == truth
    # however the partitions are dealt to reader processes, the totals are the same
    for readers in ("1", "3"):
        again = replay(stack, "--date", day, REPLAY_READERS=readers)
        assert again.returncode == 0, again.stderr.decode()
        assert f"replay {day}: 0 usage_daily rows written" in again.stdout.decode()
        assert actual(stack) == truth
    # every fence of these replays was passed: nothing waits
    assert stack.query("SELECT DISTINCT status FROM replay_runs") == [("complete",)]

    # operator mistakes: one line, non-zero exit, nothing written
    snapshot = table(stack, "usage_daily")
    quiet = DAY - timedelta(days=5)
    line = one_line_error(replay(stack, "--date", quiet.isoformat()))
    assert f"no events of {quiet}" in line and "nothing changed" in line
    assert stack.query(
        "SELECT success, error LIKE 'no events of%' FROM batch_runs ORDER BY id DESC LIMIT 1"
    ) == [(0, 1)]
    assert "not a valid calendar date" in one_line_error(replay(stack, "--date", "2026-02-30"))
    assert "YYYY-MM-DD" in one_line_error(replay(stack, "--date", "yesterday"))
    assert "required" in one_line_error(replay(stack))
    assert "no partition 9" in one_line_error(replay(stack, "--date", day, "--from-offsets", "9:0"))
    assert "past the end" in one_line_error(
        replay(stack, "--date", day, "--from-offsets", "1:99999")
    )
    assert table(stack, "usage_daily") == snapshot
    # the temporary dedupe files are gone
    assert not list(stack.db_path.parent.glob(".replay-*"))
    assert worker.alive()


def test_replay_errors_without_a_worker(stack: Stack, tmp_path: Path) -> None:
    day = DAY.isoformat()
    # the topic does not exist yet, and the replay must not create it
    line = one_line_error(replay(stack, "--date", day))
    assert f"topic {stack.topic} does not exist" in line

    async def topics() -> set[str]:
        consumer = AIOKafkaConsumer(bootstrap_servers=f"127.0.0.1:{stack.broker.port}")
        await consumer.start()
        try:
            return await consumer.topics()
        finally:
            await consumer.stop()

    assert stack.topic not in asyncio.run(topics())

    line = one_line_error(
        replay(stack, "--date", day, KAFKA_BROKER=f"kafka://127.0.0.1:{free_port()}")
    )
    assert "Kafka broker unreachable" in line

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    line = one_line_error(replay(stack, "--date", day, SUMMARY_DB_PATH=str(blocker / "usage.db")))
    assert "summary DB" in line

    # a topic with events of other days only: "no events", nothing written
    settings = load_settings(KAFKA_BROKER=stack.env["KAFKA_BROKER"], USAGE_TOPIC=stack.topic)
    asyncio.run(ensure_topics(settings))
    other = make_events(DAY - timedelta(days=1), 30, "o", 9)
    send(stack, [rec(e, i % 4) for i, e in enumerate(other)] + [(b"{", None, 0, 0)])
    line = one_line_error(replay(stack, "--date", day))
    assert f"no events of {day}" in line and "31 records read, 1 invalid" in line
    assert stack.query("SELECT COUNT(*) FROM usage_daily") == [(0,)]
    assert stack.query("SELECT COUNT(*) FROM replay_runs") == [(0,)]  # no fence appended
    # a dry run of a date with events works without any worker, and writes nothing
    result = replay(stack, "--date", (DAY - timedelta(days=1)).isoformat(), "--dry-run")
    assert result.returncode == 0, result.stderr.decode()
    assert "would change" in result.stdout.decode()
    assert stack.query("SELECT COUNT(*) FROM usage_daily") == [(0,)]
    assert stack.query("SELECT COUNT(*) FROM batch_runs WHERE success = 1") == [(0,)]


def test_replay_runs_alike_through_faust_cli(stack: Stack) -> None:
    """``usage-stream replay`` runs without Faust (its start-up is part of its time);
    Faust's CLI still lists it and runs it when global options come first."""
    day = DAY.isoformat()
    plain = one_line_error(replay(stack, "--date", day))
    through_faust = one_line_error(stack.cli("--loglevel", "warn", "replay", "--date", day))
    assert plain == through_faust and f"topic {stack.topic} does not exist" in plain
    assert one_line_error(replay(stack, "--date", "2026-02-30")).endswith(
        "'2026-02-30' is not a valid calendar date"
    )
    listed = stack.cli("--help")
    assert listed.returncode == 0 and b"replay" in listed.stdout
    usage = replay(stack, "--help")
    assert usage.returncode == 0, usage.stderr.decode()
    assert b"usage-stream replay" in usage.stdout and b"--from-offsets" in usage.stdout


def _replay_until_its_plan(stack: Stack) -> tuple[subprocess.Popen[bytes], list[str]]:
    """``usage-stream replay`` of DAY, started and followed until it prints its plan: its
    readers have fixed their slices and read."""
    process = subprocess.Popen(
        [sys.executable, "-m", "agents", "replay", "--date", DAY.isoformat()],
        env=stack.env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    said: list[str] = []
    for line in iter(process.stderr.readline, b""):
        said.append(line.decode())
        if said[-1].startswith(f"replay {DAY} from {stack.topic}:"):
            return process, said
    process.wait()
    raise AssertionError(f"no plan line: {''.join(said)}")


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody reaped yet (an orphan's)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_an_interrupted_replay_stops_its_readers_and_leaves_nothing(stack: Stack) -> None:
    """SIGTERM (or Ctrl-C) while the readers read: exit 130 with one line, the reader
    processes end, their dedupe files are removed, nothing is written. A replay killed
    outright (SIGKILL): its readers end on their own and remove their files too."""
    settings = load_settings(KAFKA_BROKER=stack.env["KAFKA_BROKER"], USAGE_TOPIC=stack.topic)
    asyncio.run(ensure_topics(settings))
    send(stack, [rec(e, i % 4) for i, e in enumerate(make_events(DAY, 400, "i", 11))])
    process, said = _replay_until_its_plan(stack)
    readers: list[int] = []
    try:
        # held mid-read: stopped until the replay has been told to stop
        readers = child_processes(process.pid)
        assert readers
        for pid in readers:
            os.kill(pid, signal.SIGSTOP)
        process.send_signal(signal.SIGTERM)
        for pid in readers:
            os.kill(pid, signal.SIGCONT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130
    lines = [*said, *err.decode().splitlines(keepends=True)]
    assert lines[-1].startswith("usage-stream: interrupted; nothing changed"), lines
    assert "Traceback" not in "".join(lines)
    for pid in readers:  # ended, and reaped by the replay
        assert not Path(f"/proc/{pid}").exists()
    assert not list(stack.db_path.parent.glob(".replay-*"))
    assert stack.query("SELECT COUNT(*) FROM usage_daily") == [(0,)]

    # SIGKILL: nobody tells the readers; they end when they next write to the dead
    # replay or wait for it, and unwind
    process, _ = _replay_until_its_plan(stack)
    readers = child_processes(process.pid)
    assert readers
    for pid in readers:  # alive when the replay dies
        os.kill(pid, signal.SIGSTOP)
    process.kill()
    process.wait()
    for pid in readers:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: all(_gone(pid) for pid in readers), 60, "the orphaned readers to end")
    wait_for(
        lambda: not list(stack.db_path.parent.glob(".replay-*")),
        10,
        "the orphaned readers' dedupe files to go",
    )
    assert stack.query("SELECT COUNT(*) FROM usage_daily") == [(0,)]


def test_replay_while_the_worker_runs(stack: Stack) -> None:
    seed_reference(stack)
    worker = stack.worker().start()
    worker.wait_assigned()
    rng = random.Random(21)
    events = make_events(DAY - timedelta(days=1), 1500, "p", 22)
    events += make_events(DAY, 3000, "d", 23)
    events += make_events(DAY + timedelta(days=1), 1500, "n", 24)
    rng.shuffle(events)
    copies = rng.sample(events, 600)
    now = int(time.time() * 1000)
    send(stack, [rec(e, rng.randrange(4), now, key=None) for e in events + copies])
    wait_settled(stack, len(events), timeout=120)

    # keep publishing new events for the replayed day and others during the replay
    stop = threading.Event()
    published: list[dict] = []
    days = [DAY, DAY, DAY - timedelta(days=1), DAY + timedelta(days=2)]

    def batch(n: int) -> Batch:
        fresh = make_events(days[n % 4], 40, f"live{n}", 100 + n)
        fresh += fresh[:5]  # and copies
        return fresh, [(orjson.dumps(e), None, i % 4) for i, e in enumerate(fresh)]

    publisher = live_traffic(stack.broker, stack.topic, batch, stop, published)
    try:
        process = subprocess.run(
            [sys.executable, "-m", "agents", "replay", "--date", DAY.isoformat()],
            env=stack.env,
            capture_output=True,
            timeout=120,
            cwd=REPO,
        )
    finally:
        stop.set()
        publisher.join(60)
    assert process.returncode == 0, process.stderr.decode()
    assert len(published) > 3 * 45  # the replay really overlapped with live traffic

    everything = events + copies + published
    unique = len({e["request_id"] for e in everything})
    wait_settled(stack, unique, timeout=120)
    assert actual(stack) == ground_truth(everything)
    assert stack.query("SELECT COUNT(*) FROM batch_runs WHERE kind = 'replay' AND success = 1") == [
        (1,)
    ]
    # the replay never joined the live group: the worker joined once and was never rebalanced
    group = stack.env["APP_ID"]
    assert worker.log_path.read_text().count(f"Joined group '{group}'") == 1
    assert worker.alive()
