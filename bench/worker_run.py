"""One ``usage-stream worker`` process from the start of the topic to the last record:
throughput over time, memory, what its state costs on disk, and whether it counted right.

Completion signal: the summary writer stores, in the transaction that adds a batch's sums,
how far each usage partition has been read (``batch_log_heads.usage_next``), so its sum
equals the records produced exactly when every record has been processed and its sums
applied; offsets start at 0 per partition. The DB is opened read-only with a busy timeout
on every sample: the worker keeps writing, and the file (or the table) may not exist yet.

Dedupe state lives in the worker's memory now: its size per tracked id comes from the
worker's ``usage_stream_dedupe_bytes`` / ``usage_stream_dedupe_ids`` gauges.

Timing: from the last sample at which ``/metrics`` still showed nothing consumed (start-up
and the consumer-group join are excluded, and the span can only be over-estimated by
one sample, never under-estimated) until the sample that sees the last offset.
"""

from __future__ import annotations

import gzip
import os
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.procwatch import MIB, Child
from bench.results import Check, RunResult
from bench.workload import Expected

REPO = Path(__file__).resolve().parents[1]


def console_module(tree: Path) -> str:
    """What ``python -m`` runs as ``usage-stream`` in the checkout ``tree``: ``agents``
    (agents/main.py), or ``streams`` in a commit from before the entry point moved there
    (a ``--baseline`` or ``--tree`` of an older commit)."""
    return "agents" if (tree / "agents" / "__main__.py").exists() else "streams"


SAMPLE_SECONDS = 0.5
STARTUP_SAMPLE_SECONDS = 0.25  # finer until the first record is consumed: that starts the clock
SETTLE_SECONDS = 120.0  # after the last offset: closed days reach usage_daily at the next rollup
STALL_SECONDS = 180.0
_PREFIX = "usage_stream_"


