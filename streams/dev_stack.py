"""``usage-stream dev``: the embedded default stack on localhost.

Starts the bundled Tansu broker, a ``usage-stream worker`` child process and, with
``--demo``, a synthetic producer. Ctrl-C (or SIGTERM) stops all of them; the broker and
worker are also told by the kernel to stop should this process die (no orphans).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time

from streams.broker import EmbeddedBroker, die_with_parent, free_port
from streams.demo import demo_lines
from streams.producer import publish_lines
from streams.settings import Settings

__all__ = ["run_dev_stack"]


async def _paced(rate: int, stop: asyncio.Event):  # noqa: ANN202 - async generator
    lines = demo_lines()
    while not stop.is_set():
        started = time.monotonic()
        for _ in range(max(rate // 10, 1)):
            yield next(lines)
        await asyncio.sleep(max(0.1 - (time.monotonic() - started), 0))


async def run_dev_stack(settings: Settings, demo: bool, rate: int) -> None:
    settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
    broker = EmbeddedBroker(port=free_port(), log_path=settings.DATA_DIR / "broker.log")
    broker.start()
    env = {
        **os.environ,
        "KAFKA_BROKER": broker.url,
        "DATA_DIR": str(settings.DATA_DIR),
        "KAFKA_SESSION_TIMEOUT_SECONDS": os.environ.get("KAFKA_SESSION_TIMEOUT_SECONDS", "10"),
        "KAFKA_REBALANCE_TIMEOUT_SECONDS": os.environ.get("KAFKA_REBALANCE_TIMEOUT_SECONDS", "10"),
        "KAFKA_HEARTBEAT_INTERVAL_SECONDS": os.environ.get("KAFKA_HEARTBEAT_INTERVAL_SECONDS", "1"),
        "RECOVERY_CONSISTENCY_CHECK": "false",  # Tansu's end offsets are wrong
    }
    worker_log = settings.DATA_DIR / "worker.log"
    with worker_log.open("ab") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "streams", "worker", "--loglevel", "info"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"broker:      {broker.url} (embedded Tansu, in memory)")
    print(f"worker:      pid {worker.pid}, log {worker_log}")
    print(f"summaries:   {settings.summary_db_path}")
    print(f"raw points:  {settings.raw_dir}/ (line protocol, one file per day)")
    print(
        f"metrics:     http://127.0.0.1:{settings.WEB_PORT}/metrics (also /health /ready /status)"
    )
    print("Ctrl-C stops everything.", flush=True)
    producer: asyncio.Task[int] | None = None
    try:
        if demo:
            producer_settings = settings.model_copy(update={"KAFKA_BROKER": broker.url})
            producer = asyncio.create_task(publish_lines(producer_settings, _paced(rate, stop)))
        while not stop.is_set() and worker.poll() is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
        if worker.poll() is not None:
            print(f"worker exited with {worker.returncode}; see {worker_log}", file=sys.stderr)
    finally:
        stop.set()
        if producer is not None:
            with contextlib.suppress(Exception):
                print(f"demo producer sent {await producer} events")
        if worker.poll() is None:
            worker.terminate()
            try:
                await asyncio.to_thread(worker.wait, 30)
            except subprocess.TimeoutExpired:
                worker.kill()
        broker.stop()
        print("stopped broker and worker")
