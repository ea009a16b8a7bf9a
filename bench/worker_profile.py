"""Profile ``usage-stream worker`` without the whole benchmark: one broker kept up while
the worker is run (and changed) again and again, with where the machine's CPU went.

    .venv/bin/python bench/worker_profile.py serve DIR [--events N] [--workload W]  # until ^C
    .venv/bin/python bench/worker_profile.py run DIR [--influx] [--py-spy OUT] [--times K]
                                              [--tree CHECKOUT]

``serve`` starts Tansu, produces bench/workload.py's events (same shape as bench/run.py)
and writes ``DIR/env.json``. ``run`` runs a worker from the start of the topic with a
fresh data dir and consumer group until every record is processed (bench/worker_run.py's
measurement and count checks), optionally with InfluxDB 1.x as the raw sink, under
``py-spy record -f raw --threads --idle``, or from another checkout (``--tree``, e.g. a
``git worktree`` of the commit before, for A/B runs on one broker). It prints the CPU
seconds each process used (/proc/PID/stat), over the whole run and over the timed window
(first to last record processed), with the worker split into its main thread and the
rest: on 2 cores shared with the broker (and influxd), what the worker's main thread
can gain depends on what the others leave it, and a main thread below one core is
waiting, not computing. It also prints what the run wrote to its batch log
(bench/batch_log_stats.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.batch_log_stats import batch_log_stats  # noqa: E402
from bench.procwatch import child_processes  # noqa: E402
from bench.run import INFLUX_DATABASE, compile_sources  # noqa: E402
from bench.worker_run import processed_offsets, run_worker, worker_env  # noqa: E402
from bench.workload import WORKLOADS, Expected, build, create_topics, produce  # noqa: E402
from streams.kafka.broker import EmbeddedBroker, free_port  # noqa: E402

TOPIC = "bench-usage"
TIMEZONE = "Europe/Warsaw"
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """(command name, user+system CPU seconds) of every process we can read."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        found[int(entry.name)] = (name, (int(fields[11]) + int(fields[12])) / _TICKS)
    return found


class CpuWatch(threading.Thread):
    """Samples every process's CPU time until stopped, so a process that exits before the
    end (the worker is stopped after its last record) still counts what it used."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.before = cpu_by_process()
        self.last = dict(self.before)
        self.started = time.monotonic()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.25):
            self.last.update(cpu_by_process())

    def report(self) -> str:
        self.done.set()
        self.join()
        self.last.update(cpu_by_process())
        return cpu_report(self.before, self.last, time.monotonic() - self.started)


class WindowWatch(threading.Thread):
    """CPU of the worker's main thread, its other threads and every other process between
    the first processed record and the last (what the benchmark times)."""

    def __init__(self, db: Path, records: int) -> None:
        super().__init__(daemon=True)
        self.db, self.records = db, records
        self.start_cpu: dict[int, tuple[str, float]] = {}
        self.end_cpu: dict[int, tuple[str, float]] = {}
        self.window: tuple[float, float] | None = None
        self.pid: int | None = None

    def _threads(self) -> dict[int, tuple[str, float]]:
        """Per process, with the worker split into its main thread and the rest."""
        found = cpu_by_process()
        if self.pid is not None and self.pid in found:
            main = _stat_cpu(Path(f"/proc/{self.pid}/task/{self.pid}/stat"))
            if main is not None:
                found[-1] = ("worker main thread", main)
                found[self.pid] = ("worker other threads", found[self.pid][1] - main)
        return found

    def run(self) -> None:
        began: float | None = None
        while True:
            if self.pid is None:
                self.pid = next(iter(_workers()), None)
            done = processed_offsets(self.db, TOPIC)
            if began is None and done > 0:
                began, self.start_cpu = time.monotonic(), self._threads()
            if began is not None and done >= self.records:
                self.end_cpu = self._threads()
                self.window = (began, time.monotonic())
                return
            time.sleep(0.1)

    def report(self) -> str:
        if self.window is None:
            return "no window measured"
        began, ended = self.window
        return "timed window " + cpu_report(self.start_cpu, self.end_cpu, ended - began)


def _stat_cpu(path: Path) -> float | None:
    try:
        raw = path.read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _workers() -> list[int]:
    found = []
    for pid in child_processes(os.getpid()):
        with contextlib.suppress(OSError):
            if b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                found.append(pid)
    return found


def cpu_report(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], seconds: float
) -> str:
    """CPU seconds per process name between two samples (processes that started since
    count from zero), busiest first, with the share of the machine's cores."""
    used: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        start = before.get(pid, (name, 0.0))[1]
        if cpu - start > 0.05:
            used[name] = used.get(name, 0.0) + cpu - start
    cores = os.cpu_count() or 1
    total = sum(used.values())
    lines = [f"CPU over {seconds:.1f} s ({cores} cores, {total / seconds:.2f} busy):"]
    for name, cpu in sorted(used.items(), key=lambda item: -item[1]):
        lines.append(f"  {name:<20} {cpu:7.1f} s  {cpu / seconds:5.2f} cores")
    return "\n".join(lines)


