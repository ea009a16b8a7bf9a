"""Stopping, as an operator does it: within the grace, whatever is broken, losing nothing.

* A worker told to stop after its broker died exits within its grace (streams/worker.py).
* A worker told to stop leaves its group: another worker takes its partitions, and every
  event is billed once.
* ``usage-stream dev --demo | tee demo.log`` and Ctrl-C in a real terminal (a pty): tee
  dies with the same Ctrl-C, and dev still stops the producer, the worker and the broker
  in order, leaving nothing running.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time
from pathlib import Path

import orjson

from streams.kafka.broker import EmbeddedBroker, free_port
from tests.harness import REPO, Stack, http_get, wait_for
from tests.reliability.test_broker_outage import stack_env

#: streams/worker.py exits at 9 s at the latest; the rest is the interpreter's exit
GRACE_SECONDS = 10.0


def events(tag: str, count: int) -> tuple[list[bytes], list[bytes | None]]:
    now = int(time.time() * 1000)
    values = [
        orjson.dumps(
            {
                "request_id": f"{tag}-{i}",
                "client_org_id": "org-1",
                "user_id": f"user-{i % 3}",
                "model": "m",
                "input_tokens": 2,
                "output_tokens": 1,
                "cost_usd": "0.001",
                "timestamp": now - i,
            }
        )
        for i in range(count)
    ]
    return values, [f"{tag}-{i}".encode() for i in range(count)]


def test_a_worker_told_to_stop_after_its_broker_died_exits_in_time(tmp_path: Path) -> None:
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
    stack = Stack(broker, tmp_path, stack_env(broker, tmp_path, f"stop-{os.getpid()}"))
    worker = stack.worker().start()
    try:
        worker.wait_ready()
        stack.publish(*events("before", 200))
        wait_for(lambda: stack.billed_requests() == 200, 60, "billing")
    finally:
        broker.kill()
    time.sleep(2)  # its clients notice
    assert worker.process is not None
    asked = time.monotonic()
    worker.process.send_signal(signal.SIGTERM)
    worker.process.wait(timeout=30)
    assert time.monotonic() - asked <= GRACE_SECONDS, worker.log_tail()


def test_a_stopped_worker_leaves_its_group_and_nothing_is_lost(stack: Stack) -> None:
    staying = stack.worker().start()
    leaving = stack.worker(SUMMARY_WRITER="false", DATA_DIR=str(stack.root / "b")).start()
    wait_for(
        lambda: (
            len(staying.status().get("assigned_partitions", [])) == 2
            and len(leaving.status().get("assigned_partitions", [])) == 2
        ),
        120,
        "the partitions shared",
    )
    stack.publish(*events("first", 400))
    wait_for(lambda: stack.billed_requests() == 400, 60, "the first events")
    assert leaving.stop() == 0
    assert "hot path: left the consumer group" in leaving.log_path.read_text()
    stack.publish(*events("second", 400))
    wait_for(lambda: stack.billed_requests() == 800, 90, "every event billed once")
    time.sleep(2)
    assert stack.billed_requests() == 800
    assert len(staying.status()["assigned_partitions"]) == 4


def _read(fd: int, into: list[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            into.append(chunk)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int(Path(entry, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def test_dev_piped_into_tee_stops_in_order_on_ctrl_c_in_a_terminal(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("INFLUXDB_", "KAFKA_"))},
        "DATA_DIR": str(data),
        "WEB_PORT": str(free_port()),
        "NBP_API_URL": "http://127.0.0.1:9/api",
        "OPENROUTER_API_URL": "http://127.0.0.1:9/api/v1",
        "PYTHONUNBUFFERED": "1",
    }
    command = f"{sys.executable} -m agents dev --demo | tee {tmp_path / 'demo.log'}"
    pid, fd = pty.fork()
    if pid == 0:  # the child: a shell on the pty, as in a terminal
        os.chdir(REPO)
        os.execvpe("bash", ["bash", "-c", command], env)
    output: list[bytes] = []
    try:
        wait_for(
            lambda: _read(fd, output, 1) or b"Ctrl-C stops everything" in b"".join(output),
            90,
            "the banner",
        )
        web = f"http://127.0.0.1:{env['WEB_PORT']}"
        wait_for(lambda: http_get(web + "/ready")[0] == 200, 90, "the worker consuming")
        time.sleep(2)  # the demo under way
        everything = _descendants(pid)
        assert len(everything) >= 4, everything  # dev, tee, the broker, the worker
        os.write(fd, b"\x03")  # Ctrl-C: SIGINT to the terminal's foreground process group
        _read(fd, output, 20)
        wait_for(lambda: not any(map(_alive, everything)), 30, "every process gone")
    finally:
        for process in _descendants(pid):
            os.kill(process, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)
    log = (data / "worker.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    # the worker stopped on dev's SIGTERM, with its broker still there: in order
    assert re.search(r"Signal received: (Signals\.SIGTERM|15) ", log), log[-3000:]
    assert "Unable connect" not in log.split("Signal received")[-1]
