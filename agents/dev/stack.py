"""``usage-stream dev``: the embedded default stack on localhost.

Starts the bundled Tansu broker, a ``usage-stream worker`` child process and, with
``--demo``, a synthetic producer that first backfills the last :data:`BACKFILL_DAYS` local
days (closed days, so a bill exists within a minute) and then sends live events. The demo
also sets a budget with alerts and a price-book rule, and prints the budget alerts the
worker POSTs to its webhook (:mod:`agents.dev.demo_billing`). A status line shows what the
worker reports (:mod:`agents.dev.status`).

Stopping (Ctrl-C, SIGTERM or SIGHUP) goes in dependency order, each step logged with its
duration: the producer (it needs the broker), then the worker (SIGTERM, so it commits and
leaves its group while the broker still answers), then the broker. Stopping the broker
first, as before, left the worker logging connection errors until it gave up.

The terminal sends Ctrl-C's SIGINT to its whole foreground process group, which would hit
the children at the same moment as this process and undo that order. So the worker runs
in a process group of its own, and the broker is started with SIGINT blocked (the signal
mask survives ``exec``; ``EmbeddedBroker`` offers no process-group option), so SIGINT
reaches only this process. Both children are also told by the kernel to stop should this
process die (``die_with_parent``): no orphans.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import TextIO

from agents.dev.demo import backfill_days, backfill_lines, demo_lines
from agents.dev.demo_billing import AlertPrinter, set_up_demo_billing
from agents.dev.status import StatusLine
from streams.cli import fail
from streams.kafka.broker import EmbeddedBroker, die_with_parent, free_port
from streams.kafka.producer import publish_lines
from streams.settings import Settings

__all__ = ["BACKFILL_DAYS", "run_dev_stack"]

BACKFILL_DAYS = 3
BACKFILL_EVENTS_PER_DAY = 300
PRODUCER_STOP_SECONDS = 3.0
#: the worker exits within its own grace (streams/worker.py STOP_DEADLINE_SECONDS, 9 s)
WORKER_STOP_SECONDS = 12.0


async def _paced(rate: int, stop: asyncio.Event) -> AsyncIterator[bytes]:
    lines = demo_lines()
    while not stop.is_set():
        started = time.monotonic()
        for _ in range(max(rate // 10, 1)):
            yield next(lines)
        await asyncio.sleep(max(0.1 - (time.monotonic() - started), 0))


async def _demo_events(settings: Settings, rate: int, stop: asyncio.Event) -> AsyncIterator[bytes]:
    """The past days first (sent at once), then ``rate`` live events per second."""
    for line in backfill_lines(settings.tz, BACKFILL_DAYS, BACKFILL_EVENTS_PER_DAY):
        if stop.is_set():
            return
        yield line
    async for line in _paced(rate, stop):
        yield line


def _start_broker(settings: Settings) -> EmbeddedBroker:
    broker = EmbeddedBroker(port=free_port(), log_path=settings.DATA_DIR / "broker.log")
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return broker.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _command_hint() -> str:
    """How to call ``usage-stream`` from here: on PATH, or the venv's script."""
    if shutil.which("usage-stream"):
        return "usage-stream"
    script = Path(sys.executable).parent / "usage-stream"
    with contextlib.suppress(ValueError):
        return str(script.relative_to(Path.cwd()))
    return str(script)


def _look_at(settings: Settings) -> list[str]:
    """The closing lines of the banner: a report command and the URLs to open."""
    today = datetime.now(settings.tz).date()
    days = backfill_days(settings.tz, BACKFILL_DAYS, today)
    month = (today - timedelta(days=1)).strftime("%Y-%m")
    prefix = ""
    if settings.summary_db_path.resolve() != (Path("data") / "usage.db").resolve():
        prefix = f"SUMMARY_DB_PATH={settings.summary_db_path} "
    return [
        f"report:      {prefix}{_command_hint()} report --month {month} --detail",
        f"usage:       http://127.0.0.1:{settings.WEB_PORT}/usage?client_org_id=org-1"
        f"&from={days[0].isoformat()}&to={today.isoformat()}",
        f"query:       http://127.0.0.1:{settings.WEB_PORT}/v1/usage/query"
        f"?from={days[0].isoformat()}&to={today.isoformat()}&granularity=month",
    ]


def _log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S.%f')[:-3]}] {message}", flush=True)


async def _wait_process(process: subprocess.Popen[bytes], seconds: float) -> bool:
    """True when ``process`` exited within ``seconds`` (polled: the event loop stays free)."""
    deadline = time.monotonic() + seconds
    while process.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return process.poll() is not None


