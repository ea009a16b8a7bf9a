"""Measure ``GET /v1/usage/query`` over a year of usage: a summary DB with one
``usage_daily`` row per key and day (default 50,000 keys: 50 clients x 100 users x 10
models, for 365 closed days and today's open ones), a real worker serving it on the
bundled broker, and timed HTTP requests. Measures; asserts nothing about speed (the
README quotes the last run).

    python tools/query_year.py [--days 365] [--keys 50000] [--db PATH] [--repeat 3]

``--db`` keeps the built DB (about 6 GB at the defaults) for a later run, which reuses it
when it already has the rows. The build writes with ``synchronous=OFF`` and a big page
cache: its speed is not the pipeline's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streams.kafka.broker import EmbeddedBroker, free_port  # noqa: E402

TZ = ZoneInfo("Europe/Warsaw")
USERS, MODELS = 100, 10  # per client; clients = keys / (USERS * MODELS)

_ROWS = """
WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < :keys - 1)
INSERT INTO {table} (client_org_id, user_id, model, usage_date, input_tokens, output_tokens,
    total_tokens, requests, estimated_requests, raw_cost_nano, markup_cost_nano,
    markup_cost_pln_nano, raw_cost_usd, markup_cost_usd, markup_cost_pln, usd_pln_rate,
    nbp_table_no, revision, updated_at, markup_multiplier)
SELECT 'org-' || (i / {per_client}), 'user-' || ((i / {models}) % {users}),
    'model-' || (i % {models}), :day,
    r * 900 + i % 97, r * 200 + i % 89, r * 1100 + i % 97 + i % 89, r, i % 2,
    c, c * 13 / 10, c * 13 / 10 * 4, c / 1e9, c * 13 / 10 / 1e9, c * 13 / 10 * 4 / 1e9,
    '4.0000', '001/A/NBP/2026', 1, :now, '1.3'
FROM (SELECT i, 1 + (i * 7 + :salt) % 40 AS r,
             (1 + (i * 7 + :salt) % 40) * (20000 + (i * 31 + :salt) % 900000) AS c FROM n)
"""


def build(db: Path, days: int, keys: int, today: date) -> float:
    """The DB with ``days`` closed days before ``today`` and today's open rows; seconds."""
    from tables.summary_db.schema import connect

    async def migrate() -> None:
        await (await connect(db)).close()

    asyncio.run(migrate())
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -4000000")  # 4 GB: the indexes stay in memory
    have = conn.execute("SELECT COUNT(*) FROM usage_daily").fetchone()[0]
    if have == days * keys:
        conn.close()
        return 0.0
    if have:
        raise SystemExit(f"{db} has {have} rows, not {days * keys}: remove it first")
    per_client = USERS * MODELS
    started = time.monotonic()
    now = datetime.now(TZ).isoformat()
    for table, offsets in (("usage_daily", range(days, 0, -1)), ("usage_daily_open", [0])):
        sql = _ROWS.format(table=table, per_client=per_client, models=MODELS, users=USERS)
        for back in offsets:
            day = today - timedelta(days=back)
            conn.execute("BEGIN")
            conn.execute(sql, {"keys": keys, "day": day.isoformat(), "now": now, "salt": back})
            conn.execute("COMMIT")
            if back % 30 == 0:
                print(f"  built {day} ({time.monotonic() - started:.0f} s)", flush=True)
    conn.execute(
        "INSERT INTO closed_days SELECT DISTINCT usage_date, ?, 'tools' FROM usage_daily", (now,)
    )
    conn.execute("ANALYZE")
    conn.close()
    return time.monotonic() - started


