"""The transitions benchmark (issue 20 item 1): how long billing stops when workers start,
restart, join and leave, on one embedded Tansu broker with N events of history.

    .venv/bin/python bench/transitions.py [--events N] [--repeat K]
        [--tree CHECKOUT | --ref GIT_REF] [--session-timeout S] [--rebalance-timeout S]
        [--heartbeat-interval S] [--load-rate R] [--only NAME,...] [--env NAME=VALUE ...]
        [--out DIR] [--keep-work]

(``make bench-transitions BENCH_ARGS="..."``). Results: a table on stdout, progress on
stderr, ``DIR/transitions.json`` (default DIR: bench/results). Exit 1 when a count is
wrong or a scenario failed; the targets are printed, never enforced.

**The pipeline.** bench/workload.py's N unique events (+10 % copies, +1 % invalid) are
produced to a 4-partition topic; a first worker (the summary writer, ``WORKER_ID``
``bench-host-a``) bills them all ("first start, N backlog"). The scenarios then run in
this order, ``--repeat`` times, on that pipeline (one ``APP_ID``), each measured from
outside as an operator would see it:

``cold-empty``
    A new pipeline (its own ``APP_ID`` and topic, empty) and an empty ``DATA_DIR``: from
    the process start to the moment a marker event, published at that start, is billed.
``sigkill``
    SIGKILL to the writer, a new process on the same ``DATA_DIR`` at once, a marker
    published at that start. Figure: signal → marker billed. The dead member's session
    is still open on the broker.
``sigterm``
    The same after SIGTERM, the new process started as soon as the old one exited.
    Figure: signal → marker billed (the stop included). It runs after ``sigkill`` on
    purpose: on Tansu a group's first generation is 0, and aiokafka sends LeaveGroup on
    stop only from generation 1 on (``_maybe_leave_group``: ``generation > 0``), so the
    first worker of a pipeline never leaves its groups and the next one waits out its
    session (Apache Kafka's first generation is 1). The old process's generations are
    in the JSON (``old_generations``), so a run that meets this case says so.
``cold-history``
    SIGTERM to the writer, then a worker with the same ``WORKER_ID`` on an **empty**
    ``DATA_DIR`` (a rescheduled pod that lost its disk): it rebuilds every home
    partition from the topics and a new summary DB from the batch log. Figure: process
    start → marker billed.
``join``
    A steady load (``--load-rate`` events/s, unique, current time) for ``--warmup`` s,
    then a second worker (``SUMMARY_WRITER=false``, its own empty ``DATA_DIR``, another
    ``WORKER_ID``) joins. Figure: the **longest stall**, the longest interval in which a
    home partition's billed position (``batch_log_heads.usage_next``) did not move while
    events kept arriving, over every partition, from the join on; beside it the longest
    interval in which no worker wrote a raw point, the time until the group is balanced,
    and until both workers write raw points.
``leave``
    SIGTERM to that second worker under the same load. Figure: the longest stall, and
    when the writer holds every partition again.

Beside each figure: the raw aiokafka reader's time to read the history (bench/floors.py,
first record to last; the floor of any rebuild), ``/ready``'s first 200 against the
moment the marker was billed (``ready_lead_s``: how long /ready said 200 before the
worker could bill), a marker's latency once billing again (the steady-state floor of the
figure: a batch closes after ``RAW_BATCH_SECONDS``), and the worker log's milestones
(Faust's control group ``APP_ID-control``, the hot path's group ``APP_ID``, rebuilds).

**Totals exact**: after each scenario the summary DB must hold every unique event
published so far, once (``usage_daily`` + ``daily_pending``), and the billed positions
must sum to the records published; each restarted process must have consumed exactly its
new records (/metrics). After a join or a leave the processes' consumed counts may exceed
what was published (a rebalance may hand a partition over with a batch unappended: the
new owner reads it again, which is at-least-once and billed once): that check is ≥. At the
end the raw points of every ``DATA_DIR`` must hold every unique event, each once.

**Settings**: the worker's defaults (``KAFKA_SESSION_TIMEOUT_SECONDS`` 60,
``KAFKA_REBALANCE_TIMEOUT_SECONDS`` 60, ``KAFKA_HEARTBEAT_INTERVAL_SECONDS`` 3), not the
tests' short ones, unless ``--session-timeout`` etc. say otherwise; only
``RECOVERY_CONSISTENCY_CHECK=false`` (Tansu's end offsets are wrong), unreachable
reference APIs and our own topic, group, ports and data dirs are set, as in
bench/worker_run.py. ``--env NAME=VALUE`` passes anything else to every worker.

**Another commit**: ``--tree CHECKOUT`` runs the worker of that checkout (``python -m
agents``, or ``streams`` before the entry point moved, with it as the working directory,
this interpreter and its packages), with
this benchmark's harness; ``--ref GIT_REF`` makes a temporary git worktree of a commit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `bench` and `streams` importable
    sys.path.insert(0, str(REPO))

from bench.floors import raw_reader  # noqa: E402
from bench.procwatch import Child  # noqa: E402
from bench.report import write_json  # noqa: E402
from bench.results import Check  # noqa: E402
from bench.run import compile_sources  # noqa: E402
from bench.transition_probes import (  # noqa: E402
    HeadsProbe,
    Publisher,
    WorkerProbe,
    counter,
    first_after,
    invalid_total,
    log_timeline,
    longest_gap,
    marker_dates,
    marker_requests,
    merged,
)
from bench.worker_run import (  # noqa: E402
    billed_requests,
    console_module,
    processed_offsets,
    worker_env,
)
from bench.workload import PARTITIONS, Expected, build, create_topics, produce  # noqa: E402
from streams.kafka.broker import EmbeddedBroker, free_port  # noqa: E402

TOPIC = "bench-usage"
TIMEZONE = "Europe/Warsaw"
SCENARIOS = ("cold-empty", "sigkill", "sigterm", "cold-history", "join", "leave")
#: seconds; printed beside the figures, never enforced (issue 20)
TARGETS = {
    "cold-empty": 10.0,
    "cold-history": 10.0,
    "sigterm": 10.0,
    "sigkill": 15.0,
    "join": 15.0,
    "leave": 15.0,
}
TIMEOUT_VARIABLES = {
    "session_timeout": "KAFKA_SESSION_TIMEOUT_SECONDS",
    "rebalance_timeout": "KAFKA_REBALANCE_TIMEOUT_SECONDS",
    "heartbeat_interval": "KAFKA_HEARTBEAT_INTERVAL_SECONDS",
}
WRITER_ID = "bench-host-a"
STOP_GRACE_SECONDS = 60.0  # SIGKILL after this long (Kubernetes' default grace is 30 s)
MARKER_POLL_SECONDS = 0.1
_STARTED = time.monotonic()


def say(message: str) -> None:
    """Progress for the operator (stderr, so stdout stays the table)."""
    print(
        f"[transitions {time.monotonic() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True
    )


class ScenarioFailed(RuntimeError):
    """A scenario could not finish (a worker died, a marker was never billed): the
    remaining scenarios are skipped, since the pipeline's state is unknown."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="unique events of history")
    parser.add_argument("--repeat", type=int, default=1, help="run every scenario K times")
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios, run in the fixed order ({','.join(SCENARIOS)});"
        " leave needs join",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--tree", type=Path, default=REPO, help="the checkout whose worker runs")
    source.add_argument("--ref", default=None, help="run the worker of this commit (a worktree)")
    for name, variable in TIMEOUT_VARIABLES.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=float,
            default=None,
            metavar="SECONDS",
            help=f"{variable} of every worker (default: the worker's own default)",
        )
    parser.add_argument(
        "--load-rate", type=float, default=1000.0, help="events/s during join/leave"
    )
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds of load before a join")
    parser.add_argument(
        "--settle", type=float, default=15.0, help="seconds observed after a join/leave recovered"
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds a scenario may wait for a step"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra environment variable for every worker (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--keep-work", action="store_true", help="keep data dirs and logs")
    parser.add_argument(
        "--skip-raw-check", action="store_true", help="no raw-file count at the end"
    )
    args = parser.parse_args(argv)
    if args.events < 100:
        parser.error("--events must be at least 100 (1 % of them are the invalid messages)")
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in only if name not in SCENARIOS]
    if unknown:
        parser.error(f"--only: unknown scenario(s) {', '.join(unknown)}")
    if "leave" in only and "join" not in only:
        parser.error("--only: leave needs join (the worker that leaves is the one that joined)")
    args.only = [name for name in SCENARIOS if name in only]
    for pair in args.env:
        if "=" not in pair:
            parser.error(f"--env {pair!r}: expected NAME=VALUE")
    return args


