"""The README's first command: ``usage-stream dev --demo`` runs and stops without orphans."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from streams.broker import free_port
from tests.harness import REPO, http_get, wait_for


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def test_dev_demo_runs_the_pipeline_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("INFLUXDB_", "KAFKA_"))},
        "DATA_DIR": str(tmp_path / "data"),
        "WEB_PORT": str(port),
        "NBP_API_URL": "http://127.0.0.1:9/api",
        "OPENROUTER_API_URL": "http://127.0.0.1:9/api/v1",
        "PYTHONUNBUFFERED": "1",
    }
    dev = subprocess.Popen(
        [sys.executable, "-m", "streams", "dev", "--demo", "--rate", "300"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:

        def written() -> float:
            code, body = http_get(f"http://127.0.0.1:{port}/metrics")
            if code != 200:
                return 0
            for line in body.decode().splitlines():
                if line.startswith("usage_stream_raw_points_written_total "):
                    return float(line.split()[1])
            return 0

        wait_for(lambda: written() > 100, 120, "the demo's raw points")
        children = children_of(dev.pid)
        assert len(children) == 2  # the broker and the worker
        time.sleep(1)
    finally:
        dev.send_signal(signal.SIGINT)
        output, _ = dev.communicate(timeout=90)
    text = output.decode()
    assert dev.returncode == 0, text
    for expected in (
        "broker:",
        "summaries:",
        "raw points:",
        "metrics:",
        "stopped broker and worker",
    ):
        assert expected in text, text
    for pid in children:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        )
    raw_files = list((tmp_path / "data" / "raw").glob("usage_tracking-*.lp"))
    assert raw_files and sum(len(f.read_text().splitlines()) for f in raw_files) > 100
    db = sqlite3.connect(tmp_path / "data" / "usage.db")
    try:
        assert db.execute("SELECT COUNT(*) FROM usage_events").fetchone()[0] > 100
    finally:
        db.close()
