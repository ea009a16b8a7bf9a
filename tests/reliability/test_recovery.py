"""Disaster recovery, tried as an operator would, on real processes.

* ``usage-stream backup`` taken mid-run and copied back: the writer catches up from the
  log and the totals are exact.
* A replay after the backup: the restored DB meets the replay's fences and completes it
  from the result the replay published (agents/replay/results.py) instead of waiting
  for ever; so does a DB lost outright and rebuilt from the log.
* A replay whose range retention already cut refuses with one line, unless
  ``--allow-partial`` (the test broker on S3 storage, its first batch objects deleted:
  the partition then begins past them, as after retention).
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections import Counter
from datetime import date, timedelta
from pathlib import Path

import boto3
import orjson

from tests.ground_truth import local_midnight_ms
from tests.harness import Stack, http_get, wait_for
from tests.reliability.test_broker_restart import MotoS3, s3_stack  # noqa: F401 (fixture)

DAY = date.today() - timedelta(days=5)
Key = tuple[str, str, str, str]


def make(tag: str, count: int, day: date | None) -> list[dict]:
    """Events on local ``day`` (None: now)."""
    start = local_midnight_ms(day) if day else int(time.time() * 1000) - 60_000
    return [
        {
            "request_id": f"{tag}-{i}",
            "client_org_id": f"org-{i % 3}",
            "user_id": f"user-{i % 4}",
            "model": "openai/gpt-4o-mini",
            "input_tokens": 100 + i,
            "output_tokens": i % 17,
            "cost_usd": f"0.{i:09d}",
            "timestamp": start + (i * 7_919 if day else i) % 86_000_000,
        }
        for i in range(count)
    ]


def publish(stack: Stack, events: list[dict]) -> None:
    stack.publish([orjson.dumps(e) for e in events], [e["request_id"].encode() for e in events])


def truth(events: list[dict]) -> Counter[tuple]:
    """(client, user, model) -> summed (requests, input, output, raw nano) of a date."""
    sums: Counter[tuple] = Counter()
    for e in events:
        key = (e["client_org_id"], e["user_id"], e["model"])
        for index, value in enumerate(
            (1, e["input_tokens"], e["output_tokens"], int(e["cost_usd"].split(".")[1]))
        ):
            sums[(*key, index)] += value
    return sums


def billed_day(stack: Stack, day: date) -> Counter[tuple]:
    """What the summary DB bills for ``day``, closed rows and pending sums together."""
    sums: Counter[tuple] = Counter()
    for *key, requests, tokens_in, tokens_out, nano in stack.query(
        "SELECT client_org_id, user_id, model, requests, input_tokens, output_tokens,"
        " raw_cost_nano FROM usage_daily WHERE usage_date = ?1 UNION ALL"
        " SELECT k.client_org_id, k.user_id, k.model, p.requests, p.input_tokens,"
        " p.output_tokens, p.raw_cost_nano FROM daily_pending p JOIN summary_keys k"
        " USING (key_id) WHERE p.usage_date = ?1",
        (day.isoformat(),),
    ):
        for index, value in enumerate((requests, tokens_in, tokens_out, nano)):
            sums[(*key, index)] += value
    return +sums


def restore(stack: Stack, backup: Path | None) -> None:
    """The documented restore: the writer stopped, its WAL files removed, the copy put
    in place (or, ``None``, the DB lost outright)."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{stack.db_path}{suffix}").unlink(missing_ok=True)
    if backup is not None:
        shutil.copyfile(backup, stack.db_path)


