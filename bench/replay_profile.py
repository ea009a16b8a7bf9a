"""Profile ``usage-stream replay`` without the whole benchmark: one broker kept up while
the replay is run (and changed) again and again.

    .venv/bin/python bench/replay_profile.py serve DIR [--events N] [--workload W]
                                              [--fill replay|worker]  # until Ctrl-C
    .venv/bin/python bench/replay_profile.py run DIR [--times K] [--py-spy OUT]
                                              [--subprocesses] [--dry-run]
    .venv/bin/python bench/replay_profile.py raw DIR                   # the raw-reader floor

``serve`` starts Tansu, produces bench/workload.py's events (same shape as bench/run.py),
fills the summary DB by replaying every day of the workload once (``--fill replay``: the
date's rows are then in ``usage_daily`` and a replay changes none of them) or by running
the worker with the file sink over the whole topic (``--fill worker``: the state
bench/run.py replays, the date's sums still pending; then use ``run --dry-run``, which
does the same replace work and rolls it back, so every run starts from that state), and
writes ``DIR/env.json``. ``run`` times ``python -m agents replay --date D`` (D = the
workload's middle day, as bench/run.py) as a whole command, optionally under ``py-spy
record -f raw`` (``--subprocesses``: the reader processes too, ``--nonblocking`` as the
README says). Why a separate
script: bench/run.py spends two minutes on floors and workers before the replay, and the
replay's profile is what matters here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.floors import raw_reader  # noqa: E402
from bench.run import compile_sources  # noqa: E402
from bench.worker_run import run_worker, worker_env  # noqa: E402
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


def _replay(
    env: dict[str, str],
    day: str,
    extra: list[str],
    py_spy: Path | None,
    subprocesses: bool = False,
) -> float:
    command = [sys.executable, "-m", "agents", "replay", "--date", day, *extra]
    if py_spy is not None:
        spy = str(Path(sys.executable).parent / "py-spy")
        command = [spy, "record", "-o", str(py_spy), "-f", "raw", "-r", "250"]
        command += ["--subprocesses", "--nonblocking", "--threads"] if subprocesses else []
        command += ["--", sys.executable, "-m", "agents", "replay", "--date", day, *extra]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"replay failed ({done.returncode}): {done.stdout}{done.stderr}")
    print(done.stdout.splitlines()[0] if done.stdout else "", file=sys.stderr)
    print("\n".join(ln for ln in done.stderr.splitlines() if "timings" in ln), file=sys.stderr)
    return seconds


def _fill_by_worker(env: dict[str, str], expected: Expected, directory: Path) -> None:
    """The worker (file sink) over the whole topic, as bench/run.py runs it."""
    result, checks = run_worker(
        "fill", "fill", env, expected, directory / "worker.log", 1200, progress=False
    )
    wrong = [check for check in checks if not check.ok]
    if result.error or wrong:
        raise SystemExit(f"worker fill failed: {result.error or wrong}")
    print(f"filled by the worker: {result.events_per_s or 0:,.0f} records/s", file=sys.stderr)


def serve(directory: Path, events: int, workload_name: str, fill: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    workload = build(events, TIMEZONE, workload=workload_name)
    expected = workload.expected
    assert expected is not None
    days = sorted(expected.unique_by_day)
    with EmbeddedBroker(log_path=directory / "tansu.log") as broker:
        bootstrap = f"127.0.0.1:{broker.port}"
        asyncio.run(create_topics(bootstrap, [TOPIC, f"{TOPIC}-dlq"]))
        seconds = asyncio.run(produce(bootstrap, TOPIC, workload))
        print(f"produced {expected.records:,} records in {seconds:.1f} s", file=sys.stderr)
        env = worker_env(
            broker_url=broker.url,
            topic=TOPIC,
            data_dir=directory / "data",
            app_id=f"profile-{os.getpid()}",
            web_port=free_port(),
            timezone=TIMEZONE,
        )
        state = {
            "env": env,
            "bootstrap": bootstrap,
            "records": expected.records,
            "day": expected.replay_date,
            "unique_of_day": expected.unique_by_day[expected.replay_date],
            "days": days,
        }
        if fill == "worker":
            _fill_by_worker(env, expected, directory)
        else:
            for day in days:  # every day's rows, as the worker leaves them once merged
                print(f"filling {day}: {_replay(env, day, [], None):.2f} s", file=sys.stderr)
        (directory / "env.json").write_bytes(orjson.dumps(state))
        print(f"ready: {directory / 'env.json'}", file=sys.stderr, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("serve", "run", "raw"))
    parser.add_argument("dir", type=Path)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--workload", choices=WORKLOADS, default="default")
    parser.add_argument("--times", type=int, default=1)
    parser.add_argument("--fill", choices=("replay", "worker"), default="replay")
    parser.add_argument("--py-spy", type=Path, default=None)
    parser.add_argument("--subprocesses", action="store_true")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if args.mode == "serve":
        serve(args.dir, args.events, args.workload, args.fill)
        return
    state = orjson.loads((args.dir / "env.json").read_bytes())
    if args.mode == "raw":
        result = raw_reader(state["bootstrap"], TOPIC, PARTITIONS, state["records"], args.dir, 120)
        print(f"raw reader: {result.events_per_s or 0:,.0f} records/s {result.error or ''}")
        return
    compile_sources(REPO)  # as bench/run.py does
    for _ in range(args.times):
        extra = ["--dry-run"] if args.dry_run else []
        seconds = _replay(state["env"], state["day"], extra, args.py_spy, args.subprocesses)
        print(f"replay: {seconds:.2f} s, {state['records'] / seconds:,.0f} records/s")


if __name__ == "__main__":
    main()
