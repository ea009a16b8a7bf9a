"""FileWriter: daily line protocol files, fsync per write, importable into real influxd."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from streams.settings import load_settings
from streams.sinks import build_raw_sink
from streams.sinks.base import RawSink
from streams.sinks.files import FileWriter
from streams.sinks.lineprotocol import RawPoint, timestamp_ns, to_line

Factory = Callable[..., RawPoint]

# 2026-11-20T23:59:59.999Z and the next millisecond, 2026-11-21T00:00:00.000Z (UTC)
BEFORE_MIDNIGHT_MS = 1_795_219_199_999
AFTER_MIDNIGHT_MS = BEFORE_MIDNIGHT_MS + 1

HEADER = "# usage-stream raw points: InfluxDB line protocol, ns precision\n"


def data_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if not line.startswith("#")]


async def test_lines_land_in_daily_utc_files(tmp_path: Path, make_point: Factory) -> None:
    late = make_point(event_ms=BEFORE_MIDNIGHT_MS)
    early = make_point(event_ms=AFTER_MIDNIGHT_MS)
    settings = load_settings(DATA_DIR=tmp_path)
    sink = build_raw_sink(settings)
    assert isinstance(sink.writer, FileWriter)
    await sink.write([late, early, late])
    await sink.close()

    files = sorted(p.name for p in (tmp_path / "raw").iterdir())
    assert files == ["usage_tracking-2026-11-20.lp", "usage_tracking-2026-11-21.lp"]
    day1 = tmp_path / "raw" / "usage_tracking-2026-11-20.lp"
    day2 = tmp_path / "raw" / "usage_tracking-2026-11-21.lp"
    assert data_lines(day1) == [to_line(late), to_line(late)]
    assert data_lines(day2) == [to_line(early)]
    assert day1.read_text().startswith(HEADER + "# DML\n# CONTEXT-DATABASE: usage_stream\n")
    assert day1.read_text().endswith("\n")


async def test_every_write_is_fsynced(
    tmp_path: Path, make_point: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    writer = FileWriter(tmp_path)
    await writer.write_lines([to_line(make_point(event_ms=BEFORE_MIDNIGHT_MS))])
    await writer.write_lines([to_line(make_point(event_ms=BEFORE_MIDNIGHT_MS))])
    file = str(tmp_path / "usage_tracking-2026-11-20.lp")
    assert synced == [file, str(tmp_path), file]  # the directory once, for the new file


async def test_torn_tail_is_cut_and_torn_header_rewritten(
    tmp_path: Path, make_point: Factory
) -> None:
    complete = to_line(make_point(event_ms=BEFORE_MIDNIGHT_MS))
    writer = FileWriter(tmp_path)
    path = writer.path_for(dt.date(2026, 11, 20))
    path.write_bytes(writer.header + (complete + "\n" + complete[:40]).encode())
    fresh = to_line(make_point(event_ms=BEFORE_MIDNIGHT_MS))
    await writer.write_lines([fresh])
    assert data_lines(path) == [complete, fresh]

    other = writer.path_for(dt.date(2026, 11, 21))
    other.write_bytes(writer.header[:10])  # crashed while writing the header
    line = to_line(make_point(event_ms=AFTER_MIDNIGHT_MS))
    await writer.write_lines([line])
    assert other.read_bytes() == writer.header + (line + "\n").encode()


async def test_retention_policy_and_database_in_header(tmp_path: Path) -> None:
    settings = load_settings(
        DATA_DIR=tmp_path, INFLUXDB_DATABASE="billing", INFLUXDB_RETENTION_POLICY="forever"
    )
    writer = FileWriter.from_settings(settings)
    assert writer.directory == tmp_path / "raw"
    assert writer.header.decode().endswith(
        "# DML\n# CONTEXT-DATABASE: billing\n# CONTEXT-RETENTION-POLICY: forever\n"
    )


async def test_file_imports_into_influxd(influxd, tmp_path: Path, make_point: Factory) -> None:
    points = [
        make_point(request_id="f-1", event_ms=BEFORE_MIDNIGHT_MS),
        make_point(request_id="f-2", event_ms=BEFORE_MIDNIGHT_MS, user_id="a,b c"),
    ]
    database = f"import_{os.getpid()}"
    sink = RawSink(FileWriter(tmp_path, database=database))
    await sink.write(points)
    await sink.write(points[:1])  # a redelivery after a crash: the same line again
    path = tmp_path / "usage_tracking-2026-11-20.lp"
    assert len(data_lines(path)) == 3

    influxd.create_database(database)
    influx_cli = shutil.which("influx")
    if influx_cli:  # the Debian `influx` CLI (package influxdb-client), when installed
        subprocess.run(
            [influx_cli, "-host", "127.0.0.1", "-port", str(influxd.port)]
            + ["-import", f"-path={path}", "-precision=ns"],
            check=True,
            capture_output=True,
            timeout=30,
        )
    else:  # same file body over HTTP: the header lines are line protocol comments
        status, body = influxd.write(database, path.read_bytes())
        assert status == 204, body

    rows = {r["request_id"]: r for r in influxd.rows(database)}
    assert set(rows) == {"f-1", "f-2"}  # the duplicate line is the same point
    assert rows["f-2"]["user_id"] == "a,b c"
    assert rows["f-1"]["time"] == timestamp_ns(points[0])
    assert rows["f-1"]["cost_usd"] == 0.0002187