def worker_env(
    *,
    broker_url: str,
    topic: str,
    data_dir: Path,
    app_id: str,
    web_port: int,
    timezone: str,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment tests/conftest.py gives a worker: short group timeouts (Tansu joins
    take ~30 s with Faust's defaults), no recovery consistency check (Tansu's end offsets
    are wrong), unreachable reference APIs (no internet in a benchmark), our own topic,
    group, data dir and port. Batch sizes and the rollup interval keep their defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFLUXDB_", "KAFKA_"))}
    env.update(
        {
            "APP_ID": app_id,
            "KAFKA_BROKER": broker_url,
            "USAGE_TOPIC": topic,
            "USAGE_TOPIC_PARTITIONS": "4",
            "DATA_DIR": str(data_dir),
            "WEB_PORT": str(web_port),
            "WEB_HOST": "127.0.0.1",
            "BUSINESS_TIMEZONE": timezone,
            "KAFKA_SESSION_TIMEOUT_SECONDS": "10",
            "KAFKA_REBALANCE_TIMEOUT_SECONDS": "10",
            "KAFKA_HEARTBEAT_INTERVAL_SECONDS": "1",
            "RECOVERY_CONSISTENCY_CHECK": "false",
            "KAFKA_STATIC_MEMBERSHIP": "false",  # wedges Tansu groups (streams/settings.py)
            "NBP_API_URL": "http://127.0.0.1:9/api",
            "OPENROUTER_API_URL": "http://127.0.0.1:9/api/v1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.pop("SUMMARY_DB_PATH", None)
    env.pop("STATE_DIR", None)
    env.update(extra or {})
    return env


@contextmanager
def read_only(db: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection that waits for the worker's write lock instead of failing."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        yield conn
    finally:
        conn.close()


def _table_exists(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return row is not None


def processed_offsets(db: Path, topic: str) -> int:
    """``SUM(usage_next)`` over the batch log's partitions; 0 while there is none. A
    summary DB of the single-file design (a ``--baseline`` run of an older commit) has
    ``source_offsets`` instead."""
    if not db.exists():
        return 0
    try:
        with read_only(db) as conn:
            if _table_exists(conn, "batch_log_heads"):
                (done,) = conn.execute(
                    "SELECT COALESCE(SUM(usage_next), 0) FROM batch_log_heads"
                ).fetchone()
            else:
                (done,) = conn.execute(
                    "SELECT COALESCE(SUM(next_offset), 0) FROM source_offsets WHERE topic = ?",
                    (topic,),
                ).fetchone()
        return int(done)
    except sqlite3.OperationalError:  # no table yet, or the file is still being created
        return 0


def billed_requests(db: Path) -> int | None:
    """Unique events billed: closed days in ``usage_daily`` plus open ones in
    ``daily_pending`` (when the worker has that table)."""
    if not db.exists():
        return None
    try:
        with read_only(db) as conn:
            if not _table_exists(conn, "usage_daily"):
                return None
            (total,) = conn.execute("SELECT COALESCE(SUM(requests), 0) FROM usage_daily").fetchone()
            if _table_exists(conn, "daily_pending"):
                (pending,) = conn.execute(
                    "SELECT COALESCE(SUM(requests), 0) FROM daily_pending"
                ).fetchone()
                total += pending
        return int(total)
    except sqlite3.OperationalError:
        return None


def read_metrics(port: int, timeout: float = 2.0) -> dict[str, float] | None:
    """The worker's /metrics as ``name{label=value,...}`` → value; None when unreachable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
            body = r.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def _counter(metrics: dict[str, float] | None, name: str) -> int | None:
    if metrics is None:
        return None
    value = metrics.get(_PREFIX + name + "_total")
    return None if value is None else int(value)


def _invalid_by_reason(metrics: dict[str, float] | None) -> dict[str, int]:
    prefix = _PREFIX + "events_invalid_total{reason="
    return {
        key[len(prefix) : -1]: int(value)
        for key, value in (metrics or {}).items()
        if key.startswith(prefix)
    }


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def raw_file_points(raw_dir: Path) -> int:
    """Line-protocol points in the file sink's daily files (plain or gzipped), headers
    excluded; information only (a redelivered batch would append the same points again)."""
    points = 0
    for path in sorted(raw_dir.glob("*.lp*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as lines:
            points += sum(1 for line in lines if line.strip() and not line.startswith(b"#"))
    return points


def _estimated_table_bytes(conn: sqlite3.Connection, table: str) -> int:
    """Bytes of a table's values (no dbstat): the sum of every column's length plus 8 a row."""
    columns = [row[1] for row in conn.execute(f'PRAGMA table_info("{table}")')]
    if not columns:
        return 0
    lengths = " + ".join(f'COALESCE(length(CAST("{c}" AS BLOB)), 0)' for c in columns)
    (size,) = conn.execute(f'SELECT COALESCE(SUM({lengths} + 8), 0) FROM "{table}"').fetchone()
    return int(size)


def db_sizes(db: Path, unique: int) -> dict[str, object]:
    """What the summary DB costs once the worker stopped: file + WAL bytes, allocated pages,
    and bytes per table and index (``dbstat``; without it, each table's value bytes).

    The dedupe state is not in the DB (the worker's gauges give its size), and nothing
    here assumes a particular table: the single-file design's ``ledger``, which this used
    to measure, was dropped by migration 6."""
    wal = Path(f"{db}-wal")
    file_bytes = db.stat().st_size if db.exists() else 0
    wal_bytes = wal.stat().st_size if wal.exists() else 0
    sizes: dict[str, object] = {
        "db_file_bytes": file_bytes,
        "db_wal_bytes": wal_bytes,
        "summary_db_bytes": file_bytes + wal_bytes,
        "summary_db_bytes_per_unique": (file_bytes + wal_bytes) / unique if unique else None,
    }
    if not db.exists():
        return sizes
    # read-write open (the worker is gone): a read-only one cannot always read a WAL file
    with closing(sqlite3.connect(db, timeout=30)) as conn:
        (page_count,) = conn.execute("PRAGMA page_count").fetchone()
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        sizes["pages_bytes"] = page_count * page_size
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        try:
            by_name = {
                name: int(size)
                for name, size in conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name")
            }
            sizes["bytes_by_table_method"] = "dbstat: allocated pages, tables and indexes"
        except sqlite3.OperationalError:
            by_name = {table: _estimated_table_bytes(conn, table) for table in tables}
            sizes["bytes_by_table_method"] = "estimate (dbstat unavailable): value bytes per table"
    sizes["bytes_by_table"] = by_name
    return sizes


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_worker(
    name: str,
    label: str,
    env: dict[str, str],
    expected: Expected,
    log_path: Path,
    timeout: float,
    progress: bool = True,
    cwd: Path = REPO,
    kind: str = "worker",
) -> tuple[RunResult, list[Check]]:
    """Run one worker until every record is processed, check its counts, stop it.
    ``cwd``: the checkout whose code runs (``python -m`` imports from it)."""
    result = RunResult(name, label, kind)
    db = Path(env["DATA_DIR"]) / "usage.db"
    topic, port = env["USAGE_TOPIC"], int(env["WEB_PORT"])
    with log_path.open("wb") as log:
        child = Child(
            [sys.executable, "-m", console_module(cwd), "worker", "--loglevel", "warn"],
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        return _measure(result, child, db, topic, port, expected, log_path, timeout, progress)
    finally:
        child.kill()


def _measure(
    result: RunResult,
    child: Child,
    db: Path,
    topic: str,
    port: int,
    expected: Expected,
    log_path: Path,
    timeout: float,
    progress: bool,
) -> tuple[RunResult, list[Check]]:
    records = expected.records
    samples: list[tuple[float, int, int | None]] = []  # (monotonic, processed, rss bytes)
    last_idle: float | None = None  # last sample with nothing consumed yet
    clock_start: float | None = None
    done_at: float | None = None
    last_change, last_processed, last_line = child.started, -1, child.started
    peak_rss = 0
    while done_at is None:
        now = time.monotonic()
        if child.exited():
            result.error = f"worker exited with {child.returncode}:\n{_log_tail(log_path)}"
            break
        rss = child.sample()
        peak_rss = max(peak_rss, rss or 0)
        processed = processed_offsets(db, topic)
        if clock_start is None:
            # committed offsets also start the clock, should /metrics lag behind them
            if processed or _counter(read_metrics(port), "events_consumed"):
                clock_start = last_idle if last_idle is not None else child.started
                result.details["startup_seconds"] = clock_start - child.started
            else:
                last_idle = now
        samples.append((now, processed, rss))
        if processed != last_processed:
            last_change, last_processed = now, processed
        if processed >= records:
            done_at = now
            if clock_start is None:  # everything within one sample
                clock_start = last_idle if last_idle is not None else child.started
            break
        if progress and now - last_line >= 10:
            last_line = now
            print(
                f"  {result.name}: {processed:,}/{records:,} records,"
                f" RSS {(rss or 0) / MIB:,.0f} MB",
                file=sys.stderr,
                flush=True,
            )
        if now - child.started > timeout:
            result.error = f"timed out after {timeout:.0f} s at {processed} of {records} records"
            break
        if now - last_change > STALL_SECONDS:
            result.error = f"no progress for {STALL_SECONDS:.0f} s at {processed} of {records}"
            break
        step = STARTUP_SAMPLE_SECONDS if clock_start is None else SAMPLE_SECONDS
        time.sleep(max(0.0, step - (time.monotonic() - now)))

    if clock_start is not None and done_at is not None:
        result.finish(done_at - clock_start, records)
    origin = clock_start if clock_start is not None else child.started
    result.samples = [
        [t - origin, float(n), None if r is None else r / MIB] for t, n, r in samples if t >= origin
    ]
    result.details["processed_offsets"] = last_processed

    # the counts: heads are stored with the sums; closed days follow at the next rollup
    checks: list[Check] = []
    metrics = None
    billed = None
    settle_started = time.monotonic()
    while result.error is None and not child.exited():
        rss = child.sample()
        peak_rss = max(peak_rss, rss or 0)
        metrics = read_metrics(port, timeout=5)
        billed = billed_requests(db)
        if (
            _counter(metrics, "events_consumed") == records
            and sum(_invalid_by_reason(metrics).values()) == expected.invalid
            and _counter(metrics, "events_duplicate") == expected.duplicates
            and billed == expected.unique
            # the InfluxDB sinks ship from a spool: wait until it is empty
            and not (metrics or {}).get(_PREFIX + "raw_spool_points")
            # the dedupe gauges follow on a 5 s timer: a small run can end before it ticks
            # (a worker without them, the baseline's single-file design, is not waited for)
            and (metrics or {}).get(_PREFIX + "dedupe_ids", 1)
        ) or time.monotonic() - settle_started > SETTLE_SECONDS:
            break
        time.sleep(SAMPLE_SECONDS)
    result.details["settle_seconds"] = time.monotonic() - settle_started
    if result.error is None and child.exited():
        result.error = (
            f"worker exited with {child.returncode} after the last offset:\n{_log_tail(log_path)}"
        )
    hwm = child.status_bytes("VmHWM")
    code, stop_seconds, killed = child.stop(grace=20.0)
    result.details.update(
        {
            "exit_code": code,
            "stop_seconds": stop_seconds,
            "killed_after_sigterm": killed,
            "vm_hwm_mb": None if hwm is None else hwm / MIB,
            "peak_sampled_rss_mb": peak_rss / MIB,
        }
    )
    result.peak_rss_mb = max(peak_rss, hwm or 0) / MIB
    invalid = _invalid_by_reason(metrics)
    result.details["metrics"] = {
        "consumed": _counter(metrics, "events_consumed"),
        "duplicate": _counter(metrics, "events_duplicate"),
        "invalid": invalid,
        "late": _counter(metrics, "events_late"),
        "raw_points_written": _counter(metrics, "raw_points_written"),
        "raw_write_errors": _counter(metrics, "raw_write_errors"),
    }
    result.details["billed_requests"] = billed
    data_dir = db.parent
    result.details.update(db_sizes(db, expected.unique))
    if metrics is not None and metrics.get(_PREFIX + "dedupe_ids"):
        ids = metrics[_PREFIX + "dedupe_ids"]
        result.details["dedupe_ids"] = int(ids)
        result.details["dedupe_bytes"] = int(metrics.get(_PREFIX + "dedupe_bytes", 0))
        result.details["dedupe_bytes_per_id"] = result.details["dedupe_bytes"] / ids
        result.details["dedupe_method"] = "worker memory (usage_stream_dedupe_bytes / _ids)"
    raw_bytes = _dir_bytes(data_dir / "raw")
    db_files = sum(f.stat().st_size for f in data_dir.glob(db.name + "*") if f.is_file())
    result.details["raw_dir_bytes"] = raw_bytes
    # e.g. Faust's RocksDB table state under DATA_DIR/faust-<port>
    result.details["other_state_bytes"] = _dir_bytes(data_dir) - raw_bytes - db_files
    if result.error is None:
        name = result.name
        consumed = _counter(metrics, "events_consumed")
        duplicates = _counter(metrics, "events_duplicate")
        invalid_total = sum(invalid.values()) if metrics else None
        checks = [
            Check(name, "consumed == records produced", records, consumed),
            Check(name, "invalid == invalid produced", expected.invalid, invalid_total),
            Check(name, "duplicates == duplicates produced", expected.duplicates, duplicates),
            Check(name, "unique billed == unique produced", expected.unique, billed),
        ]
    return result, checks
