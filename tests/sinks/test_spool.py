"""The durable raw spool and its shipper, against a real influxd (no mocked InfluxDB)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from streams.settings import load_settings
from streams.sinks import build_raw_sink
from streams.sinks.base import RawSink, RawWriteError, is_permanent
from streams.sinks.influx_v1 import InfluxV1Writer
from streams.sinks.lineprotocol import RawPoint, to_line
from streams.sinks.shipper import SpoolingSink, resend_rejected
from streams.sinks.spool import HEADER, Spool, SpoolCorrupt, read_records, rejected_segments

from .conftest import InfluxServer, influxd_server, metric

Factory = Callable[..., RawPoint]
FAST = {"backoff_base": 0.02, "backoff_cap": 0.1, "open_interval": 0.1}


def lines_of(make_point: Factory, count: int, **overrides: object) -> list[str]:
    return [to_line(make_point(user_id=f"u{i}", **overrides)) for i in range(count)]


def spooled_lines(spool_dir: Path) -> list[str]:
    """Every line in every segment of every lane, in shipping order."""
    found = []
    for lane in sorted(p for p in spool_dir.iterdir() if p.name.isdigit()):
        for segment in sorted(lane.glob("*.lp")):
            found.extend(text for record in read_records(segment, 0) for text in record.lines)
    return found


async def wait_until(condition: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def request_ids(server: InfluxServer, db: str) -> list[str]:
    return sorted(row["request_id"] for row in server.rows(db))


# The spool on its own ------------------------------------------------------------------


def test_appends_survive_a_reopen_in_order(tmp_path: Path, make_point: Factory) -> None:
    spool = Spool(tmp_path)
    batches = [lines_of(make_point, n) for n in (3, 1, 5)]
    for batch in batches:
        spool.append(batch)
    spool.close()

    again = Spool(tmp_path)
    again.open()
    (segment,) = again.segments()
    assert segment.points == 9 and segment.sealed
    assert again.pending()[1] == 9
    records = again.read(segment, 1000)
    assert [r.lines for r in records] == batches
    # the segment is plain line protocol with comment framing: importable as is
    text = segment.path.read_text()
    assert text.startswith(HEADER.decode())
    data = [t for t in text.splitlines() if not t.startswith("#")]
    assert data == [line for batch in batches for line in batch]
    again.close()


@pytest.mark.parametrize(
    "tail",
    [
        b"# spool 12",  # header torn
        b"# spool 500 2 1700000000000 0badc0de\nusage_tracking,a=b f=1i 1\n",  # payload torn
        b"\0" * 300,  # the file system extended the file but kept no data
    ],
    ids=["header", "payload", "zeros"],
)
def test_a_torn_tail_is_cut_and_appends_continue(
    tmp_path: Path, make_point: Factory, tail: bytes
) -> None:
    spool = Spool(tmp_path)
    first = lines_of(make_point, 2)
    spool.append(first)
    spool.close()
    (path,) = (tmp_path / "0").glob("*.lp")
    good_size = path.stat().st_size
    with path.open("ab") as file:
        file.write(tail)

    again = Spool(tmp_path)
    again.open()
    assert path.stat().st_size == good_size
    second = lines_of(make_point, 3)
    again.append(second)
    assert spooled_lines(tmp_path) == first + second
    again.close()


def test_a_corrupt_record_is_reported_not_shipped(tmp_path: Path, make_point: Factory) -> None:
    spool = Spool(tmp_path)
    spool.append(lines_of(make_point, 2))
    spool.close()
    (path,) = (tmp_path / "0").glob("*.lp")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # bit rot inside the last (complete) record's payload
    path.write_bytes(bytes(data))
    with pytest.raises(SpoolCorrupt, match="checksum mismatch"):
        read_records(path, 0)


def test_segments_rotate_and_keep_the_order(tmp_path: Path, make_point: Factory) -> None:
    spool = Spool(tmp_path, segment_bytes=2_000)
    batches = [lines_of(make_point, 3) for _ in range(12)]
    for batch in batches:
        spool.append(batch)
    assert len(spool.segments()) > 3
    assert [s.seq for s in spool.segments()] == sorted(s.seq for s in spool.segments())
    assert spooled_lines(tmp_path) == [line for batch in batches for line in batch]
    assert spool.pending()[1] == 36
    spool.close()


def test_each_process_gets_its_own_lane_and_orphans_are_adopted(
    tmp_path: Path, make_point: Factory
) -> None:
    holder, other = Spool(tmp_path), Spool(tmp_path)
    holder.open()
    other.open()
    assert (holder.lane, other.lane) == (tmp_path / "0", tmp_path / "1")
    orphaned = lines_of(make_point, 4)
    other.append(orphaned)
    other.close()  # its worker is gone; nobody restarts it

    holder.append(lines_of(make_point, 1))
    assert holder.adopt_orphans() == 1
    assert not list((tmp_path / "1").glob("*.lp"))
    segments = holder.segments()
    assert [s.points for s in segments] == [1, 4]
    assert holder.read(segments[1], 100)[0].lines == orphaned
    holder.close()


def test_permanent_errors_are_4xx_but_not_408_or_429() -> None:
    assert is_permanent(RawWriteError('HTTP 404: {"error":"database not found: \\"x\\""}'))
    assert is_permanent(RawWriteError("HTTP 401: unauthorized"))
    assert is_permanent(RawWriteError("HTTP 400: partial write: field type conflict"))
    for transient in ("HTTP 429: slow down", "HTTP 408: timeout", "HTTP 503: busy"):
        assert not is_permanent(RawWriteError(transient))
    assert not is_permanent(RawWriteError("TimeoutError: timed out"))
    assert not is_permanent(ConnectionError("HTTP 404 in a non-writer error"))


# Shipping to a real influxd -------------------------------------------------------------


def test_without_influxdb_the_file_sink_stays_direct(tmp_path: Path) -> None:
    sink = build_raw_sink(load_settings(DATA_DIR=tmp_path))
    assert type(sink) is RawSink


async def test_spooled_points_are_shipped_and_segments_deleted(
    influxd: InfluxServer, influx_db: str, make_point: Factory, tmp_path: Path
) -> None:
    settings = load_settings(
        INFLUXDB_URL=influxd.url, INFLUXDB_DATABASE=influx_db, DATA_DIR=tmp_path, RAW_BATCH_SIZE=7
    )
    sink = build_raw_sink(settings)
    assert isinstance(sink, SpoolingSink) and isinstance(sink.writer, InfluxV1Writer)
    assert not (tmp_path / "spool").exists()  # nothing on disk before start()
    shipped = metric("usage_stream_raw_spool_points_shipped_total")
    await sink.start()
    try:
        sent = [lines_of(make_point, n) for n in (20, 1, 9)]
        for batch in sent:
            await sink.write_lines(batch)  # returns once spooled, not shipped
        await wait_until(lambda: sink.idle)
        await wait_until(lambda: not list((tmp_path / "spool" / "0").glob("*.lp")))
    finally:
        await sink.close()
    rows = influxd.rows(influx_db)
    assert len(rows) == 30
    assert metric("usage_stream_raw_spool_points_shipped_total") - shipped == 30
    assert metric("usage_stream_raw_spool_bytes") == 0
    assert metric("usage_stream_raw_spool_points") == 0


async def test_a_restart_resumes_and_a_resent_segment_lands_on_the_same_points(
    private_influxd: InfluxServer, make_point: Factory, tmp_path: Path
) -> None:
    server = private_influxd
    server.create_database("usage")
    spool_dir = tmp_path / "spool"
    sent = lines_of(make_point, 25)

    # run 1: InfluxDB is down; the points stay spooled when the worker stops
    server.stop()
    first = SpoolingSink(InfluxV1Writer(server.url, "usage", timeout_seconds=1), spool_dir, **FAST)
    await first.start()
    await first.write_lines(sent[:10])
    await first.write_lines(sent[10:])
    await wait_until(lambda: first.circuit_open)
    assert metric("usage_stream_raw_sink_circuit_open") == 1
    assert metric("usage_stream_raw_spool_points") == 25
    assert metric("usage_stream_raw_spool_bytes") > 0
    await first.close()
    (segment,) = (spool_dir / "0").glob("*.lp")
    copy = segment.read_bytes()

    # run 2: resumes from the spool
    server.start()
    second = SpoolingSink(InfluxV1Writer(server.url, "usage"), spool_dir, **FAST)
    await second.start()
    await wait_until(lambda: second.idle and not segment.exists())
    assert metric("usage_stream_raw_sink_circuit_open") == 0
    await second.close()
    assert len(server.rows("usage")) == 25

    # a crash after InfluxDB took a segment but before it was deleted: sent again, and
    # every point lands on itself
    segment.write_bytes(copy)
    third = SpoolingSink(InfluxV1Writer(server.url, "usage"), spool_dir, **FAST)
    await third.start()
    await wait_until(lambda: third.idle and not segment.exists())
    await third.close()
    rows = server.rows("usage")
    assert len(rows) == 25
    assert sorted(r["request_id"] for r in rows) == sorted(
        line.split('request_id="')[1].split('"')[0] for line in sent
    )


async def test_rejected_segments_are_set_aside_and_resent(
    make_point: Factory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bad credentials (401) and a missing database (404) are refused for good: set aside
    after ``reject_after`` attempts with a sidecar, shipping goes on; raw-resend sends
    them once the target is fixed. No secret in the sidecar or the log."""
    password = "s3cret-pw-spool"
    spool_dir = tmp_path / "spool"
    with influxd_server(auth=("admin", password)) as server:
        writer = InfluxV1Writer(server.url, "usage", username="admin", password="wrong-" + password)
        sink = SpoolingSink(writer, spool_dir, reject_after=3, **FAST)
        rejected = metric("usage_stream_raw_points_rejected_total")
        await sink.start()
        try:
            batches = [lines_of(make_point, n) for n in (4, 6)]
            await sink.write_lines(batches[0])
            await wait_until(lambda: len(rejected_segments(spool_dir)) == 1)
            await sink.write_lines(batches[1])  # one attempt each while rejections go on
            await wait_until(lambda: len(rejected_segments(spool_dir)) == 2)
            await wait_until(lambda: sink.idle)
        finally:
            await sink.close()
        assert metric("usage_stream_raw_points_rejected_total") - rejected == 10
        assert metric("usage_stream_raw_rejected_segments") == 2
        first, second = rejected_segments(spool_dir)
        sidecar = json.loads(first.with_suffix(".json").read_text())
        assert sidecar["http_status"] == 401 and sidecar["attempts"] == 3
        assert sidecar["points"] == 4 and sidecar["reason"].startswith("RawWriteError: HTTP 401")
        assert json.loads(second.with_suffix(".json").read_text())["attempts"] == 1
        for text in (*(p.read_text() for p in spool_dir.rglob("*.json")), caplog.text):
            assert password not in text
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 2 and all("raw-resend" in r.getMessage() for r in errors)

        # the operator fixes the credentials (and the database is missing: 404 first)
        fixed = InfluxV1Writer(server.url, "usage", username="admin", password=password)
        output: list[str] = []
        summary = await resend_rejected(spool_dir, fixed, batch_size=3, out=output.append)
        assert summary.failed == 2 and "HTTP 404" in output[0]
        assert len(rejected_segments(spool_dir)) == 2
        server.create_database("usage")
        summary = await resend_rejected(spool_dir, fixed, batch_size=3, dry_run=True)
        assert (summary.resent, summary.points) == (2, 10)
        assert len(rejected_segments(spool_dir)) == 2
        output.clear()
        summary = await resend_rejected(spool_dir, fixed, batch_size=3, out=output.append)
        await fixed.close()
        assert (summary.resent, summary.points, summary.failed) == (2, 10, 0)
        assert output == [f"resent {first.name}: 4 points", f"resent {second.name}: 6 points"]
        assert rejected_segments(spool_dir) == [] and not list(spool_dir.rglob("*.json"))
        ids = sorted(row["request_id"] for row in server.rows("usage"))
        assert len(ids) == len(set(ids)) == 10


async def test_a_failed_append_leaves_no_hole(tmp_path: Path, make_point: Factory) -> None:
    """An append that failed midway (disk full) was never acknowledged: the next append
    overwrites its remains, so no garbage sits between two good records."""
    spool = Spool(tmp_path)
    first, second = lines_of(make_point, 2), lines_of(make_point, 2)
    spool.append(first)
    (segment,) = spool.segments()
    fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"# spool 9999 1 1 00000000\nusage_tra")  # the remains of a failed write
    os.close(fd)
    spool._torn = True  # what append() leaves set when its write raised
    spool.append(second)
    assert spooled_lines(tmp_path) == first + second
    spool.close()
