"""A rebuild longer than the session timeout keeps the worker's group membership.

Why: a home partition's state is rebuilt from every request id of
``LEDGER_RETENTION_DAYS``, which grows with the event rate (about 80 s per partition at
10M events a day for 7 days). Run inside aiokafka's rebalance callback, where no
heartbeat is sent, it outlasted the session: the member was expelled mid-rebuild, the
partitions reshuffled, and restarts became a rebalance storm. The hot path now rebuilds
outside the callback with the partitions paused (agents/hot_path/ownership.py
``Ownership.assigned``), so heartbeats go on.

How: the broker is reached through a link whose broker-to-client direction is throttled
per connection (a slow network, as a real fault: the broker advertises the link's port),
so a worker restarted on an empty ``DATA_DIR`` (a host that lost its disk) rebuilds every
home partition from the topics for many seconds, while its heartbeats, small and on
aiokafka's own coordinator connection, still pass. ``/ready`` is watched: 503 while
rebuilding, 200 only once consuming; the rebuild must last several sessions (else the
test proves nothing and says so). The worker must be assigned once, never expelled, and
bill every event once, old and new.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from streams.kafka.broker import EmbeddedBroker, free_port
from tests.harness import Stack, http_get, wait_for
from tests.reliability.test_broker_outage import stack_env

SESSION_SECONDS = 2.0
HISTORY = 20_000
#: bytes per second per connection, broker to client, while throttled
SLOW_LINK = 150_000


class ThrottledLink:
    """A TCP relay in front of the broker; ``throttle`` bounds each connection's
    broker-to-client bytes per second (None: as fast as it goes)."""

    def __init__(self, listen_port: int, broker_port: int) -> None:
        self.broker_port = broker_port
        self.throttle: int | None = None
        self.server = socket.create_server(("127.0.0.1", listen_port))
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.broker_port))
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, slow: bool) -> None:
        try:
            while chunk := source.recv(16_384):
                target.sendall(chunk)
                rate = self.throttle if slow else None
                if rate:
                    time.sleep(len(chunk) / rate)
        except OSError:
            pass
        finally:
            for end in (source, target):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                end.close()

    def close(self) -> None:
        self.closed = True
        self.server.close()


@pytest.fixture
def slow_stack(tmp_path: Path) -> Iterator[tuple[Stack, ThrottledLink]]:
    link_port = free_port()
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log", advertised_port=link_port)
    link = ThrottledLink(link_port, broker.port)
    broker.start()
    stack = Stack(broker, tmp_path, stack_env(broker, tmp_path, f"slow-{os.getpid()}"))
    try:
        yield stack, link
    finally:
        for worker in stack.workers:
            worker.kill()
        link.close()
        broker.stop()


def usage_events(tag: str, count: int) -> tuple[list[bytes], list[bytes | None]]:
    now = int(time.time() * 1000)
    values = [
        orjson.dumps(
            {
                "request_id": f"{tag}-{i}",
                "client_org_id": f"org-{i % 7}",
                "user_id": f"user-{i % 11}",
                "model": "m",
                "input_tokens": 3,
                "output_tokens": 2,
                "cost_usd": "0.002",
                "timestamp": now - i,
            }
        )
        for i in range(count)
    ]
    return values, [f"{tag}-{i}".encode() for i in range(count)]


def watch_phases(url: str, stop: threading.Event, seen: list[tuple[float, str]]) -> None:
    """``/ready``'s phase every 0.1 s, with the time it was seen."""
    while not stop.is_set():
        try:
            code, body = http_get(url + "/ready", timeout=2)
            if code == 0:  # not listening yet
                phase = "down"
            else:
                phase = orjson.loads(body).get("phase", "?") if code in (200, 503) else "?"
            if (code == 200) != (phase == "consuming"):
                phase = f"{phase} with {code}"  # never expected
        except (OSError, ValueError):
            phase = "down"
        seen.append((time.monotonic(), phase))
        time.sleep(0.1)


def test_a_rebuild_longer_than_the_session_keeps_its_membership(
    slow_stack: tuple[Stack, ThrottledLink],
) -> None:
    stack, link = slow_stack
    first = stack.worker().start()
    first.wait_ready()
    values, keys = usage_events("old", HISTORY)
    stack.publish(values, keys)
    wait_for(lambda: stack.billed_requests() == HISTORY, 180, "the history billed")
    assert first.stop() == 0

    stack.env["DATA_DIR"] = str(stack.root / "lost-disk")  # its summary DB is rebuilt too
    restarted = stack.worker(
        KAFKA_SESSION_TIMEOUT_SECONDS=str(SESSION_SECONDS),
        KAFKA_HEARTBEAT_INTERVAL_SECONDS="0.5",
    )
    link.throttle = SLOW_LINK
    seen: list[tuple[float, str]] = []
    stop = threading.Event()
    watcher = threading.Thread(target=watch_phases, args=(restarted.web, stop, seen))
    restarted.start()
    watcher.start()
    try:
        restarted.wait_ready(timeout=300)
    finally:
        stop.set()
        watcher.join()
    link.throttle = None

    # 503 until every home partition is rebuilt, then 200 (agents/web/readiness.py)
    phases = [phase for _, phase in seen]
    consuming = phases.index("consuming") if "consuming" in phases else len(phases)
    assert set(phases[:consuming]) <= {"down", "starting", "joining", "rebuilding"}, phases
    assert "rebuilding" not in phases[consuming:], phases
    rebuilding = [at for at, phase in seen if phase == "rebuilding"]
    assert rebuilding, f"no rebuilding phase seen: {seen[:20]}"
    lasted = rebuilding[-1] - rebuilding[0]
    assert lasted > 3 * SESSION_SECONDS, (
        f"the rebuild took {lasted:.1f} s, not long enough to test the session"
        f" ({SESSION_SECONDS} s): make SLOW_LINK smaller or HISTORY larger"
    )
    log = restarted.log_path.read_text()
    assert log.count("hot path: assigned home partitions") == 1, restarted.log_tail(80)
    for expelled in ("revoked", "Heartbeat session expired", "UnknownMemberIdError"):
        assert expelled not in log, restarted.log_tail(80)

    values, keys = usage_events("new", 500)
    stack.publish(values, keys)
    stack.publish(values[:100], keys[:100])  # copies: billed once
    wait_for(lambda: stack.billed_requests() == HISTORY + 500, 120, "the new events billed")
    time.sleep(3)  # a double count would show now
    assert stack.billed_requests() == HISTORY + 500
    assert restarted.stop() == 0