def get(url: str, accept: str | None = None) -> tuple[int, int, float]:
    """(status, body bytes, seconds) of one request."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    began = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            body = response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        body, status = error.read(), error.code
    except (urllib.error.URLError, OSError):  # not listening (yet)
        body, status = b"", 0
    return status, len(body), time.monotonic() - began


def assigned(base: str) -> bool:
    """The worker owns its partitions (its /status says so): it is consuming."""
    try:
        with urllib.request.urlopen(base + "/status", timeout=10) as response:
            return bool(json.loads(response.read()).get("assigned_partitions"))
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--keys", type=int, default=50_000)
    parser.add_argument("--db", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    if args.keys % (USERS * MODELS) and args.keys >= USERS * MODELS:
        parser.error(f"--keys must be a multiple of {USERS * MODELS}")
    workdir = Path(tempfile.mkdtemp(prefix="query-year-"))
    db = args.db or workdir / "usage.db"
    today = datetime.now(TZ).date()
    print(f"building {args.days} days x {args.keys} keys in {db}", flush=True)
    built = build(db, args.days, args.keys, today)
    print(f"built in {built:.0f} s; {db.stat().st_size / 1e9:.2f} GB", flush=True)

    port = free_port()
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("INFLUXDB_", "KAFKA_"))},
            "APP_ID": f"query-year-{port}",
            "KAFKA_BROKER": broker.url,
            "USAGE_TOPIC": f"query-year-{port}",
            "DATA_DIR": str(workdir / "data"),
            "SUMMARY_DB_PATH": str(db),
            "WEB_PORT": str(port),
            "KAFKA_SESSION_TIMEOUT_SECONDS": "10",
            "KAFKA_REBALANCE_TIMEOUT_SECONDS": "10",
            "KAFKA_HEARTBEAT_INTERVAL_SECONDS": "1",
            "RECOVERY_CONSISTENCY_CHECK": "false",
            "NBP_API_URL": "http://127.0.0.1:9/api",
            "OPENROUTER_API_URL": "http://127.0.0.1:9/api/v1",
        }
        with (workdir / "worker.log").open("ab") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "agents", "worker", "--loglevel", "info"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        try:
            results = measure(f"http://127.0.0.1:{port}", db, today, args, worker)
        finally:
            worker.terminate()
            worker.wait(60)
    report = {"days": args.days, "keys": args.keys, "build_seconds": built, "queries": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print(f"worker log: {workdir / 'worker.log'}")


def measure(base: str, db: Path, today: date, args, worker: subprocess.Popen) -> list[dict]:
    deadline = time.monotonic() + 300
    while not assigned(base):  # started all through (a stop mid-start is another test)
        if worker.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the worker did not start; see its log")
        time.sleep(0.5)
    # the first rollup passes close the year's months into statements: wait them out
    began = time.monotonic()
    due = today.replace(day=1) - timedelta(days=1 if today.day > 3 else 32)
    last_month = due.strftime("%Y-%m")  # the latest month due (STATEMENT_GRACE_DAYS 3)
    first_month = (today - timedelta(days=args.days)).strftime("%Y-%m")
    while last_month >= first_month:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
        closed = conn.execute("SELECT MAX(usage_month) FROM closed_months").fetchone()[0]
        conn.close()
        if closed is not None and closed >= last_month or time.monotonic() - began > 900:
            break
        time.sleep(1)
    print(f"statements of the year's months closed in {time.monotonic() - began:.0f} s")
    first = (today - timedelta(days=args.days)).isoformat()
    year = [("from", first), ("to", today.isoformat())]
    month = [("from", (today - timedelta(days=30)).isoformat()), ("to", today.isoformat())]
    clients = [("client_org_id", f"org-{n}") for n in range(10)]
    one = ("client_org_id", "org-7")
    per_month, total = ("granularity", "month"), ("granularity", "total")
    keys = ("group_by", "user_id,model")
    by_model, by_user = ("group_by", "model"), ("group_by", "user_id")
    cases = [
        ("one client, a year, per month", [*year, one, per_month], None),
        ("one client, a year, per month, user and model", [*year, one, per_month, keys], None),
        ("one client, 31 days, per day, user and model (CSV)", [*month, one, keys], "text/csv"),
        ("ten clients, a year, total", [*year, *clients, total], None),
        ("every client, a year, per month", [*year, per_month], None),
        ("every client, a year, total", [*year, total], None),
        ("every client, a year, per month and model", [*year, per_month, by_model], None),
        ("every client, a year, per user (total)", [*year, total, by_user], None),
        ("every client, 31 days, per day, user and model (over the cap)", [*month, keys], None),
    ]
    results = []
    header = f"s (min / median of {args.repeat})"
    print(f"| query | status | usage_daily rows in it | bytes | {header} |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, params, accept in cases:
        url = f"{base}/v1/usage/query?{urllib.parse.urlencode(params)}"
        runs = [get(url, accept) for _ in range(args.repeat)]
        seconds = [run[2] for run in runs]
        days = args.days + 1 if ("from", first) in params else 31
        named = sum(1 for key, _ in params if key == "client_org_id")
        per_day = min(args.keys, named * USERS * MODELS) if named else args.keys
        scanned = days * per_day
        results.append(
            {
                "query": name,
                "status": runs[0][0],
                "usage_daily_rows": scanned,
                "bytes": runs[0][1],
                "seconds_min": min(seconds),
                "seconds_median": statistics.median(seconds),
            }
        )
        print(
            f"| {name} | {runs[0][0]} | {scanned:,} | {runs[0][1]:,} |"
            f" {min(seconds):.2f} / {statistics.median(seconds):.2f} |",
            flush=True,
        )
    return results


if __name__ == "__main__":
    main()
