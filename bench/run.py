"""The whole benchmark in one command (``make bench``), on one Tansu broker and one topic
of 4 partitions, so every number is comparable with the floors measured next to it:

1. produce N unique events + 10 % duplicates + 1 % invalid messages (bench/workload.py,
   ``--workload default`` or ``many-keys``: ~0.29 (client, user, model) keys per event,
   every event in one date), with the exact counts a correct pipeline must reproduce;
2. the floors: a raw aiokafka+orjson reader and a do-nothing Faust agent (bench/floors.py);
3. the worker with the file raw sink from the start of the topic (bench/worker_run.py):
   events/s over time, peak RSS, summary-DB bytes per unique event, dedupe bytes per id,
   the batch log's bytes per event and largest record (bench/batch_log_stats.py), and the
   counts from /metrics and the summary DB — a wrong count FAILs the run;
4. the same with InfluxDB 1.x as the raw sink (when ``influxd`` is installed);
5. ``usage-stream replay --date D`` on the first worker's data (bench/replay_run.py).

    .venv/bin/python bench/run.py [--workload default|many-keys] [--events N] [--out DIR]
                                  [--skip-influx] [--skip-replay] [--baseline GIT_REF]

Results: one line per run on stdout, progress on stderr, ``DIR/latest.json`` and
``DIR/latest.png`` (``latest-many-keys.*`` for that workload; default DIR: bench/results).
Exit 1 when a count is wrong or a run failed; targets (speed, memory, bytes) are printed
beside the numbers, never enforced.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `bench` and `streams` importable
    sys.path.insert(0, str(REPO))

from bench.batch_log_stats import batch_log_stats  # noqa: E402
from bench.floors import faust_noop, raw_reader  # noqa: E402
from bench.replay_run import run_replay  # noqa: E402
from bench.report import TARGETS, draw, failures, run_line, summary, write_json  # noqa: E402
from bench.results import Check, RunResult  # noqa: E402
from bench.worker_run import raw_file_points, run_worker, worker_env  # noqa: E402
from bench.workload import (  # noqa: E402
    PARTITIONS,
    WORKLOADS,
    Expected,
    build,
    create_topics,
    produce,
)
from streams.kafka.broker import EmbeddedBroker, free_port  # noqa: E402

TOPIC = "bench-usage"
TIMEZONE = "Europe/Warsaw"
INFLUX_DATABASE = "usage_bench"
_STARTED = time.monotonic()


def say(message: str) -> None:
    """Progress for the operator (stderr, so stdout stays the result lines)."""
    print(f"[bench {time.monotonic() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="unique events (1,000,000)")
    parser.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="default",
        help="default: ~57k keys a day over three days; many-keys: ~0.29 keys per event,"
        " every event in one date (bench/workload.py)",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results", help="directory for latest.*"
    )
    parser.add_argument("--skip-influx", action="store_true", help="no InfluxDB worker run")
    parser.add_argument("--skip-replay", action="store_true", help="no replay run")
    parser.add_argument(
        "--baseline",
        metavar="GIT_REF",
        default=None,
        help="also run the worker of this commit (a temporary git worktree) on the same"
        " topic, file sink: worker_file / worker_baseline shows a regression or none",
    )
    parser.add_argument(
        "--keep-work", action="store_true", help="keep the work directory (data dirs, logs)"
    )
    args = parser.parse_args(argv)
    if args.events < 100:
        parser.error("--events must be at least 100 (1 % of them are the invalid messages)")
    return args


def _git_version() -> str | None:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _worker(
    name: str,
    label: str,
    broker: EmbeddedBroker,
    expected: Expected,
    work: Path,
    extra: dict[str, str] | None = None,
    cwd: Path = REPO,
    kind: str = "worker",
) -> tuple[RunResult, list[Check], dict[str, str]]:
    """One worker run with its own data dir, consumer group (APP_ID) and port."""
    env = worker_env(
        broker_url=broker.url,
        topic=TOPIC,
        data_dir=work / name / "data",
        app_id=f"bench-{name}-{os.getpid()}",
        web_port=free_port(),
        timezone=TIMEZONE,
        extra=extra,
    )
    (work / name).mkdir(parents=True, exist_ok=True)
    say(f"{label}: starting the worker ({expected.records:,} records to process)")
    timeout = 120 + expected.records / 1000  # at least 1k records/s, the old worker's pace
    result, checks = run_worker(
        name, label, env, expected, work / name / "worker.log", timeout, cwd=cwd, kind=kind
    )
    if result.error is None:
        try:
            stats = batch_log_stats(
                f"127.0.0.1:{broker.port}", env["APP_ID"], expected.records, expected.unique
            )
            result.details["batch_log"] = stats.as_dict()
        except Exception as error:  # information only: never fails the run
            say(f"{label}: could not read the batch log: {type(error).__name__}: {error}")
    say(
        f"{label}: done: {result.events_per_s or 0:,.0f} records/s"
        + (f"; ERROR {result.error.splitlines()[0]}" if result.error else "")
    )
    return result, checks, env


def compile_sources(tree: Path) -> None:
    """Byte-compile the project's packages under ``tree``, as installing it would. Why:
    with ``PYTHONDONTWRITEBYTECODE`` set (this machine sets it) every process would
    compile the modules it imports from source on each start, which is start-up time a
    deployed package never pays, and the replay starts three processes."""
    for package in ("streams", "agents", "tables", "bench"):
        if (tree / package).is_dir():
            compileall.compile_dir(tree / package, quiet=1)


def _baseline_run(
    ref: str, broker: EmbeddedBroker, expected: Expected, work: Path
) -> tuple[RunResult, list[Check]]:
    """The worker of commit ``ref`` from a temporary git worktree (same interpreter and
    packages), file sink, on the same topic: the single-worker comparison of one run."""
    tree = work / "baseline-src"
    label = f"worker at {ref} (baseline), file sink"
    added = subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), ref],
        capture_output=True,
        text=True,
    )
    if added.returncode != 0:
        result = RunResult("worker_baseline", label, "baseline")
        result.error = f"git worktree add {ref}: {added.stderr.strip()}"
        return result, []
    compile_sources(tree)
    try:
        result, checks, _ = _worker(
            "worker_baseline", label, broker, expected, work, cwd=tree, kind="baseline"
        )
        result.details["git_ref"] = ref
        return result, checks
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
            capture_output=True,
        )


def _influx_run(
    broker: EmbeddedBroker, expected: Expected, work: Path
) -> tuple[RunResult, list[Check]]:
    """The worker again with InfluxDB 1.x as the raw sink; skipped when not installed."""
    from tests.servers import INFLUXD_BIN, influxd_server

    label = "worker, InfluxDB 1.x raw sink"
    if shutil.which(INFLUXD_BIN) is None:
        note = f"{INFLUXD_BIN} is not installed (apt-get install influxdb)"
        say(f"{label}: skipped: {note}")
        return RunResult("worker_influx", label, "worker", skipped=note), []
    with influxd_server() as server:
        server.create_database(INFLUX_DATABASE)
        extra = {"INFLUXDB_URL": server.url, "INFLUXDB_DATABASE": INFLUX_DATABASE}
        result, checks, _ = _worker("worker_influx", label, broker, expected, work, extra)
        if result.error is None:
            series = server.query("SELECT COUNT(input_tokens) FROM usage_tracking", INFLUX_DATABASE)
            points = int(series[0]["values"][0][1]) if series else 0
            result.details["influx_points"] = points
            checks.append(
                Check(result.name, "InfluxDB points == unique produced", expected.unique, points)
            )
    return result, checks


def bench(args: argparse.Namespace, work: Path) -> dict[str, object]:
    """Every step on one broker; returns the JSON document."""
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    say(
        f"generating {args.events:,} events + 10 % duplicates + 1 % invalid"
        f" ({args.workload} workload)"
    )
    workload = build(args.events, TIMEZONE, workload=args.workload)
    expected = workload.expected
    assert expected is not None
    runs: dict[str, RunResult] = {}
    checks: list[Check] = []
    with EmbeddedBroker(log_path=work / "tansu.log") as broker:
        bootstrap = f"127.0.0.1:{broker.port}"
        asyncio.run(create_topics(bootstrap, [TOPIC, f"{TOPIC}-dlq"]))
        say(f"producing {expected.records:,} records to {TOPIC} ({PARTITIONS} partitions)")
        produce_seconds = asyncio.run(produce(bootstrap, TOPIC, workload))
        say(f"produced in {produce_seconds:.1f} s ({expected.records / produce_seconds:,.0f}/s)")
        del workload  # the children below are measured, not this process, but keep it lean

        say("floor 1: raw aiokafka getmany + orjson")
        raw = raw_reader(
            bootstrap, TOPIC, PARTITIONS, expected.records, work, 60 + expected.records / 10_000
        )
        runs[raw.name] = raw
        if raw.error is None:
            not_json = raw.details.get("not_json")
            checks.append(
                Check(
                    raw.name,
                    "not-JSON records on the topic",
                    expected.invalid_by_reason.get("not_json", 0),
                    not_json if isinstance(not_json, int) else None,
                )
            )
        say(f"raw reader: {raw.events_per_s or 0:,.0f} records/s")

        say("floor 2: a do-nothing Faust agent")
        noop = faust_noop(broker.url, TOPIC, expected.records, work, 120 + expected.records / 1000)
        runs[noop.name] = noop
        say(f"Faust no-op: {noop.events_per_s or 0:,.0f} records/s")

        file_run, file_checks, file_env = _worker(
            "worker_file", "worker, file raw sink", broker, expected, work
        )
        runs[file_run.name] = file_run
        checks += file_checks
        if file_run.error is None:
            raw_dir = Path(file_env["DATA_DIR"]) / "raw"
            file_run.details["raw_file_points"] = raw_file_points(raw_dir)

        if args.baseline:
            baseline, baseline_checks = _baseline_run(args.baseline, broker, expected, work)
            runs[baseline.name] = baseline
            checks += baseline_checks

        if args.skip_replay:
            runs["replay"] = RunResult(
                "replay", "usage-stream replay", "replay", skipped="--skip-replay"
            )
        elif file_run.error is not None:
            runs["replay"] = RunResult(
                "replay", "usage-stream replay", "replay", skipped="the file-sink worker run failed"
            )
        else:
            day = expected.replay_date
            say(f"replay --date {day} on the file-sink worker's data")
            replay, replay_checks = run_replay(
                file_env,
                day,
                expected.records,
                expected.unique_by_day[day],
                work / "worker_file",
                120 + expected.records / 1000,
                keys_of_day=expected.keys_by_day.get(day),
            )
            runs[replay.name] = replay
            checks += replay_checks
            say(f"replay: {replay.events_per_s or 0:,.0f} records/s (whole command)")

        if args.skip_influx:
            runs["worker_influx"] = RunResult(
                "worker_influx", "worker, InfluxDB 1.x raw sink", "worker", skipped="--skip-influx"
            )
        else:
            try:
                influx, influx_checks = _influx_run(broker, expected, work)
            except Exception as error:  # e.g. influxd installed but not starting
                influx = RunResult("worker_influx", "worker, InfluxDB 1.x raw sink", "worker")
                influx.error = f"{type(error).__name__}: {error}"
                influx_checks = []
            runs[influx.name] = influx
            checks += influx_checks

    fails = failures(checks, runs)
    return {
        "started_at": started_at,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_seconds": time.monotonic() - _STARTED,
        "code_version": _git_version(),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
        },
        "events": args.events,
        "workload": args.workload,
        "notes": {
            "events_per_s": "records on the topic (unique + duplicates + invalid) per second,"
            " the same basis for every run",
            "floors": "raw reader and Faust no-op: first record to last",
            "workers": "last /metrics sample with nothing consumed to the sample where"
            " SUM(batch_log_heads.usage_next) reached the records produced",
            "replay": "wall time of the whole command; reads the whole topic on Tansu",
            "peak_rss_mb": "highest VmHWM/VmRSS read from /proc/PID/status while it ran",
            "batch_log": "each worker's <APP_ID>-batch-log read back after its run (values"
            " only); bytes_per_event over the records on the usage topic",
        },
        "topic": {"name": TOPIC, "partitions": PARTITIONS},
        "expected": expected.as_dict(),
        "produce": {
            "seconds": produce_seconds,
            "records_per_s": expected.records / produce_seconds,
        },
        "runs": {name: run.as_dict() for name, run in runs.items()},
        "ratios": summary(runs),
        "targets": {name: {"op": op, "bound": bound} for name, (op, bound) in TARGETS.items()},
        "checks": [check.as_dict() for check in checks],
        "failures": fails,
        "ok": not fails,
        "_runs": runs,  # popped before writing: the objects for the lines and the plot
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="usage-bench-"))
    compile_sources(REPO)
    try:
        document = bench(args, work)
        runs: dict[str, RunResult] = document.pop("_runs")  # type: ignore[assignment]
        stem = "latest" if args.workload == "default" else f"latest-{args.workload}"
        json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"
        document["png"] = str(png_path)
        write_json(json_path, document)
        draw(
            png_path,
            runs,
            f"usage-stream bench, {args.workload}: {args.events:,} events"
            f" ({document['code_version']})",
        )
        expected: dict = document["expected"]  # type: ignore[assignment]
        keys = ", ".join(f"{day} {count:,}" for day, count in expected["keys_by_day"].items())
        print(
            f"{args.workload} workload: {args.events:,} unique events,"
            f" {expected['records']:,} records; keys by day: {keys}"
        )
        for run in runs.values():
            print(run_line(run, runs))
        fails: list[str] = document["failures"]  # type: ignore[assignment]
        for line in fails:
            print(line)
        if fails:
            logs = out / "logs"
            logs.mkdir(exist_ok=True)
            for log in work.rglob("*.log"):
                shutil.copy(log, logs / "-".join(log.relative_to(work).parts))
            print(f"logs of this run: {logs}")
        say(f"wrote {json_path} and {png_path}")
        return 1 if fails else 0
    finally:
        if args.keep_work:
            say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