def git_version(tree: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=tree,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@contextlib.contextmanager
def worker_tree(args: argparse.Namespace, work: Path) -> Iterator[Path]:
    """The checkout whose worker runs: ``--tree``, or a temporary worktree of ``--ref``."""
    if args.ref is None:
        yield args.tree.resolve()
        return
    tree = work / "worker-src"
    added = subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.ref],
        capture_output=True,
        text=True,
    )
    if added.returncode != 0:
        raise SystemExit(f"git worktree add {args.ref}: {added.stderr.strip()}")
    try:
        yield tree
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
            capture_output=True,
        )


@dataclass
class Proc:
    """One worker process and its probes."""

    name: str
    env: dict[str, str]
    log_path: Path
    child: Child
    started_wall: float
    probe: WorkerProbe
    final_metrics: dict[str, float] | None = None

    @property
    def started(self) -> float:
        return self.child.started

    @property
    def db(self) -> Path:
        return Path(self.env["DATA_DIR"]) / "usage.db"

    def consumed(self) -> int | None:
        return counter(self.probe.metrics.last, "events_consumed")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def timeline(self) -> dict[str, object]:
        return log_timeline(self.log_path, self.env["APP_ID"], self.started_wall).as_dict()

    def lines_between(self, start: float, end: float) -> list[list[object]]:
        """The log's timeline lines between two monotonic moments, in seconds since
        ``start``."""
        lines = log_timeline(self.log_path, self.env["APP_ID"], self.started_wall).lines
        offset = start - self.started
        return [
            [round(t - offset, 3), text] for t, text in lines if offset <= t <= end - self.started
        ]

    def ready_summary(self, origin: float) -> dict[str, object]:
        ready = self.probe.ready
        return {
            "first_200_s": None if ready.first_200 is None else ready.first_200 - origin,
            "changes": [[round(t - origin, 3), code, note] for t, code, note in ready.changes],
            "answers": ready.answers,
            "slowest_answer_s": ready.slowest,
        }

    def freeze_metrics(self) -> dict[str, float] | None:
        """The last /metrics before the process goes: its counters die with it."""
        from bench.worker_run import read_metrics

        metrics = read_metrics(int(self.env["WEB_PORT"]), timeout=5)
        self.final_metrics = metrics or self.probe.metrics.last
        return self.final_metrics

    def stop(self) -> tuple[int | None, float, bool]:
        """SIGTERM; SIGKILL after STOP_GRACE_SECONDS. (exit code, seconds, killed)."""
        try:
            return self.child.stop(grace=STOP_GRACE_SECONDS)
        finally:
            self.probe.stop()

    def kill(self) -> None:
        self.child.kill()
        self.probe.stop()


