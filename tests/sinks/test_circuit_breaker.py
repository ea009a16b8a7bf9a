"""RawSink retry, backoff and circuit breaker, with a scriptable writer and a real outage."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

import pytest

from streams.sinks.base import RawSink, describe_error
from streams.sinks.influx_v1 import InfluxV1Writer
from streams.sinks.lineprotocol import RawPoint

from .conftest import EVENT_MS, metric

Factory = Callable[..., RawPoint]

GAUGE = "usage_stream_raw_sink_circuit_open"
ERRORS = "usage_stream_raw_write_errors_total"
WRITTEN = "usage_stream_raw_points_written_total"
SECRET_URL = "http://admin:hunter2@influx.internal:8086/write?db=x&u=admin&p=hunter2"


class ScriptedWriter:
    """A RawWriter that fails while ``down`` or for the next ``fail_next`` attempts."""

    def __init__(self, fail_next: int = 0) -> None:
        self.fail_next = fail_next
        self.down = False
        self.attempts: list[tuple[float, int, bool]] = []  # (monotonic, lines, ok)
        self.stored: list[str] = []

    async def write_lines(self, lines: list[str]) -> None:
        ok = not self.down and self.fail_next <= 0
        self.attempts.append((time.monotonic(), len(lines), ok))
        if not ok:
            self.fail_next -= 1
            raise ConnectionError(f"Cannot connect to {SECRET_URL}\nsecond line")
        self.stored.extend(lines)

    async def close(self) -> None:
        pass

    def gaps(self) -> list[float]:
        times = [t for t, _, _ in self.attempts]
        return [b - a for a, b in zip(times, times[1:], strict=False)]


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_transient_failures_back_off_exponentially(make_point: Factory) -> None:
    writer = ScriptedWriter(fail_next=2)
    sink = RawSink(writer, backoff_base=0.05, backoff_cap=0.2)
    errors, written = metric(ERRORS), metric(WRITTEN)
    await sink.write([make_point(), make_point()])
    assert [ok for _, _, ok in writer.attempts] == [False, False, True]
    first, second = writer.gaps()
    assert 0.045 <= first < 0.15 and 0.095 <= second < 0.19  # 1x, 2x the base
    assert len(writer.stored) == 2
    assert metric(ERRORS) - errors == 2 and metric(WRITTEN) - written == 2
    assert sink.consecutive_failures == 0 and not sink.circuit_open
    assert metric(GAUGE) == 0


async def test_circuit_opens_after_three_failures_and_probes_once_per_interval(
    make_point: Factory,
) -> None:
    writer = ScriptedWriter()
    writer.down = True
    sink = RawSink(writer, backoff_base=0.02, backoff_cap=0.05, open_interval=0.15)
    task = asyncio.create_task(sink.write([make_point()]))
    await wait_until(lambda: len(writer.attempts) == 2)
    assert not sink.circuit_open and metric(GAUGE) == 0
    await wait_until(lambda: sink.circuit_open)
    assert sink.consecutive_failures == 3 and metric(GAUGE) == 1
    await wait_until(lambda: len(writer.attempts) == 6)  # three probes while open
    writer.down = False
    await asyncio.wait_for(task, 5)
    assert not sink.circuit_open and sink.consecutive_failures == 0 and metric(GAUGE) == 0
    gaps = writer.gaps()
    assert gaps[0] < 0.12 and gaps[1] < 0.12  # closed: backoff 0.02, 0.04
    assert all(g >= 0.14 for g in gaps[2:])  # open: one probe per open interval
    assert writer.stored and writer.attempts[-1][2]


async def test_concurrent_writers_do_not_hammer_an_open_circuit(make_point: Factory) -> None:
    writer = ScriptedWriter()
    writer.down = True
    sink = RawSink(writer, backoff_base=0.01, backoff_cap=0.05, open_interval=0.1)
    tasks = [asyncio.create_task(sink.write([make_point()])) for _ in range(5)]
    await wait_until(lambda: sink.circuit_open)
    opened_at = len(writer.attempts)
    await asyncio.sleep(0.55)
    probes = writer.attempts[opened_at:]
    assert 3 <= len(probes) <= 6  # about one per 0.1 s, not five writers retrying
    assert all(g >= 0.09 for g in writer.gaps()[opened_at:])
    writer.down = False
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert len(writer.stored) == 5 and not sink.circuit_open and metric(GAUGE) == 0


async def test_points_are_chunked(make_point: Factory) -> None:
    writer = ScriptedWriter()
    await RawSink(writer, batch_size=5).write([make_point() for _ in range(12)])
    assert [n for _, n, _ in writer.attempts] == [5, 5, 2]


async def test_cancellation_propagates_and_stops_retrying(make_point: Factory) -> None:
    writer = ScriptedWriter()
    writer.down = True
    sink = RawSink(writer, backoff_base=0.01, backoff_cap=0.02, open_interval=0.02)
    task = asyncio.create_task(sink.write([make_point()]))
    await wait_until(lambda: len(writer.attempts) >= 4)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    attempts = len(writer.attempts)
    await asyncio.sleep(0.1)
    assert len(writer.attempts) == attempts


async def test_cancellation_during_a_slow_write(make_point: Factory) -> None:
    started = asyncio.Event()

    class SlowWriter(ScriptedWriter):
        async def write_lines(self, lines: list[str]) -> None:
            started.set()
            await asyncio.sleep(10)

    errors = metric(ERRORS)
    task = asyncio.create_task(RawSink(SlowWriter()).write([make_point()]))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert metric(ERRORS) == errors  # a cancellation is not a failed write


async def test_failures_are_logged_on_one_line_without_secrets(
    make_point: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="streams.sinks.base")
    writer = ScriptedWriter(fail_next=3)
    await RawSink(writer, backoff_base=0.01, backoff_cap=0.02).write([make_point()])
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 5  # 3 failures, circuit opened, circuit closed
    assert all("\n" not in m and "hunter2" not in m for m in messages)
    assert "ConnectionError: Cannot connect to http://***@influx.internal" in messages[0]


def test_describe_error_redacts_credentials() -> None:
    error = RuntimeError("POST http://u:pw@h/write?db=d&p=pw&token=abc failed\nmore")
    assert (
        describe_error(error) == "RuntimeError: POST http://***@h/write?db=d&p=***&token=*** failed"
    )
    assert describe_error(TimeoutError()) == "TimeoutError"


async def test_influxd_outage_loses_nothing_and_duplicates_nothing(
    private_influxd, make_point: Factory
) -> None:
    server = private_influxd
    server.create_database("outage")
    writer = InfluxV1Writer(server.url, "outage", timeout_seconds=2)
    sink = RawSink(writer, batch_size=10, backoff_base=0.05, backoff_cap=0.2, open_interval=0.3)
    batches = [
        [make_point(event_ms=EVENT_MS + 1000 * i + j % 3) for j in range(25)] for i in range(30)
    ]
    acked = 0

    async def produce() -> None:
        nonlocal acked
        for batch in batches:
            await sink.write(batch)
            acked += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(produce())
    try:
        await wait_until(lambda: acked >= 3)
        await asyncio.to_thread(server.stop)
        await wait_until(lambda: metric(GAUGE) == 1)
        assert sink.circuit_open
        stalled = acked
        await asyncio.sleep(0.5)
        assert acked == stalled  # nothing is acknowledged while the server is down
        assert acked < len(batches)
        await asyncio.to_thread(server.start)  # same port, same data directories
        await asyncio.wait_for(task, 30)
    finally:
        task.cancel()
        await writer.close()
    assert metric(GAUGE) == 0 and not sink.circuit_open

    expected = Counter(p.request_id for batch in batches for p in batch)
    stored = Counter(
        r["request_id"] for r in server.rows("outage", "SELECT request_id FROM usage_tracking")
    )
    assert stored == expected  # every point exactly once
    (count,) = server.query("SELECT count(request_id) FROM usage_tracking", "outage")
    assert count["values"][0][1] == 750
