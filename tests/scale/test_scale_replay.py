"""Replay under scale-out (issue 9), on the real broker with real processes: worker
processes, the ``usage-stream replay`` command, SIGKILL.

A replay takes its date over from the live workers with a fence in every home
partition's batch log (agents/replay/fences.py); the summary writer waits at the fences
until the replay is complete. These tests check the two ways that can go wrong across
hosts: a replay that dies after fencing (the writer must wait, say so on /ready, and go
on once the date is replayed again), and a replay while a non-writer host and the
producers keep working. Totals are checked row by row against tests/ground_truth.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.procwatch import child_processes
from tests.harness import (
    REPO,
    Batch,
    Stack,
    Worker,
    http_get,
    live_traffic,
    wait_for,
)
from tests.scale.helpers import (
    PARTITIONS,
    Record,
    assert_no_sqlite,
    ground_truth,
    local_today,
    make_day,
    metric,
    non_writer,
    past_events,
    publish,
    spread,
    wait_billed,
    wait_group,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(200)]

CONSUMED = "usage_stream_events_consumed_total"
REDELIVERED = "usage_stream_partials_skipped_total{reason=redelivered}"


# The batch log, /ready, the summary DB ---------------------------------------------------


async def _read_log(stack: Stack) -> list[tuple[int, int, dict]]:
    topic = f"{stack.env['APP_ID']}-batch-log"
    consumer = AIOKafkaConsumer(
        bootstrap_servers=f"127.0.0.1:{stack.broker.port}", enable_auto_commit=False
    )
    await consumer.start()
    records: list[tuple[int, int, dict]] = []
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for tp, batch in (await consumer.getmany(timeout_ms=300)).items():
                records += [(tp.partition, r.offset, orjson.loads(r.value)) for r in batch]
            # the Fetch high watermark, not end_offsets() (wrong on Tansu)
            ends = [consumer.highwater(tp) for tp in tps]
            if None in ends:
                continue
            positions = [await consumer.position(tp) for tp in tps]
            if all(at >= end for at, end in zip(positions, ends, strict=True)):
                break
    finally:
        await consumer.stop()
    return records


def batch_log(stack: Stack) -> list[tuple[int, int, dict]]:
    """Every record of the batch log: (partition, offset, decoded JSON)."""
    return asyncio.run(_read_log(stack))


def fences_of(log: list[tuple[int, int, dict]], replay_id: str) -> dict[int, int]:
    """partition -> offset of the replay's fence."""
    return {
        partition: offset
        for partition, offset, record in log
        if record.get("type") == "fence" and record.get("replay_id") == replay_id
    }


def ready(worker: Worker) -> tuple[int, list[str]]:
    code, body = http_get(worker.web + "/ready")
    return code, (orjson.loads(body).get("reasons", []) if body else [])


def billed_by_date(stack: Stack) -> dict[str, int]:
    """Requests per usage date in the summary DB: in ``usage_daily`` or still pending."""
    rows = stack.query(
        "SELECT usage_date, SUM(requests) FROM (SELECT usage_date, requests FROM usage_daily"
        " UNION ALL SELECT usage_date, requests FROM daily_pending) GROUP BY usage_date"
    )
    return dict(rows)


def replay_statuses(stack: Stack) -> dict[str, str]:
    return dict(stack.query("SELECT replay_id, status FROM replay_runs"))


