"""InfluxDB refuses the writes for good (a missing database): billing goes on, the points
are set aside with an alert metric, and ``usage-stream raw-resend`` delivers them once."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.harness import Stack, wait_for
from tests.reliability.test_influx_outage import billed, influx_counts, usage
from tests.servers import influxd_server


def test_missing_database_billing_goes_on_and_raw_resend_delivers_once(stack: Stack) -> None:
    rejected_dir = Path(stack.env["DATA_DIR"]) / "spool" / "rejected"
    with influxd_server() as influx:  # no CREATE DATABASE: every write is a 404
        target = {"INFLUXDB_URL": influx.url, "INFLUXDB_DATABASE": "usage"}
        worker = stack.worker(**target).start()
        worker.wait_assigned()
        now_ms = int(time.time() * 1000)
        stack.publish([usage(f"rej-{i}", now_ms + i) for i in range(100)])
        # billed at once, while the shipper is still trying the first segment
        wait_for(
            lambda: billed(stack) == 100 and stack.records_committed() == 100, 20, "100 billed"
        )
        wait_for(
            lambda: worker.metrics()["usage_stream_raw_points_rejected_total"] == 100,
            40,
            "the first segment to be set aside",
        )
        # while the database is still missing: one attempt per segment, billing goes on
        stack.publish([usage(f"rej-{i}", now_ms + i) for i in range(100, 150)])
        stack.publish([usage(f"rej-{i}", now_ms) for i in range(10)])  # copies: billed once
        wait_for(lambda: billed(stack) == 150, 20, "150 billed")
        wait_for(
            lambda: worker.metrics()["usage_stream_raw_points_rejected_total"] == 150,
            30,
            "the next segment to be set aside",
        )
        metrics = worker.metrics()
        segments = sorted(rejected_dir.glob("*.lp"))
        assert metrics["usage_stream_raw_rejected_segments"] == len(segments) >= 2
        assert metrics["usage_stream_raw_spool_points"] == 0
        assert metrics["usage_stream_raw_sink_circuit_open"] == 0  # the server answers
        sidecar = json.loads(segments[0].with_suffix(".json").read_text())
        assert sidecar["http_status"] == 404 and sidecar["attempts"] == 5
        assert "database not found" in sidecar["reason"] and "\n" not in sidecar["reason"]
        log = worker.log_path.read_text()
        errors = [line for line in log.splitlines() if "refused" in line and "for good" in line]
        assert len(errors) == len(segments)
        assert "Traceback" not in log

        # raw-resend before the fix: one line per segment, non-zero exit, nothing moved
        failed = stack.cli("raw-resend", **target)
        out = failed.stdout.decode()
        assert failed.returncode != 0, out
        assert [line.startswith("FAILED ") for line in out.splitlines()] == [True] * len(
            segments
        ) + [False]
        assert "HTTP 404" in out
        assert failed.stderr.decode().strip().startswith("usage-stream: ")
        assert len(list(rejected_dir.glob("*.lp"))) == len(segments)

        influx.create_database("usage")
        dry = stack.cli("raw-resend", "--dry-run", **target)
        assert dry.returncode == 0 and "150 points" in dry.stdout.decode(), dry
        assert influx_counts(influx) == (0, 0)
        resent = stack.cli("raw-resend", **target)
        out = resent.stdout.decode()
        assert resent.returncode == 0, (out, resent.stderr)
        assert [line.startswith("resent ") for line in out.splitlines()] == [True] * len(
            segments
        ) + [False]
        assert f"{len(segments)} of {len(segments)} segments resent (150 points), 0 failed" in out
        assert influx_counts(influx) == (150, 150)
        assert list(rejected_dir.glob("*")) == [rejected_dir / ".resend.lock"]

        # the worker ships new points directly again, and the alert resolves
        stack.publish([usage(f"rej-{i}", now_ms + i) for i in range(150, 170)])
        wait_for(lambda: influx_counts(influx) == (170, 170), 30, "new points shipped")
        wait_for(
            lambda: worker.metrics()["usage_stream_raw_rejected_segments"] == 0,
            20,
            "the rejected-segments gauge to drop",
        )
        again = stack.cli("raw-resend", **target)  # idempotent: nothing left to do
        assert again.returncode == 0 and "nothing to resend" in again.stdout.decode()
        # every record read and committed, every request billed once
        wait_for(lambda: stack.records_committed() == 180, 20, "180 records committed")
        wait_for(lambda: billed(stack) == 170, 20, "170 billed")
        assert worker.alive()