def serve(directory: Path, events: int, workload_name: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    workload = build(events, TIMEZONE, workload=workload_name)
    expected = workload.expected
    assert expected is not None
    with EmbeddedBroker(log_path=directory / "tansu.log") as broker:
        bootstrap = f"127.0.0.1:{broker.port}"
        asyncio.run(create_topics(bootstrap, [TOPIC, f"{TOPIC}-dlq"]))
        seconds = asyncio.run(produce(bootstrap, TOPIC, workload))
        print(f"produced {expected.records:,} records in {seconds:.1f} s", file=sys.stderr)
        state = {
            "broker_url": broker.url,
            "bootstrap": bootstrap,
            "expected": expected.as_dict(),
        }
        (directory / "env.json").write_bytes(orjson.dumps(state))
        print(f"ready: {directory / 'env.json'}", file=sys.stderr, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


@contextlib.contextmanager
def _influx(enabled: bool) -> Iterator[dict[str, str]]:
    if not enabled:
        yield {}
        return
    from tests.servers import influxd_server

    with influxd_server() as server:
        server.create_database(INFLUX_DATABASE)
        yield {"INFLUXDB_URL": server.url, "INFLUXDB_DATABASE": INFLUX_DATABASE}


def _spy_on_child(out: Path) -> None:
    """Attach ``py-spy record`` (raw, 100 Hz, per thread, idle samples too) to the worker
    we start; it ends with the worker. ``--nonblocking``: see the README (Performance)."""
    spy = str(Path(sys.executable).parent / "py-spy")
    for _ in range(400):
        for pid in _workers():
            subprocess.run(
                [spy, "record", "--pid", str(pid), "-o", str(out), "-f", "raw"]
                + ["-r", "100", "--idle", "--threads", "--nonblocking"],
                capture_output=True,
            )
            return
        time.sleep(0.05)


def run(directory: Path, influx: bool, py_spy: Path | None, index: int, tree: Path) -> None:
    state = orjson.loads((directory / "env.json").read_bytes())
    expected = Expected(**state["expected"])
    name = f"run-{os.getpid()}-{index}"
    with _influx(influx) as extra:
        env = worker_env(
            broker_url=state["broker_url"],
            topic=TOPIC,
            data_dir=directory / name / "data",
            app_id=f"profile-{name}",
            web_port=free_port(),
            timezone=TIMEZONE,
            extra=extra,
        )
        (directory / name).mkdir(parents=True, exist_ok=True)
        if py_spy is not None:
            threading.Thread(target=_spy_on_child, args=(py_spy,), daemon=True).start()
        watch, window = (
            CpuWatch(),
            WindowWatch(directory / name / "data" / "usage.db", expected.records),
        )
        watch.start()
        window.start()
        result, checks = run_worker(
            name,
            name,
            env,
            expected,
            directory / name / "worker.log",
            600,
            progress=False,
            cwd=tree,
        )
        print(watch.report())
        print(window.report())
        if result.error is None and "bootstrap" in state:
            log = batch_log_stats(
                state["bootstrap"], env["APP_ID"], expected.records, expected.unique
            )
            print(
                f"batch log: {log.entries:,} entries, {log.rows:,} rows"
                f" ({log.rows_per_unique_event or 0:.2f} per unique event),"
                f" {log.bytes_per_event or 0:.1f} B per record,"
                f" largest {log.largest_record_bytes:,} B ({log.largest_record_rows:,} rows)"
            )
    wrong = [check for check in checks if not check.ok]
    print(
        f"{tree.name} {'influx' if influx else 'file'}: {result.events_per_s or 0:,.0f} records/s, "
        f"peak RSS {result.peak_rss_mb or 0:.0f} MB"
        + (f", ERROR {result.error}" if result.error else "")
        + (f", WRONG {wrong}" if wrong else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("serve", "run"))
    parser.add_argument("dir", type=Path)
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--workload", choices=WORKLOADS, default="default")
    parser.add_argument("--times", type=int, default=1)
    parser.add_argument("--influx", action="store_true")
    parser.add_argument("--py-spy", type=Path, default=None)
    parser.add_argument("--tree", type=Path, default=REPO, help="the checkout whose worker runs")
    args = parser.parse_args()
    if args.mode == "serve":
        serve(args.dir, args.events, args.workload)
        return
    compile_sources(args.tree)  # as bench/run.py does
    for index in range(args.times):
        run(args.dir, args.influx, args.py_spy, index, args.tree)


if __name__ == "__main__":
    main()