class _SafeOutput(io.TextIOBase):
    """This process's stdout, where a write that fails ends output, not the shutdown.

    Why: ``usage-stream dev --demo | tee demo.log`` and Ctrl-C: the terminal's SIGINT
    kills ``tee`` with this process, whose next line then raised ``BrokenPipeError`` in
    the middle of stopping the stack in order; this process died, and the kernel sent
    its children SIGTERM all at once (``die_with_parent``): a worker whose broker went
    first. Now the first failed write points file descriptor 1 at ``/dev/null`` (also
    for Python's flush at exit) and output stops; the shutdown goes on in order."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                self._silence()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self._silence()

    def isatty(self) -> bool:
        return not self.broken and self.stream.isatty()

    def _silence(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)


async def run_dev_stack(settings: Settings, demo: bool, rate: int) -> None:
    """Run until a stop signal (or the worker's death), then stop everything in order."""
    if not isinstance(sys.stdout, _SafeOutput):
        sys.stdout = _SafeOutput(sys.stdout)
    settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
    alerts: AlertPrinter | None = None
    billing_lines: list[str] = []
    if demo:  # before the worker starts: its first pass knows the budget and the rule
        alerts = AlertPrinter(_log)
        await alerts.start()
        try:
            billing_lines = set_up_demo_billing(settings, alerts.url)
        except Exception as error:  # an unwritable DB, a refused rule: one line
            await alerts.stop()
            fail(f"demo budget and markup rule: {' '.join(str(error).split())}")
    broker = _start_broker(settings)
    env = {
        **os.environ,
        "KAFKA_BROKER": broker.url,
        "DATA_DIR": str(settings.DATA_DIR),
        "KAFKA_SESSION_TIMEOUT_SECONDS": os.environ.get("KAFKA_SESSION_TIMEOUT_SECONDS", "10"),
        "KAFKA_REBALANCE_TIMEOUT_SECONDS": os.environ.get("KAFKA_REBALANCE_TIMEOUT_SECONDS", "10"),
        "KAFKA_HEARTBEAT_INTERVAL_SECONDS": os.environ.get("KAFKA_HEARTBEAT_INTERVAL_SECONDS", "1"),
        "RECOVERY_CONSISTENCY_CHECK": "false",  # Tansu's end offsets are wrong
        "KAFKA_STATIC_MEMBERSHIP": "false",  # wedges Tansu groups (streams/settings.py)
    }
    worker_log = settings.DATA_DIR / "worker.log"
    with worker_log.open("ab") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "agents", "worker", "--loglevel", "info"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
            process_group=0,
        )
    stop = asyncio.Event()
    signals: list[str] = []

    def on_signal(signum: int) -> None:
        signals.append(signal.Signals(signum).name)
        stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, on_signal, signum)
    print(f"broker:      {broker.url} (embedded Tansu, in memory)")
    print(f"worker:      pid {worker.pid}, log {worker_log}")
    print(f"summaries:   {settings.summary_db_path}")
    print(f"raw points:  {settings.raw_dir}/ (line protocol, one file per day)")
    print(
        f"metrics:     http://127.0.0.1:{settings.WEB_PORT}/metrics (also /health /ready /status)"
    )
    if demo:
        days = backfill_days(settings.tz, BACKFILL_DAYS)
        print(
            f"demo:        {rate} events/s now, plus {BACKFILL_EVENTS_PER_DAY} per day for "
            f"{days[0].isoformat()}..{days[-1].isoformat()}: those days close within "
            f"{settings.ROLLUP_INTERVAL_SECONDS:g} s, so their bills are in at once"
        )
        for line in billing_lines + _look_at(settings):
            print(line)
    print("Ctrl-C stops everything.", flush=True)

    producer: asyncio.Task[int] | None = None
    if demo:
        producer_settings = settings.model_copy(update={"KAFKA_BROKER": broker.url})
        producer = asyncio.create_task(
            publish_lines(producer_settings, _demo_events(settings, rate, stop))
        )
    status_line = StatusLine(f"http://127.0.0.1:{settings.WEB_PORT}")
    status = asyncio.create_task(status_line.run(stop))
    worker_died = worker_clean = False
    try:
        while not stop.is_set():
            if worker.poll() is not None:
                worker_died = True
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(status, 3)
        status_line.finish()
        began = time.monotonic()
        _log(f"stopping ({signals[0] if signals else 'worker exited'}): producer, worker, broker")
        await _stop_producer(producer)
        worker_clean = await _stop_worker(worker, worker_died, worker_log)
        step = time.monotonic()
        broker.stop()
        _log(f"broker stopped ({time.monotonic() - step:.1f} s)")
        if alerts is not None:
            await alerts.stop()
        _log(f"stopped producer, worker and broker in {time.monotonic() - began:.1f} s")
    if worker_died or not worker_clean:
        raise SystemExit(1)  # the worker crashed (or hung): its log says why


async def _stop_producer(producer: asyncio.Task[int] | None) -> None:
    """The producer ends its generator at ``stop`` and flushes; cancelled if it hangs."""
    if producer is None:
        return
    step = time.monotonic()
    try:
        sent = await asyncio.wait_for(producer, PRODUCER_STOP_SECONDS)
        _log(f"producer stopped: {sent} events sent ({time.monotonic() - step:.1f} s)")
    except TimeoutError:
        _log(f"producer did not stop in {PRODUCER_STOP_SECONDS:g} s: cancelled")
    except Exception as error:  # a broker error ends the demo, not the shutdown
        _log(f"producer stopped with {type(error).__name__}: {error}")


async def _stop_worker(worker: subprocess.Popen[bytes], died: bool, log: Path) -> bool:
    """SIGTERM and wait (Faust commits offsets and leaves the group), SIGKILL if it hangs.

    True when the worker stopped cleanly (exit 0 on SIGTERM)."""
    step = time.monotonic()
    if died:
        _log(f"worker exited with {worker.returncode}; see {log}")
        return False
    worker.terminate()
    if not await _wait_process(worker, WORKER_STOP_SECONDS):
        worker.kill()
        await _wait_process(worker, 5)
        _log(f"worker did not stop in {WORKER_STOP_SECONDS:g} s: killed; see {log}")
        return False
    ended = f"({time.monotonic() - step:.1f} s)"
    if worker.returncode != 0:
        _log(f"worker stopped: exit {worker.returncode} {ended}; see {log}")
        return False
    _log(f"worker stopped: exit 0 {ended}")
    return True