@dataclass
class Pipeline:
    """The benchmark's main pipeline: its topic, group, the running writer and what has
    been published to it."""

    app_id: str
    unique: int
    records: int
    writer: Proc | None = None
    data_dirs: list[Path] = field(default_factory=list)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


class Transitions:
    """Runs the scenarios on one broker; collects a JSON-ready result per run."""

    def __init__(
        self,
        args: argparse.Namespace,
        work: Path,
        tree: Path,
        broker: EmbeddedBroker,
        publisher: Publisher,
    ) -> None:
        self.args = args
        self.work = work
        self.tree = tree
        self.broker = broker
        self.publisher = publisher
        self.bootstrap = f"127.0.0.1:{broker.port}"
        self.checks: list[Check] = []
        self.results: dict[str, list[dict[str, object]]] = {name: [] for name in SCENARIOS}
        self.results["first-start"] = []
        self.procs: list[Proc] = []
        self._serial = 0
        self.join_recovered = 0.0  # when the last join recovered (the leave's steady window)
        self._run_id = f"{os.getpid()}"

    # Workers ----------------------------------------------------------------------------

    def env(
        self,
        *,
        topic: str,
        app_id: str,
        data_dir: Path,
        worker_id: str,
        writer: bool = True,
    ) -> dict[str, str]:
        env = worker_env(
            broker_url=self.broker.url,
            topic=topic,
            data_dir=data_dir,
            app_id=app_id,
            web_port=free_port(),
            timezone=TIMEZONE,
        )
        for name, variable in TIMEOUT_VARIABLES.items():  # the worker's defaults, unless
            value = getattr(self.args, name)
            if value is None:
                env.pop(variable, None)
            else:
                env[variable] = f"{value:g}"
        env["WORKER_ID"] = worker_id
        env["SUMMARY_WRITER"] = "true" if writer else "false"
        for pair in self.args.env:
            name, value = pair.split("=", 1)
            env[name] = value
        return env

    def start(self, label: str, env: dict[str, str]) -> Proc:
        self._serial += 1
        name = f"{self._serial:02d}-{label}"
        log_path = self.work / f"{name}.log"
        Path(env["DATA_DIR"]).mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            wall = time.time()
            child = Child(
                [sys.executable, "-m", console_module(self.tree), "worker", "--loglevel", "info"],
                env=env,
                cwd=self.tree,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        probe = WorkerProbe(int(env["WEB_PORT"])).start()
        proc = Proc(name, env, log_path, child, wall, probe)
        self.procs.append(proc)
        return proc

    def alive(self, *procs: Proc) -> None:
        for proc in procs:
            if proc.child.exited():
                raise ScenarioFailed(
                    f"{proc.name} exited with {proc.child.returncode}:\n{proc.log_tail()}"
                )

    def wait(
        self, what: str, predicate: Callable[[], bool], procs: tuple[Proc, ...], step: float
    ) -> float:
        """Poll ``predicate`` until true (returns that moment); fail when a worker exits
        or ``--timeout`` passes."""
        deadline = time.monotonic() + self.args.timeout
        while True:
            self.alive(*procs)
            if predicate():
                return time.monotonic()
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {p.name}\n{p.log_tail(15)}" for p in procs)
                raise ScenarioFailed(f"timed out after {self.args.timeout:.0f} s: {what}\n{tails}")
            time.sleep(step)

    # Markers and totals -----------------------------------------------------------------

    def marker_client(self, scenario: str, index: int) -> str:
        return f"marker-{scenario}-{index}-{self._run_id}"

    def publish_marker(self, topic: str, client: str) -> float:
        """Publish one marker (not waiting for the broker's acknowledgement here); returns
        when it was handed to the producer."""
        moment = time.monotonic()
        self.publisher.marker(topic, client)
        return moment

    def wait_billed(self, proc: Proc, client: str) -> float:
        return self.wait(
            f"marker {client} billed in {proc.db}",
            lambda: marker_requests(proc.db, client, marker_dates(TIMEZONE)) >= 1,
            (proc,),
            MARKER_POLL_SECONDS,
        )

    def steady_latency(self, proc: Proc, topic: str, client: str) -> float:
        """A marker's publish → billed once the worker is billing: the floor under every
        figure (a batch closes after RAW_BATCH_SECONDS, the writer follows the log)."""
        sent = self.publish_marker(topic, client)
        return self.wait_billed(proc, client) - sent

    def wait_totals(self, db: Path, unique: int, records: int, procs: tuple[Proc, ...]) -> None:
        """Until the summary DB holds every record's position and every unique event."""
        self.wait(
            f"{records:,} records read and {unique:,} unique events billed in {db}",
            lambda: processed_offsets(db, TOPIC) >= records and billed_requests(db) == unique,
            procs,
            0.25,
        )

    def totals_checks(self, run: str, db: Path, unique: int, records: int) -> list[Check]:
        checks = [
            Check(
                run, "unique billed (summary DB) == unique published", unique, billed_requests(db)
            ),
            Check(
                run, "billed positions == records published", records, processed_offsets(db, TOPIC)
            ),
        ]
        self.checks += checks
        return checks

    def check(self, run: str, name: str, expected: int, actual: int | None) -> Check:
        check = Check(run, name, expected, actual)
        self.checks.append(check)
        return check

    def settled_metrics(
        self, proc: Proc, records: int, expected: Expected, timeout: float = 60.0
    ) -> dict[str, float] | None:
        """/metrics once its counters reached the workload's (at most ``timeout`` s after
        the summary DB did, as bench/worker_run.py waits): a copy read away from home is
        counted as a duplicate only when its home partition reads it back from the
        rerouted topic, after the usage positions that the totals wait for."""
        deadline = time.monotonic() + timeout
        while True:
            metrics = proc.freeze_metrics()
            if (
                counter(metrics, "events_consumed") == records
                and invalid_total(metrics) == expected.invalid
                and counter(metrics, "events_duplicate") == expected.duplicates
            ) or time.monotonic() > deadline:
                return metrics
            self.alive(proc)
            time.sleep(0.25)

    # The history ------------------------------------------------------------------------

    def history(self, expected: Expected) -> Pipeline:
        """The first worker bills the history (timed: the first start of a pipeline with
        N events waiting, a marker published at its start billed after them)."""
        pipeline = Pipeline(f"bench-transitions-{self._run_id}", expected.unique, expected.records)
        data_dir = self.work / "host-a-0"
        pipeline.data_dirs.append(data_dir)
        env = self.env(topic=TOPIC, app_id=pipeline.app_id, data_dir=data_dir, worker_id=WRITER_ID)
        say(f"first start: a worker bills {expected.records:,} records of history")
        proc = self.start("history", env)
        client = self.marker_client("first-start", 0)
        self.publish_marker(TOPIC, client)
        pipeline.unique += 1
        pipeline.records += 1
        billed_at = self.wait_billed(proc, client)
        self.wait_totals(proc.db, pipeline.unique, pipeline.records, (proc,))
        metrics = self.settled_metrics(proc, pipeline.records, expected)
        run = "first-start"
        checks = [
            self.check(
                run,
                "consumed == records produced",
                pipeline.records,
                counter(metrics, "events_consumed"),
            ),
            self.check(
                run, "invalid == invalid produced", expected.invalid, invalid_total(metrics)
            ),
            self.check(
                run,
                "duplicates == duplicates produced",
                expected.duplicates,
                counter(metrics, "events_duplicate"),
            ),
        ]
        checks += self.totals_checks(run, proc.db, pipeline.unique, pipeline.records)
        self.results[run].append(
            {
                "seconds": billed_at - proc.started,
                "what": "process start → a marker published at that start billed, after"
                f" {pipeline.records - 1:,} records of backlog",
                "ready": proc.ready_summary(proc.started),
                "timeline": proc.timeline(),
                "checks": [c.as_dict() for c in checks],
            }
        )
        say(f"first start: marker billed after {billed_at - proc.started:.1f} s")
        pipeline.writer = proc
        return pipeline

    # Start and restart scenarios --------------------------------------------------------

    def _start_result(
        self,
        proc: Proc,
        billed_at: float,
        origin: float,
        topic: str,
        scenario: str,
        index: int,
    ) -> dict[str, object]:
        """The figures every start shares: from ``origin`` (the signal or the process
        start) to the marker billed, /ready's timeline against it, the log's milestones,
        and a second marker's latency once billing (the floor)."""
        ready = proc.ready_summary(proc.started)
        first_200 = ready["first_200_s"]
        billed_s = billed_at - proc.started
        steady = self.steady_latency(proc, topic, self.marker_client(scenario + "-steady", index))
        held = proc.probe.metrics.assigned
        return {
            "seconds": billed_at - origin,
            "process_start_to_billed_s": billed_s,
            "ready": ready,
            "ready_lead_s": None if first_200 is None else billed_s - float(first_200),  # type: ignore[arg-type]
            "metrics_first_answer_s": (
                proc.probe.metrics.samples[0][0] - proc.started
                if proc.probe.metrics.samples
                else None
            ),
            "partitions_held_s": next((t - proc.started for t, parts in held if parts), None),
            "steady_marker_latency_s": steady,
            "timeline": proc.timeline(),
        }

    def cold_empty(self, index: int) -> None:
        """A new pipeline on an empty topic, an empty DATA_DIR (module docstring)."""
        topic = f"bench-empty-{index}-{self._run_id}"
        asyncio.run(create_topics(self.bootstrap, [topic, f"{topic}-dlq"]))
        env = self.env(
            topic=topic,
            app_id=f"bench-empty-{index}-{self._run_id}",
            data_dir=self.work / f"empty-{index}",
            worker_id=f"bench-host-empty-{index}",
        )
        say(f"cold-empty #{index + 1}: a new pipeline on an empty topic")
        proc = self.start(f"cold-empty-{index}", env)
        client = self.marker_client("cold-empty", index)
        self.publish_marker(topic, client)
        try:
            billed_at = self.wait_billed(proc, client)
            result = self._start_result(proc, billed_at, proc.started, topic, "cold-empty", index)
            self.wait_totals(proc.db, 2, 2, (proc,))
            run = f"cold-empty#{index + 1}"
            checks = [
                self.check(
                    run,
                    "consumed == 2 markers",
                    2,
                    counter(proc.freeze_metrics(), "events_consumed"),
                ),
                *self.totals_checks(run, proc.db, 2, 2),
            ]
            result["checks"] = [c.as_dict() for c in checks]
            code, seconds, killed = proc.stop()
            result["stop"] = {"exit_code": code, "seconds": seconds, "killed": killed}
        finally:
            proc.kill()
        self.results["cold-empty"].append(result)
        say(f"cold-empty #{index + 1}: billed after {result['seconds']:.1f} s")

    def restart(self, pipeline: Pipeline, scenario: str, index: int) -> None:
        """SIGTERM or SIGKILL the writer, start it again (same DATA_DIR, or an empty one
        for cold-history), and time a marker published at that start."""
        old = pipeline.writer
        assert old is not None
        before = old.freeze_metrics()
        say(f"{scenario} #{index + 1}: stopping {old.name}")
        signalled = time.monotonic()
        stop: dict[str, object]
        if scenario == "sigkill":
            old.kill()
            stop = {"exit_code": old.child.returncode, "seconds": 0.0, "killed": True}
        else:
            code, seconds, killed = old.stop()
            stop = {"exit_code": code, "seconds": seconds, "killed": killed}
        data_dir = Path(old.env["DATA_DIR"])
        if scenario == "cold-history":
            data_dir = self.work / f"host-a-{len(pipeline.data_dirs)}"
            pipeline.data_dirs.append(data_dir)
        env = self.env(topic=TOPIC, app_id=pipeline.app_id, data_dir=data_dir, worker_id=WRITER_ID)
        proc = self.start(f"{scenario}-{index}", env)
        pipeline.writer = proc
        client = self.marker_client(scenario, index)
        self.publish_marker(TOPIC, client)
        pipeline.unique += 1
        pipeline.records += 1
        billed_at = self.wait_billed(proc, client)
        origin = proc.started if scenario == "cold-history" else signalled
        result = self._start_result(proc, billed_at, origin, TOPIC, scenario, index)
        pipeline.unique += 1  # the steady marker
        pipeline.records += 1
        result["signal_to_billed_s"] = billed_at - signalled
        result["stop"] = stop
        result["old_lines_after_signal"] = old.lines_between(signalled, billed_at)
        result["old_generations"] = old.timeline()["generations"]
        self.wait_totals(proc.db, pipeline.unique, pipeline.records, (proc,))
        run = f"{scenario}#{index + 1}"
        checks = [
            self.check(
                run,
                "consumed by the new process == its 2 markers",
                2,
                counter(proc.freeze_metrics(), "events_consumed"),
            ),
            *self.totals_checks(run, proc.db, pipeline.unique, pipeline.records),
        ]
        if before is None:
            result["note"] = "the old process's /metrics could not be read before the signal"
        result["checks"] = [c.as_dict() for c in checks]
        self.results[scenario].append(result)
        say(
            f"{scenario} #{index + 1}: marker billed {result['seconds']:.1f} s after the signal"
            if scenario != "cold-history"
            else f"{scenario} #{index + 1}: marker billed {result['seconds']:.1f} s after the start"
        )

    # Join and leave ---------------------------------------------------------------------

    def _observe(
        self,
        what: str,
        done: Callable[[], float | None],
        procs: tuple[Proc, ...],
        heads: HeadsProbe,
    ) -> tuple[float, float]:
        """Wait until ``done()`` returns the moment the transition recovered, then
        ``--settle`` more seconds; returns (recovered, end of the window)."""
        recovered = self.wait(what, lambda: done() is not None, procs, 0.25)
        settled = time.monotonic() + self.args.settle
        while time.monotonic() < settled:
            self.alive(*procs)
            time.sleep(0.25)
        return done() or recovered, time.monotonic()

    def _moved_after(self, heads: HeadsProbe, moment: float, times: int = 2) -> float | None:
        """When every partition's billed position had moved ``times`` times after
        ``moment`` (None until then)."""
        progress = heads.progress()
        latest = 0.0
        for partition in range(PARTITIONS):
            after = [t for t in progress.get(partition, []) if t > moment]
            if len(after) < times:
                return None
            latest = max(latest, after[times - 1])
        return latest

    def _stalls(
        self,
        heads: HeadsProbe,
        procs: dict[str, Proc],
        start: float,
        end: float,
        warmup_from: float,
    ) -> dict[str, object]:
        """The stall figures of one window (module docstring)."""
        progress = heads.progress()
        per_partition = {
            partition: longest_gap(progress.get(partition, []), start, end)
            for partition in range(PARTITIONS)
        }
        worst = max(per_partition.values(), key=lambda gap: gap.seconds)
        baseline = max(
            longest_gap(progress.get(p, []), warmup_from, start).seconds for p in range(PARTITIONS)
        )
        raw = {name: proc.probe.raw_progress() for name, proc in procs.items()}
        return {
            "seconds": worst.seconds,
            "longest_stall": worst.as_dict(start),
            "stall_by_partition_s": {str(p): gap.seconds for p, gap in per_partition.items()},
            "steady_longest_gap_s": baseline,
            "no_raw_point_by_any_worker": longest_gap(merged(raw), start, end).as_dict(start),  # type: ignore[arg-type]
            "no_raw_point_by_worker": {
                name: longest_gap(times, start, end).as_dict(start) for name, times in raw.items()
            },
            "window_s": end - start,
        }

    def join(self, pipeline: Pipeline, index: int, heads: HeadsProbe) -> Proc:
        writer = pipeline.writer
        assert writer is not None
        say(f"join #{index + 1}: {self.args.warmup:.0f} s of steady load, then a second worker")
        warm_from = time.monotonic()
        time.sleep(self.args.warmup)
        self.alive(writer)
        data_dir = self.work / f"host-join-{index}"
        pipeline.data_dirs.append(data_dir)
        env = self.env(
            topic=TOPIC,
            app_id=pipeline.app_id,
            data_dir=data_dir,
            worker_id=f"bench-host-join-{index}",
            writer=False,
        )
        started = time.monotonic()
        joiner = self.start(f"join-{index}", env)
        everything = set(range(PARTITIONS))

        def balanced_at() -> float | None:
            """The first sample, of either probe, at which the two views split every
            partition between them. Both are sampled on their own clocks: the writer's
            /status (it reads the summary DB) can see its revocation after the joiner
            has seen its assignment, so the joiner's change alone is not enough."""
            changes = [when for when, _ in joiner.probe.metrics.assigned]
            changes += [when for when, _ in writer.probe.metrics.assigned]
            for when in sorted(t for t in changes if t >= started):
                held = set(joiner.probe.assigned_at(when))
                mine = set(writer.probe.assigned_at(when))
                if held and mine and not mine & held and mine | held == everything:
                    return when
            return None

        def recovered() -> float | None:
            balanced = balanced_at()
            if balanced is None:
                return None
            both = [first_after(p.probe.raw_progress(), balanced) for p in (writer, joiner)]
            moved = self._moved_after(heads, balanced)
            if moved is None or None in both:
                return None
            return max(moved, *both)  # type: ignore[type-var]

        recovered_at, end = self._observe(
            "the two workers to share the partitions and both bill",
            recovered,
            (writer, joiner),
            heads,
        )
        balanced = balanced_at()
        assert balanced is not None
        both = [first_after(p.probe.raw_progress(), balanced) for p in (writer, joiner)]
        result = self._stalls(
            heads, {"writer": writer, "joiner": joiner}, started, end, warm_from + 2
        )
        first_point = joiner.probe.first_raw_point()
        result.update(
            {
                "balanced_s": balanced - started,
                "both_write_raw_points_s": max(both) - started,  # type: ignore[type-var]
                "joiner_first_raw_point_s": None if first_point is None else first_point - started,
                "recovered_s": recovered_at - started,
                "held_after": {
                    "writer": list(writer.probe.assigned_now()),
                    "joiner": list(joiner.probe.assigned_now()),
                },
                "ready": {
                    "joiner": joiner.ready_summary(started),
                    "writer": writer.ready_summary(started),
                },
                "timeline": {
                    "joiner": joiner.timeline(),
                    "writer_lines": writer.lines_between(started, end),
                },
            }
        )
        self.join_recovered = recovered_at
        self.results["join"].append(result)
        say(f"join #{index + 1}: longest stall {result['seconds']:.1f} s")
        return joiner

    def leave(self, pipeline: Pipeline, joiner: Proc, index: int, heads: HeadsProbe) -> None:
        writer = pipeline.writer
        assert writer is not None
        say(f"leave #{index + 1}: SIGTERM to {joiner.name} under load")
        joiner.freeze_metrics()
        stopped: dict[str, object] = {}

        def stop() -> None:
            code, seconds, killed = joiner.stop()
            stopped.update({"exit_code": code, "seconds": seconds, "killed": killed})

        started = time.monotonic()
        stopper = threading.Thread(target=stop, daemon=True)
        stopper.start()
        everything = tuple(range(PARTITIONS))

        def taken_at() -> float | None:
            return next(
                (
                    t
                    for t, held in writer.probe.metrics.assigned
                    if t >= started and held == everything
                ),
                None,
            )

        def recovered() -> float | None:
            taken = taken_at()
            if taken is None:
                return None
            moved = self._moved_after(heads, taken)
            raw = first_after(writer.probe.raw_progress(), taken)
            return None if moved is None or raw is None else max(moved, raw)

        recovered_at, end = self._observe(
            "the writer to hold every partition and bill them", recovered, (writer,), heads
        )
        stopper.join(timeout=STOP_GRACE_SECONDS + 10)
        steady_from = max(self.join_recovered, started - 30)
        result = self._stalls(heads, {"writer": writer}, started, end, steady_from)
        taken = taken_at()
        result.update(
            {
                "taken_over_s": None if taken is None else taken - started,
                "recovered_s": recovered_at - started,
                "stop": stopped,
                "ready": {"writer": writer.ready_summary(started)},
                "timeline": {
                    "leaver_lines": joiner.lines_between(started, end),
                    "writer_lines": writer.lines_between(started, end),
                },
            }
        )
        self.results["leave"].append(result)
        say(f"leave #{index + 1}: longest stall {result['seconds']:.1f} s")

    def join_and_leave(self, pipeline: Pipeline, index: int) -> None:
        """Steady load, a join, (a leave), the load stopped and the totals checked."""
        writer = pipeline.writer
        assert writer is not None
        heads = HeadsProbe(writer.db)
        heads.start()
        consumed_before = writer.freeze_metrics()
        events_before = self.publisher.load.events
        self.publisher.start_load(TOPIC, self.args.load_rate, f"load-{index}-")
        joiner: Proc | None = None
        try:
            joiner = self.join(pipeline, index, heads)
            if "leave" in self.args.only:
                self.leave(pipeline, joiner, index, heads)
        finally:
            self.publisher.stop_load()
            heads.stop()
        published = self.publisher.load.events - events_before
        pipeline.unique += published
        pipeline.records += published
        self.wait_totals(writer.db, pipeline.unique, pipeline.records, (writer,))
        run = f"join+leave#{index + 1}" if "leave" in self.args.only else f"join#{index + 1}"
        writer_metrics = writer.freeze_metrics()
        consumed = (counter(writer_metrics, "events_consumed") or 0) - (
            counter(consumed_before, "events_consumed") or 0
        )
        if joiner is not None:
            if joiner.final_metrics is None and not joiner.child.exited():
                joiner.freeze_metrics()
            consumed += (
                counter(joiner.final_metrics or joiner.probe.metrics.last, "events_consumed") or 0
            )
        self.check(
            run, "consumed (/metrics, all workers) ≥ load published", 1, int(consumed >= published)
        )
        self.totals_checks(run, writer.db, pipeline.unique, pipeline.records)
        for scenario in ("join", "leave"):
            if self.results[scenario] and len(self.results[scenario]) == index + 1:
                self.results[scenario][-1]["load"] = {
                    "events_per_s": self.args.load_rate,
                    "published": published,
                    "consumed_by_workers": consumed,
                    "late_ticks": self.publisher.load.late_ticks,
                }
        if joiner is not None and not joiner.child.exited():
            joiner.stop()  # --only join: the second worker goes before the next round


def raw_points_check(data_dirs: list[Path]) -> tuple[int, int, int]:
    """(distinct request ids, lines, ids whose lines differ) over the file sink's
    files of ``data_dirs``: a redelivered batch writes the same lines again (one point
    in InfluxDB), never another line for the same request."""
    import gzip

    pattern = re.compile(rb'request_id="((?:[^"\\]|\\.)*)"')
    seen: dict[bytes, int] = {}
    lines = differing = 0
    for data_dir in data_dirs:
        raw = data_dir / "raw"
        if not raw.is_dir():
            continue
        for path in sorted(raw.iterdir()):
            if path.name.endswith(".lp.gz"):
                data = gzip.decompress(path.read_bytes())
            elif path.name.endswith(".lp"):
                data = path.read_bytes()
            else:
                continue
            for line in data.splitlines():
                if not line or line.startswith(b"#"):
                    continue
                found = pattern.search(line)
                if not found:
                    continue
                lines += 1
                key, digest = found.group(1), hash(line)
                if seen.setdefault(key, digest) != digest:
                    differing += 1
    return len(seen), lines, differing


# Report -------------------------------------------------------------------------------

ROWS = (
    ("first-start", "first start, N backlog (marker after it)", "seconds", None),
    ("cold-empty", "cold start, empty topic → marker billed", "seconds", "cold-empty"),
    ("cold-history", "cold start, N history, empty DATA_DIR", "seconds", "cold-history"),
    ("sigkill", "SIGKILL → restart → marker billed", "seconds", "sigkill"),
    ("sigterm", "SIGTERM → restart → marker billed", "seconds", "sigterm"),
    ("join", "second worker joins: longest stall", "seconds", "join"),
    ("leave", "a worker leaves: longest stall", "seconds", "leave"),
)


def _values(runs: list[dict[str, object]], key: str) -> list[float]:
    return [float(run[key]) for run in runs if isinstance(run.get(key), int | float)]  # type: ignore[arg-type]


def summarise(results: dict[str, list[dict[str, object]]]) -> dict[str, dict[str, object]]:
    """Median and every value of each scenario's figure and its companions."""
    summary: dict[str, dict[str, object]] = {}
    for scenario, runs in results.items():
        if not runs:
            continue
        entry: dict[str, object] = {}
        for key in (
            "seconds",
            "process_start_to_billed_s",
            "ready_lead_s",
            "steady_marker_latency_s",
            "steady_longest_gap_s",
            "balanced_s",
            "both_write_raw_points_s",
            "taken_over_s",
            "recovered_s",
        ):
            values = _values(runs, key)
            if values:
                entry[key] = {"median": median(values), "values": values}
        firsts = [
            float(run["ready"]["first_200_s"])  # type: ignore[index]
            for run in runs
            if isinstance(run.get("ready"), dict) and run["ready"].get("first_200_s") is not None  # type: ignore[union-attr]
        ]
        if firsts:
            entry["ready_first_200_s"] = {"median": median(firsts), "values": firsts}
        raw_any = [
            float(run["no_raw_point_by_any_worker"]["seconds"])  # type: ignore[index]
            for run in runs
            if isinstance(run.get("no_raw_point_by_any_worker"), dict)
        ]
        if raw_any:
            entry["no_raw_point_by_any_worker_s"] = {"median": median(raw_any), "values": raw_any}
        summary[scenario] = entry
    return summary


def table(summary: dict[str, dict[str, object]], raw_seconds: float | None) -> list[str]:
    def cell(entry: dict[str, object], key: str) -> str:
        value = entry.get(key)
        if not isinstance(value, dict) or value.get("median") is None:
            return "-"
        return f"{value['median']:.1f}"

    raw = "-" if raw_seconds is None else f"{raw_seconds:.1f}"
    head = (
        f"{'transition':<42} {'median s':>8} {'runs':<18} {'target':>7} {'raw read':>8}"
        f" {'/ready 200':>10} {'steady':>6}"
    )
    lines = [head, "-" * len(head)]
    for key, label, _, target in ROWS:
        entry = summary.get(key)
        if not entry:
            continue
        seconds = entry.get("seconds")
        values = seconds.get("values", []) if isinstance(seconds, dict) else []
        runs = ", ".join(f"{v:.1f}" for v in values)  # type: ignore[union-attr]
        bound = f"≤ {TARGETS[target]:.0f}" if target else "info"
        steady = cell(entry, "steady_marker_latency_s")
        if key in ("join", "leave"):
            steady = cell(entry, "steady_longest_gap_s")
        lines.append(
            f"{label:<42} {cell(entry, 'seconds'):>8} {runs[:18]:<18} {bound:>7} {raw:>8}"
            f" {cell(entry, 'ready_first_200_s'):>10} {steady:>6}"
        )
    lines.append(
        "median s: the figure (restarts: from the signal; cold starts: from the process start;"
        " join/leave: the longest interval a home partition's billing stood still)."
        " raw read: the raw reader's time for the history. /ready 200: first 200 after the"
        " (new) process started. steady: a marker's latency once billing (restarts) or the"
        " longest gap before the join (join/leave)."
    )
    return lines


def run(args: argparse.Namespace, work: Path) -> int:
    with worker_tree(args, work) as tree:
        compile_sources(tree)
        return _run(args, work, tree)


def _run(args: argparse.Namespace, work: Path, tree: Path) -> int:
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    say(f"generating {args.events:,} events + 10 % duplicates + 1 % invalid; worker from {tree}")
    workload = build(args.events, TIMEZONE)
    expected = workload.expected
    assert expected is not None
    document: dict[str, object] = {}
    failure: str | None = None
    raw_seconds: list[float] = []
    with EmbeddedBroker(log_path=work / "tansu.log") as broker:
        bootstrap = f"127.0.0.1:{broker.port}"
        asyncio.run(create_topics(bootstrap, [TOPIC, f"{TOPIC}-dlq"]))
        say(f"producing {expected.records:,} records to {TOPIC}")
        produce_seconds = asyncio.run(produce(bootstrap, TOPIC, workload))
        del workload
        publisher = Publisher(bootstrap).start()
        bench = Transitions(args, work, tree, broker, publisher)
        pipeline: Pipeline | None = None
        try:
            reader = raw_reader(
                bootstrap, TOPIC, PARTITIONS, expected.records, work, 60 + expected.records / 10_000
            )
            if reader.seconds is not None:
                raw_seconds.append(reader.seconds)
            say(f"raw reader: the history in {reader.seconds or 0:.2f} s")
            pipeline = bench.history(expected)
            for index in range(args.repeat):
                if "cold-empty" in args.only:
                    bench.cold_empty(index)
                for scenario in ("sigkill", "sigterm", "cold-history"):
                    if scenario in args.only:
                        bench.restart(pipeline, scenario, index)
                if "join" in args.only:
                    bench.join_and_leave(pipeline, index)
                if index + 1 < args.repeat:
                    again = raw_reader(
                        bootstrap,
                        TOPIC,
                        PARTITIONS,
                        expected.records,
                        work,
                        60 + expected.records / 10_000,
                    )
                    if again.seconds is not None:
                        raw_seconds.append(again.seconds)
            if not args.skip_raw_check:
                distinct, lines, differing = raw_points_check(pipeline.data_dirs)
                bench.check(
                    "raw files",
                    "distinct request ids == unique published",
                    pipeline.unique,
                    distinct,
                )
                bench.check("raw files", "requests with two different lines", 0, differing)
                document["raw_files"] = {"distinct": distinct, "lines": lines}
        except ScenarioFailed as error:
            failure = str(error)
            say(f"FAILED: {failure.splitlines()[0]}")
        finally:
            for proc in bench.procs:
                if not proc.child.exited():
                    proc.stop()
                proc.probe.stop()
            publisher.close()
    summary = summarise(bench.results)
    raw_median = median(raw_seconds)
    fails = [
        f"FAIL {c.run}: {c.name}: expected {c.expected}, got {c.actual}"
        for c in bench.checks
        if not c.ok
    ]
    if failure:
        fails.append(f"FAIL scenario: {failure.splitlines()[0]}")
    document.update(
        {
            "started_at": started_at,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "wall_seconds": time.monotonic() - _STARTED,
            "worker_tree": str(tree),
            "worker_version": git_version(tree),
            "bench_version": git_version(REPO),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "sqlite": sqlite3.sqlite_version,
                "load_average_at_end": os.getloadavg(),
            },
            "events": args.events,
            "expected_history": expected.as_dict(),
            "produce_seconds": produce_seconds,
            "settings": {
                "repeat": args.repeat,
                "scenarios": args.only,
                **{
                    variable: getattr(args, name)
                    if getattr(args, name) is not None
                    else "worker default"
                    for name, variable in TIMEOUT_VARIABLES.items()
                },
                "load_rate": args.load_rate,
                "warmup_s": args.warmup,
                "settle_s": args.settle,
                "env": args.env,
            },
            "raw_reader_seconds": {"median": raw_median, "values": raw_seconds},
            "targets_s": TARGETS,
            "summary": summary,
            "scenarios": bench.results,
            "checks": [c.as_dict() for c in bench.checks],
            "failures": fails,
            "error": failure,
            "ok": not fails,
        }
    )
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "transitions.json"
    write_json(json_path, document)
    print(
        f"transitions: {args.events:,} events of history ({expected.records:,} records),"
        f" worker {document['worker_version']} from {tree}, {args.repeat} run(s) each"
    )
    for line in table(summary, raw_median):
        print(line)
    for line in fails:
        print(line)
    if fails:
        logs = args.out / "transitions-logs"
        logs.mkdir(exist_ok=True)
        for log in work.glob("*.log"):
            shutil.copy(log, logs / log.name)
        print(f"logs of this run: {logs}")
    say(f"wrote {json_path}")
    return 1 if fails else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="usage-transitions-"))
    try:
        return run(args, work)
    finally:
        if args.keep_work:
            say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