def backup(stack: Stack, path: Path) -> None:
    done = stack.cli("backup", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().startswith("backed up "), done.stdout


def test_a_backup_taken_mid_run_restores_exactly(stack: Stack, tmp_path: Path) -> None:
    worker = stack.worker().start()
    worker.wait_assigned()
    events = make("past", 600, DAY) + make("now", 600, None)
    publish(stack, events[:400])
    wait_for(lambda: stack.billed_requests() >= 200, 60, "billing under way")
    publish(stack, events[400:800])
    backup(stack, tmp_path / "mid.db")  # while the writer applies
    publish(stack, events[800:])
    wait_for(lambda: stack.billed_requests() == 1200, 90, "everything billed")
    worker.kill()  # the worst stop: nothing flushed, the WAL left behind

    restore(stack, tmp_path / "mid.db")
    assert stack.billed_requests() < 1200  # the copy is of a moment before the end
    worker = stack.worker().start()
    wait_for(lambda: stack.billed_requests() == 1200, 90, "the restored DB catching up")
    time.sleep(2)
    assert stack.billed_requests() == 1200
    assert billed_day(stack, DAY) == truth(events[:600])
    assert worker.stop() == 0


def replay(stack: Stack, day: date, *extra: str) -> str:
    done = stack.cli("replay", "--date", day.isoformat(), *extra, timeout=180)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return done.stdout.decode()


def damaged_day_replayed(stack: Stack, tmp_path: Path) -> tuple[list[dict], Path]:
    """DAY billed, then damaged in usage_daily, a backup of that, then the replay that
    mends it; returns DAY's events and the backup."""
    worker = stack.worker().start()
    worker.wait_assigned()
    events = make("day", 400, DAY)
    publish(stack, events)
    wait_for(lambda: billed_day(stack, DAY) == truth(events), 90, "DAY billed")
    wait_for(
        lambda: (
            stack.query(
                "SELECT COUNT(*) FROM daily_pending WHERE usage_date = ?", (DAY.isoformat(),)
            )
            == [(0,)]
        ),
        60,
        "DAY merged into usage_daily",
    )
    with sqlite3.connect(stack.db_path, timeout=30) as conn:  # commits on leaving
        conn.execute(
            "UPDATE usage_daily SET requests = requests + 7 WHERE usage_date = ?",
            (DAY.isoformat(),),
        )
    assert billed_day(stack, DAY) != truth(events)
    backup(stack, tmp_path / "before-replay.db")
    replay(stack, DAY)
    assert billed_day(stack, DAY) == truth(events)
    return events, tmp_path / "before-replay.db"


def test_a_replay_survives_a_db_restored_from_before_it(stack: Stack, tmp_path: Path) -> None:
    events, copy = damaged_day_replayed(stack, tmp_path)
    later = make("later", 100, None)
    publish(stack, later)
    wait_for(lambda: stack.billed_requests() == 500, 60, "the later events")
    assert stack.workers[0].stop() == 0

    restore(stack, copy)  # damaged, and the replay unknown to it
    worker = stack.worker().start()
    # the writer meets the replay's fences, finds its result, completes it, goes on
    wait_for(lambda: stack.billed_requests() == 500, 150, "billing past the replay's fences")
    assert billed_day(stack, DAY) == truth(events)
    code, body = http_get(worker.web + "/ready")
    assert code == 200, body
    assert "completed replay" in worker.log_path.read_text()


def test_a_lost_db_is_rebuilt_from_the_log_replay_included(stack: Stack, tmp_path: Path) -> None:
    events, _ = damaged_day_replayed(stack, tmp_path)
    assert stack.workers[0].stop() == 0
    restore(stack, None)
    worker = stack.worker().start()
    started = time.monotonic()
    worker.wait_assigned()
    publish(stack, make("after", 100, None))
    wait_for(lambda: stack.billed_requests() == 500, 150, "the rebuilt DB billing on")
    print(f"rebuilt and billing new events after {time.monotonic() - started:.1f} s")
    assert billed_day(stack, DAY) == truth(events)
    assert worker.stop() == 0


def test_a_replay_whose_range_retention_cut_refuses_unless_allowed(
    s3_stack: Stack,  # noqa: F811
) -> None:
    stack = s3_stack
    worker = stack.worker().start()
    worker.wait_assigned()
    events = make("cut", 300, DAY)
    for start in range(0, 300, 50):  # several record batches per partition
        publish(stack, events[start : start + 50])
    wait_for(lambda: billed_day(stack, DAY) == truth(events), 90, "DAY billed")
    before = billed_day(stack, DAY)
    # retention, as the broker's storage sees it: partition 0's first batches deleted
    s3 = boto3.client(
        "s3",
        endpoint_url=stack.broker.env["AWS_ENDPOINT"],
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="eu-west-2",
    )
    prefix = f"clusters/tansu_cluster/topics/{stack.topic}/partitions/0000000000/records/"
    batches = sorted(
        item["Key"] for item in s3.list_objects_v2(Bucket=MotoS3.BUCKET, Prefix=prefix)["Contents"]
    )
    assert len(batches) >= 2
    s3.delete_object(Bucket=MotoS3.BUCKET, Key=batches[0])

    refused = stack.cli("replay", "--date", DAY.isoformat(), timeout=180)
    assert refused.returncode != 0
    lines = refused.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "retention already deleted part of" in lines[0], lines
    assert billed_day(stack, DAY) == before

    allowed = stack.cli("replay", "--date", DAY.isoformat(), "--allow-partial", timeout=180)
    assert allowed.returncode == 0, allowed.stderr.decode()
    assert "cut by retention" in allowed.stderr.decode()
    partial = billed_day(stack, DAY)
    requests = sum(v for (*_, index), v in partial.items() if index == 0)
    assert 0 < requests < len(events)
