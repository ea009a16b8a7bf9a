"""The README's first command: ``usage-stream dev --demo`` shows a bill within a minute,
reports what it does, and stops in order (producer, worker, broker) within seconds when
Ctrl-C hits its terminal's process group, without orphans, tracebacks or error spam."""

from __future__ import annotations

import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
from datetime import date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson

from streams.kafka.broker import free_port
from tests.harness import REPO, http_get, wait_for

STAMP = r"\[(\d\d):(\d\d):(\d\d)\.(\d{3})\]"


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


def gone(pid: int) -> bool:
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return True


def closed_day_rows(db: Path, today: date) -> int:
    """``usage_daily`` rows of days before today: only closed days are written there."""
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(
            "SELECT COUNT(*) FROM usage_daily WHERE usage_date < ?", (today.isoformat(),)
        ).fetchone()[0]
    except sqlite3.Error:  # not migrated yet
        return 0
    finally:
        conn.close()


def seconds_of(line: str) -> float:
    hours, minutes, seconds, millis = map(int, re.match(STAMP, line).groups())
    return hours * 3600 + minutes * 60 + seconds + millis / 1000


def test_dev_demo_shows_a_bill_within_a_minute_and_stops_in_order(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("INFLUXDB_", "KAFKA_"))},
        "DATA_DIR": str(data),
        "WEB_PORT": str(port),
        "NBP_API_URL": "http://127.0.0.1:9/api",
        "OPENROUTER_API_URL": "http://127.0.0.1:9/api/v1",
        "BUSINESS_TIMEZONE": "Europe/Warsaw",
        "PYTHONUNBUFFERED": "1",
    }
    started = time.monotonic()
    # its own session: SIGINT to the group below is what a terminal's Ctrl-C does
    dev = subprocess.Popen(
        [sys.executable, "-m", "agents", "dev", "--demo", "--rate", "300"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    output: list[str] = []
    reader = threading.Thread(
        target=lambda: output.extend(line.decode() for line in dev.stdout), daemon=True
    )
    reader.start()
    today = datetime.now(ZoneInfo("Europe/Warsaw")).date()
    exits: dict[int, float] = {}
    try:
        rows = wait_for(
            lambda: closed_day_rows(data / "usage.db", today), 60, "a closed day's usage_daily row"
        )
        assert rows > 0 and time.monotonic() - started < 60

        def status_lines() -> list[str]:
            return [line for line in output if re.search(r"\d+ events/s \| \d+ consumed", line)]

        wait_for(status_lines, 30, "a status line (every 10 s when not on a terminal)")
        children = children_of(dev.pid)
        assert len(children) == 2, children  # the broker and the worker
        names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children}
        (worker,) = [pid for pid, cmd in names.items() if b"agents\x00worker" in cmd]
        (broker,) = [pid for pid in children if pid != worker]
        worker_log = data / "worker.log"
        log_offset = worker_log.stat().st_size

        def watch() -> None:  # when each child disappears: the exit order
            deadline = time.monotonic() + 60
            while len(exits) < 2 and time.monotonic() < deadline:
                for pid in (worker, broker):
                    if pid not in exits and gone(pid):
                        exits[pid] = time.monotonic()
                time.sleep(0.005)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
    finally:
        interrupted = time.monotonic()
        os.killpg(dev.pid, signal.SIGINT)
        dev.wait(timeout=60)
        stop_seconds = time.monotonic() - interrupted
        reader.join(10)
    text = "".join(output)
    watcher.join(10)
    assert dev.returncode == 0, text
    assert stop_seconds < 10, text
    assert "Traceback" not in text and "Error" not in text, text

    # the banner ends with what to look at: a report command and the /usage URL
    banner = {
        found.group(1): found.group(2).strip()
        for line in output[:16]
        if (found := re.match(r"([a-z][a-z ]*):\s+(.*)", line))
    }
    for key in ("broker", "worker", "summaries", "raw points", "metrics", "demo", "query"):
        assert key in banner, text
    # the demo's budget and price-book rule, set before the worker started
    assert banner["budget"].startswith("org-1 10 USD a month, alerts at 50,80,100 %"), text
    assert banner["markup"].startswith(f"org-2 x1.5 from {today}, others x1.3"), text
    report_words = shlex.split(banner["report"])
    assignments = dict(word.split("=", 1) for word in report_words if "=" in word)
    command = [word for word in report_words if "=" not in word]
    assert Path(assignments["SUMMARY_DB_PATH"]) == data / "usage.db"
    assert Path(command[0]).name == "usage-stream" and command[1] == "report"
    yesterday = today - timedelta(days=1)
    assert command[2:] == ["--month", yesterday.strftime("%Y-%m"), "--detail"]
    url = urllib.parse.urlsplit(banner["usage"].split()[0])
    query = dict(urllib.parse.parse_qsl(url.query))
    assert (url.netloc, url.path) == (f"127.0.0.1:{port}", "/usage")
    assert query == {
        "client_org_id": "org-1",
        "from": (today - timedelta(days=3)).isoformat(),
        "to": today.isoformat(),
    }
    # ... and the printed command states the demo's closed days
    result = subprocess.run(
        [sys.executable, "-m", "agents", *command[1:], "--format", "json"],
        env={**env, **assignments},
        cwd=REPO,
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    statement = orjson.loads(result.stdout)
    assert {line["client_org_id"] for line in statement["clients"]} == {"org-1", "org-2", "org-3"}
    assert all(int(line["requests"]) > 0 for line in statement["detail"])

    # the stop: producer, then worker, then broker, each logged when done
    def stamped(what: str) -> str:
        found = [line for line in output if re.match(f"{STAMP} {what}", line)]
        assert found, f"no {what!r} line (a worker crash on SIGTERM exits non-zero):\n{text}"
        return found[0]

    steps = [
        stamped(what)
        for what in (
            r"stopping \(SIGINT\)",
            "producer stopped",
            "worker stopped: exit 0",
            "broker stopped",
        )
    ]
    assert [output.index(line) for line in steps] == sorted(output.index(line) for line in steps)
    times = [seconds_of(line) for line in steps]
    assert times == sorted(times), steps
    assert set(exits) == {worker, broker} and exits[worker] < exits[broker], exits
    assert re.search(r"stopped producer, worker and broker in \d+\.\d s", text), text
    # no connection-error spam from a worker whose broker went first
    after_stop = worker_log.read_bytes()[log_offset:].decode(errors="replace")
    assert "Unable connect" not in after_stop and "Traceback" not in after_stop, after_stop

    for pid in children:
        assert gone(pid)
    raw_files = list((data / "raw").glob("usage_tracking-*.lp"))
    assert raw_files and sum(len(f.read_text().splitlines()) for f in raw_files) > 100
    db = sqlite3.connect(data / "usage.db")
    try:
        past = db.execute(
            "SELECT COUNT(DISTINCT usage_date) FROM usage_daily WHERE usage_date < ?",
            (today.isoformat(),),
        ).fetchone()[0]
        budgets = db.execute("SELECT client_org_id, monthly_limit_nano FROM client_budgets")
        assert budgets.fetchall() == [("org-1", 10_000_000_000)]
        rules = db.execute(
            "SELECT client_org_id, model, multiplier, effective_from FROM markup_rules"
        )
        assert rules.fetchall() == [("org-2", None, "1.5", today.isoformat())]
        # org-2's open day is priced by its rule, its closed days and the others' by default
        priced = db.execute(
            "SELECT DISTINCT client_org_id, usage_date = ?, markup_multiplier"
            " FROM usage_daily_live",
            (today.isoformat(),),
        ).fetchall()
        assert {(client, bool(now)): x for client, now, x in priced} == {
            ("org-1", False): "1.3",
            ("org-1", True): "1.3",
            ("org-2", False): "1.3",
            ("org-2", True): "1.5",
            ("org-3", False): "1.3",
            ("org-3", True): "1.3",
        }
    finally:
        db.close()
    assert past >= 2  # three backfilled days; yesterday may wait for its grace hour
    code, _ = http_get(f"http://127.0.0.1:{port}/health")
    assert code == 0  # the worker's port is closed: nothing left running


def billed(db: Path) -> dict[tuple[str, str, str, str], int]:
    """Requests billed per (date, client, user, model): closed rows and pending sums."""
    if not db.exists():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        totals: dict[tuple[str, str, str, str], int] = {}
        for *key, requests in conn.execute(
            "SELECT usage_date, client_org_id, user_id, model, requests FROM usage_daily"
            " UNION ALL SELECT p.usage_date, k.client_org_id, k.user_id, k.model, p.requests"
            " FROM daily_pending p JOIN summary_keys k USING (key_id)"
        ):
            totals[tuple(key)] = totals.get(tuple(key), 0) + requests  # type: ignore[index]
        return totals
    except sqlite3.Error:
        return {}
    finally:
        conn.close()


def test_dev_run_twice_in_one_folder_keeps_the_first_bills_and_bills_the_second_run(
    tmp_path: Path,
) -> None:
    """A second ``usage-stream dev`` starts a new, empty broker under the DATA_DIR of the
    first: its offsets start at 0 again. The summary writer adopts the new log (its
    positions belong to the old one) instead of skipping the new events below them."""
    data = tmp_path / "data"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("INFLUXDB_", "KAFKA_"))},
        "DATA_DIR": str(data),
        "WEB_PORT": str(free_port()),
        "NBP_API_URL": "http://127.0.0.1:9/api",
        "OPENROUTER_API_URL": "http://127.0.0.1:9/api/v1",
        "PYTHONUNBUFFERED": "1",
    }
    db = data / "usage.db"
    runs: list[dict[tuple[str, str, str, str], int]] = []
    for run in range(2):
        dev = subprocess.Popen(
            [sys.executable, "-m", "agents", "dev", "--demo", "--rate", "200"],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            before = sum(runs[-1].values()) if runs else 0
            # the backfill alone is 3 x 300 events (a few of them copies or broken)
            wait_for(
                lambda before=before: sum(billed(db).values()) >= before + 1500,
                120,
                f"run {run}'s events billed",
            )
        finally:
            os.killpg(dev.pid, signal.SIGINT)
            assert dev.wait(timeout=60) == 0
        runs.append(billed(db))
    first, second = runs
    assert all(second.get(key, 0) >= requests for key, requests in first.items())
    log = (data / "worker.log").read_text()
    assert "following the new log from its start" in log
    assert "refus" not in log.lower()
