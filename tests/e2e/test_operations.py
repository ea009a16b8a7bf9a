"""What an operator touches: HTTP endpoints, one-line errors, publish, open days, the v2 sink."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import orjson

from streams.kafka.broker import EmbeddedBroker
from tests.harness import Stack, http_get, wait_for
from tests.servers import victoria_metrics_server


def event(request_id: str, timestamp: int, **extra: object) -> dict:
    return {
        "request_id": request_id,
        "client_org_id": "org-1",
        "user_id": "user-1",
        "model": "openai/gpt-4o-mini",
        "input_tokens": 7,
        "output_tokens": 3,
        "cost_usd": "0.25",
        "timestamp": timestamp,
        **extra,
    }


def test_health_ready_status_and_an_open_day(stack: Stack, tmp_path: Path) -> None:
    worker = stack.worker().start()
    worker.wait_assigned()
    assert http_get(worker.web + "/health")[0] == 200
    assert worker.wait_ready() == {"ready": True, "phase": "consuming"}

    # an event of today stays in an open day: no summary row until the day closes
    now_ms = int(time.time() * 1000)
    stack.publish([orjson.dumps(event("today-1", now_ms))])
    wait_for(lambda: worker.status().get("open_days"), 60, "today to be an open day")
    status = worker.status()
    assert len(status["open_days"]) == 1
    assert sorted(status["assigned_partitions"]) == [0, 1, 2, 3]
    wait_for(lambda: worker.metrics().get("usage_stream_open_days") == 1, 30, "open_days 1")
    assert stack.query("SELECT COUNT(*) FROM usage_daily") == [(0,)]

    # everything consumed and committed: no lag on any partition of the usage topic
    def usage_lag() -> dict:
        lag = worker.status()["consumer_lag"]
        found = {k: v for k, v in lag.items() if k.startswith(stack.topic + "/")}
        return found if len(found) == 4 and set(found.values()) == {0} else {}

    wait_for(usage_lag, 30, "zero lag on 4 partitions")
    # only the source topic's partitions: never Faust's internal (leader) topic
    assert set(worker.status()["consumer_lag"]) == {f"{stack.topic}/{p}" for p in range(4)}

    # a closed day stays out of open_days, also while a late event for it is pending
    old_ms = now_ms - 3 * 86_400_000
    stack.publish([orjson.dumps(event("old-1", old_ms))])
    wait_for(lambda: stack.query("SELECT SUM(requests) FROM usage_daily") == [(1,)], 30, "billed")
    seen: list[str] = []

    def late_billed() -> bool:
        seen.extend(worker.status()["open_days"])
        return stack.query("SELECT SUM(requests) FROM usage_daily") == [(2,)]

    stack.publish([orjson.dumps(event("old-2", old_ms + 1))])
    wait_for(late_billed, 30, "the late event billed", step=0.02)
    assert set(seen) == set(status["open_days"])
    assert worker.status()["open_days"] == status["open_days"]

    # the summary DB locked by someone else: not ready, with the reason, still healthy
    blocker = sqlite3.connect(stack.db_path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        # the background check finds it within a probe interval and its 2 s lock wait
        code, body = wait_for(
            lambda: (r := http_get(worker.web + "/ready"))[0] == 503 and r, 15, "503"
        )
        # the reason names the DB and what is wrong with it (agents/web/health.py)
        reason = orjson.loads(body)["reasons"][0]
        assert reason.startswith(f"summary DB {stack.db_path} ") and "locked" in reason
        assert http_get(worker.web + "/health")[0] == 200
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    worker.wait_ready(15)


def test_ready_reports_an_unreachable_broker(stack: Stack, tmp_path: Path) -> None:
    own = EmbeddedBroker(log_path=tmp_path / "own-broker.log").start()
    try:
        worker = stack.worker(KAFKA_BROKER=own.url).start()
        worker.wait_ready()
    finally:
        own.stop()
    code, body = wait_for(
        lambda: (r := http_get(worker.web + "/ready"))[0] == 503 and r, 30, "ready to be 503"
    )
    assert orjson.loads(body)["reasons"][0].startswith(f"broker 127.0.0.1:{own.port} unreachable")
    assert http_get(worker.web + "/health")[0] == 200


def test_operator_mistakes_are_one_line_errors(stack: Stack, tmp_path: Path) -> None:
    bad = stack.cli("worker", USAGE_MARKUP_MULTIPLIER="lots")
    assert bad.returncode != 0
    assert bad.stderr.decode().strip().splitlines() == [
        "usage-stream: invalid setting USAGE_MARKUP_MULTIPLIER: not a decimal number"
    ]
    zone = stack.cli("worker", BUSINESS_TIMEZONE="Mars/Olympus")
    assert zone.returncode != 0
    assert (
        zone.stderr.decode().strip().startswith("usage-stream: invalid setting BUSINESS_TIMEZONE")
    )

    unreachable = stack.cli("worker", KAFKA_BROKER="kafka://127.0.0.1:9", timeout=120)
    assert unreachable.returncode != 0
    assert unreachable.stderr.decode().strip().splitlines() == [
        "usage-stream: Kafka broker unreachable at 127.0.0.1:9: KafkaConnectionError"
    ]

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    unwritable = stack.cli("worker", SUMMARY_DB_PATH=str(not_a_dir / "usage.db"))
    assert unwritable.returncode != 0
    (line,) = unwritable.stderr.decode().strip().splitlines()
    assert line.startswith("usage-stream: summary DB ") and "not writable" in line

    missing = stack.cli("publish", str(tmp_path / "nope.jsonl"))
    assert missing.returncode != 0
    assert missing.stderr.decode().strip().endswith("no such file: " + str(tmp_path / "nope.jsonl"))
    for result in (bad, zone, unreachable, unwritable, missing):
        assert b"Traceback" not in result.stderr


def test_publish_command_and_the_influxdb_v2_path(stack: Stack, tmp_path: Path) -> None:
    with victoria_metrics_server() as vm:
        worker = stack.worker(
            INFLUXDB_URL=vm.url,
            INFLUXDB_TOKEN="secret-token-value",
            INFLUXDB_ORG="org",
            INFLUXDB_BUCKET="usage",
        ).start()
        worker.wait_assigned()
        lines = [orjson.dumps(event(f"v2-{i}", 1_795_169_472_000 + i)) for i in range(25)]
        lines += lines[:5] + [b"{broken"]
        published = stack.cli("publish", "-", input=b"\n".join(lines) + b"\n")
        assert published.returncode == 0, published.stderr
        assert published.stdout.decode().strip() == f"sent 31 events to {stack.topic}"
        wait_for(
            lambda: worker.metrics().get("usage_stream_raw_points_written_total") == 25,
            60,
            "25 points written to VictoriaMetrics",
        )

        def exported() -> list[dict]:
            found = vm.export('{__name__="usage_tracking_input_tokens"}')
            return found if sum(len(s["values"]) for s in found) == 25 else []

        series = wait_for(exported, 30, "25 values exported by VictoriaMetrics")
        assert all(value == 7 for s in series for value in s["values"])
        assert {s["metric"]["client_org_id"] for s in series} == {"org-1"}
        assert worker.metrics()["usage_stream_events_duplicate_total"] == 5
        # the token never reaches the logs
        assert "secret-token-value" not in worker.log_path.read_text()