def kill_replay_after_fencing(stack: Stack, day: str) -> tuple[str, int]:
    """Run ``usage-stream replay --date day`` and SIGKILL it after it appended its fences
    and applied the batch log up to them, before its replace; return its id and how many
    reader processes it had (each leaves its dedupe file).

    How it is held there: as soon as the replay registers (``replay_runs`` row, status
    'fencing': its readers have read the topic and wait for the stretch up to the
    fences), this test stops the readers (SIGSTOP). The replay then appends its fences,
    applies the batch log and says so on stderr, and waits for its readers, which are
    stopped: it is killed there, and its readers with it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "agents", "replay", "--date", day],
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    watcher = sqlite3.connect(f"file:{stack.db_path}?mode=ro", uri=True, timeout=5)
    readers: list[int] = []
    try:

        def registered() -> str | None:
            if process.poll() is not None:
                out, err = process.communicate()
                raise AssertionError(f"replay ended ({process.returncode}): {out!r} {err!r}")
            row = watcher.execute(
                "SELECT replay_id FROM replay_runs WHERE status = 'fencing' AND usage_date = ?",
                (day,),
            ).fetchone()
            return row[0] if row else None

        replay_id = wait_for(registered, 60, "the replay to register", step=0.002)
        readers = child_processes(process.pid)
        assert readers, "the replay has no reader processes"
        for pid in readers:
            os.kill(pid, signal.SIGSTOP)
        assert replay_statuses(stack)[replay_id] == "fencing", "the replay was too quick"
        said: list[str] = []
        assert process.stderr is not None
        for line in iter(process.stderr.readline, b""):
            said.append(line.decode())
            if "fenced and applied up to the fences" in said[-1]:
                break
        else:
            raise AssertionError(f"the replay ended without fencing: {''.join(said)}")
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in readers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        watcher.close()
    assert process.returncode == -signal.SIGKILL
    return replay_id, len(readers)


# 1 -------------------------------------------------------------------------------------


def test_replay_killed_after_fencing_holds_the_writer_until_replayed_again(stack: Stack) -> None:
    today = local_today()
    day, other, third = (today - timedelta(days=n) for n in (4, 3, 5))
    replayed = day.isoformat()

    first = make_day(day, 1500, "a-d", 1) + make_day(other, 500, "a-e", 2)
    writer = stack.worker().start()
    writer.wait_assigned()
    publish(stack, spread(first, 0.1, seed=11)[0])
    wait_billed(stack, ground_truth(first), timeout=90)
    billed_before = billed_by_date(stack)

    # the worker stops (a deploy, a lost host); events keep coming, some of the date: the
    # replay reads them, so its fences lie past what the workers had read, and the
    # workers will leave those events of the date to the replay
    assert writer.stop() == 0
    second = make_day(day, 400, "b-d", 3) + make_day(other, 300, "b-e", 4)
    second_records = spread(second, 0.1, seed=12)[0]
    publish(stack, second_records)

    replay_id, readers = kill_replay_after_fencing(stack, replayed)
    log = batch_log(stack)
    fences = fences_of(log, replay_id)
    assert sorted(fences) == list(range(PARTITIONS))  # it died after fencing every partition
    assert replay_statuses(stack) == {replay_id: "fencing"}
    assert stack.query("SELECT COUNT(*) FROM batch_runs WHERE kind = 'replay'") == [(0,)]
    assert billed_by_date(stack) == billed_before  # the replace never committed
    # each reader's dedupe file stays
    assert len(list(stack.db_path.parent.glob(".replay-*"))) == readers

    # the worker comes back: its summary writer stops at the fences and /ready says why,
    # also after a restart, whatever the dead replay had applied
    writer = stack.worker().start()
    writer.wait_assigned()
    reason = f"summary writer waits for replay {replay_id} ({replayed})"
    wait_for(lambda: reason in ready(writer)[1], 60, "/ready to name the abandoned replay")
    assert ready(writer)[0] == 503

    # later batches of every date are read and logged past the fences, and not applied
    third_events = make_day(third, 300, "c-f", 5) + make_day(day, 200, "c-d", 6)
    third_records = spread(third_events, 0.1, seed=13)[0]
    publish(stack, third_records)
    expected = len(second_records) + len(third_records)
    wait_for(lambda: metric(writer, CONSUMED) >= expected, 60, f"{expected} records consumed")

    def logged_past_the_fences() -> bool:
        past = {
            p for p, offset, r in batch_log(stack) if r["type"] == "batch" and offset > fences[p]
        }
        return past == set(range(PARTITIONS))

    wait_for(logged_past_the_fences, 30, "batch-log records past every fence")
    held_until = time.monotonic() + 3  # six rollup intervals
    while time.monotonic() < held_until:
        assert billed_by_date(stack) == billed_before
        assert reason in ready(writer)[1]
        time.sleep(0.25)

    # a replay of another date would apply the log past the fences: refused, one line
    refused = stack.cli("replay", "--date", other.isoformat(), timeout=120)
    err = refused.stderr.decode()
    assert refused.returncode == 1 and "Traceback" not in err, err
    assert err.splitlines()[-1] == (
        f"usage-stream: replay {replay_id} of {replayed} has not finished (it is running, or"
        f" it stopped after fencing): run `usage-stream replay --date {replayed}` first;"
        " nothing changed"
    )
    assert sorted(fences_of(batch_log(stack), replay_id)) == list(range(PARTITIONS))
    assert len([r for r in batch_log(stack) if r[2]["type"] == "fence"]) == PARTITIONS
    # so the writer still waits, restarted or not
    assert writer.stop() == 0
    writer = stack.worker().start()
    writer.wait_assigned()
    wait_for(lambda: reason in ready(writer)[1], 60, "/ready to name it after a restart")
    time.sleep(2)
    assert billed_by_date(stack) == billed_before

    # the operator's answer: replay the date again; the writer goes on, nothing twice
    result = stack.cli("replay", "--date", replayed, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    everything = first + second + third_events
    wait_billed(stack, ground_truth(everything), timeout=60)
    wait_for(lambda: ready(writer)[0] == 200, 30, "/ready 200 once the date is replayed")
    runs = stack.query("SELECT usage_date, status FROM replay_runs ORDER BY started_at")
    # the dead one's row stays as it was left; the refused one failed
    assert runs == [(replayed, "fencing"), (other.isoformat(), "failed"), (replayed, "complete")]
    assert replay_statuses(stack)[replay_id] == "fencing"
    assert stack.query(
        "SELECT processing_date, success FROM batch_runs WHERE kind = 'replay' ORDER BY id"
    ) == [(other.isoformat(), 0), (replayed, 1)]
    # the writer met records the second replay had applied, and skipped them
    assert metric(writer, REDELIVERED) > 0
    # the second replay removed the dead one's dedupe file, and its own
    assert list(stack.db_path.parent.glob(".replay-*")) == []

    # and it goes on: later events of the replayed date (late now) and of another one
    fourth = make_day(day, 100, "d-d", 7) + make_day(other, 100, "d-e", 8)
    publish(stack, spread(fourth, 0.1, seed=14)[0])
    wait_billed(stack, ground_truth(everything + fourth), timeout=60)
    assert writer.alive()


# 2 -------------------------------------------------------------------------------------


def test_replay_while_a_non_writer_host_and_producers_keep_working(
    stack: Stack, tmp_path: Path
) -> None:
    today = local_today()
    day = today - timedelta(days=4)
    events = past_events((5, 4, 3), 3_000, "base")
    records: list[Record] = spread(events, 0.1, seed=21)[0]

    writer = stack.worker()
    host = tmp_path / "host-b"
    # a summary DB path nothing can open: a non-writer that tried would fail
    not_a_dir = tmp_path / "not-a-directory"
    not_a_dir.write_text("")
    other = non_writer(stack, host, SUMMARY_DB_PATH=str(not_a_dir / "usage.db"))
    writer.start()
    other.start()
    wait_group([writer, other])
    publish(stack, records)
    wait_billed(stack, ground_truth(events), timeout=90)
    consumed = [metric(writer, CONSUMED), metric(other, CONSUMED)]

    stop = threading.Event()
    published: list[dict] = []
    days = [day, today - timedelta(days=5), day, today - timedelta(days=3)]
    rng = random.Random(31)

    def batch(n: int) -> Batch:
        """New events of ``days`` in turn, with copies of their own and of earlier
        batches' events on other partitions, some unkeyed."""
        fresh = make_day(days[n % len(days)], 40, f"live{n}", 300 + n)
        records, _ = spread(fresh, 0.1, seed=400 + n)
        for event in rng.sample(published, min(3, len(published))):
            records.append((orjson.dumps(event), None, rng.randrange(PARTITIONS)))
        return fresh, records

    traffic = live_traffic(stack.broker, stack.topic, batch, stop, published)
    try:
        wait_for(lambda: len(published) >= 80, 30, "live traffic")
        before = len(published)
        result = stack.cli("replay", "--date", day.isoformat(), timeout=120)
        during = len(published)
        time.sleep(1)  # and on after it
    finally:
        stop.set()
        traffic.join(60)
    assert result.returncode == 0, result.stderr.decode()
    # producers were sending before, during and after the replay
    assert before < during < len(published)
    assert f"replay {day}: " in result.stdout.decode()

    everything = events + published
    wait_billed(stack, ground_truth(everything), timeout=90)
    # both hosts consumed the live traffic
    assert metric(writer, CONSUMED) > consumed[0] and metric(other, CONSUMED) > consumed[1]
    ((replay_id, status),) = stack.query("SELECT replay_id, status FROM replay_runs")
    assert status == "complete"
    assert sorted(fences_of(batch_log(stack), replay_id)) == list(range(PARTITIONS))
    runs = stack.query(
        "SELECT processing_date, success, records_processed > 0, error FROM batch_runs"
        " WHERE kind = 'replay'"
    )
    assert runs == [(day.isoformat(), 1, 1, None)]
    # the non-writer never opened a summary DB: not its path, nor any file like one
    assert not_a_dir.is_file()
    assert_no_sqlite(host, other)
    assert str(not_a_dir) not in other.log_path.read_text()
    assert writer.alive() and other.alive()
