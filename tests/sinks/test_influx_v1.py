"""RawSink + InfluxV1Writer against a real influxd 1.x: points read back with InfluxQL."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from streams.settings import load_settings
from streams.sinks import build_raw_sink
from streams.sinks.base import RawSink, RawWriteError
from streams.sinks.influx_v1 import InfluxV1Writer
from streams.sinks.lineprotocol import RawPoint, timestamp_ns

from .conftest import EVENT_MS, influxd_server, metric

Factory = Callable[..., RawPoint]


def sink_for(url: str, db: str, **writer_options: object) -> RawSink:
    writer = InfluxV1Writer(url, db, **writer_options)  # type: ignore[arg-type]
    return RawSink(writer, backoff_base=0.05, backoff_cap=0.2)


async def test_points_read_back_exactly(influxd, influx_db: str, make_point: Factory) -> None:
    a = make_point(request_id="req-a", input_tokens=7, output_tokens=3, cost_nano=218_700)
    b = make_point(
        request_id="req-b",
        client_org_id="org-2",
        user_id="u 2",
        model="anthropic/claude-3.5-sonnet",
        input_tokens=1_000_000,
        output_tokens=0,
        cost_nano=12_345_678_901,
        markup_cost_nano=16_049_382_571,
        event_ms=EVENT_MS + 1,
    )
    before = metric("usage_stream_raw_points_written_total")
    sink = sink_for(influxd.url, influx_db)
    try:
        await sink.write([a, b])
    finally:
        await sink.close()
    assert metric("usage_stream_raw_points_written_total") - before == 2

    rows = {r["request_id"]: r for r in influxd.rows(influx_db)}
    assert rows["req-a"] == {
        "time": timestamp_ns(a),
        "client_org_id": "org-1",
        "user_id": "user-1",
        "model": "openai/gpt-4o-mini",
        "input_tokens": 7,
        "output_tokens": 3,
        "total_tokens": 10,
        "cost_usd": 0.0002187,
        "markup_cost_usd": 0.00028431,
        "request_id": "req-a",
    }
    assert rows["req-b"]["time"] == timestamp_ns(b)
    assert rows["req-b"]["user_id"] == "u 2"
    assert rows["req-b"]["cost_usd"] == 12.345678901
    assert rows["req-b"]["markup_cost_usd"] == 16.049382571
    assert rows["req-b"]["total_tokens"] == 1_000_000
    # integer fields are stored as integers, money as floats
    kinds = {
        row[0]: row[1]
        for s in influxd.query("SHOW FIELD KEYS FROM usage_tracking", influx_db)
        for row in s["values"]
    }
    assert kinds == {
        "input_tokens": "integer",
        "output_tokens": "integer",
        "total_tokens": "integer",
        "cost_usd": "float",
        "markup_cost_usd": "float",
        "request_id": "string",
    }
    tag_keys = {
        row[0]
        for s in influxd.query("SHOW TAG KEYS FROM usage_tracking", influx_db)
        for row in s["values"]
    }
    assert tag_keys == {"client_org_id", "user_id", "model"}


async def test_same_series_same_millisecond_distinct_requests_are_two_points(
    influxd, influx_db: str, make_point: Factory
) -> None:
    first, second = make_point(request_id="r-1"), make_point(request_id="r-2")
    assert first.event_ms == second.event_ms
    sink = sink_for(influxd.url, influx_db)
    try:
        await sink.write([first, second])
    finally:
        await sink.close()
    rows = influxd.rows(influx_db)
    assert sorted(r["request_id"] for r in rows) == ["r-1", "r-2"]
    assert len({r["time"] for r in rows}) == 2
    assert {r["time"] // 1_000_000 for r in rows} == {EVENT_MS}


async def test_redelivered_request_is_one_point(
    influxd, influx_db: str, make_point: Factory
) -> None:
    p = make_point(request_id="dup")
    sink = sink_for(influxd.url, influx_db)
    try:
        await sink.write([p, p])  # twice in one batch
        await sink.write([p])  # and again later
    finally:
        await sink.close()
    rows = influxd.rows(influx_db)
    assert len(rows) == 1
    assert rows[0]["time"] == timestamp_ns(p)


async def test_special_characters_survive(influxd, influx_db: str, make_point: Factory) -> None:
    points = [
        make_point(request_id='q"uote\\', client_org_id="a,b c=d", user_id="plain"),
        make_point(request_id="nl", user_id="line\nbreak"),
        make_point(request_id="bs", user_id="back\\slash"),
        make_point(request_id="trail", user_id="ends\\"),
        make_point(request_id="utf", user_id="zażółć gęślą"),
    ]
    sink = sink_for(influxd.url, influx_db)
    try:
        await sink.write(points)
    finally:
        await sink.close()
    rows = {r["request_id"]: r for r in influxd.rows(influx_db)}
    assert set(rows) == {'q"uote\\', "nl", "bs", "trail", "utf"}
    assert rows['q"uote\\']["client_org_id"] == "a,b c=d"
    assert rows["nl"]["user_id"] == "line\\nbreak"  # documented visible form
    assert rows["utf"]["user_id"] == "zażółć gęślą"
    # InfluxDB 1.x does not unescape "\\" in tags: backslashes read back doubled
    assert rows["bs"]["user_id"] == "back\\\\slash"
    assert rows["trail"]["user_id"] == "ends\\\\ "


async def test_chunks_and_gzip(influxd, influx_db: str, make_point: Factory) -> None:
    points = [make_point(event_ms=EVENT_MS + i) for i in range(23)]
    writer = InfluxV1Writer(influxd.url, influx_db, use_gzip=True)
    sink = RawSink(writer, batch_size=5, backoff_base=0.05, backoff_cap=0.2)
    try:
        await sink.write(points)
    finally:
        await sink.close()
    rows = influxd.rows(influx_db)
    assert sorted(r["request_id"] for r in rows) == sorted(p.request_id for p in points)


async def test_missing_database_is_a_clear_error(influxd, make_point: Factory) -> None:
    writer = InfluxV1Writer(influxd.url, "no_such_db")
    try:
        with pytest.raises(RawWriteError, match=r"^HTTP 404: .*database not found"):
            await writer.write_lines(["usage_tracking,a=b f=1i 1"])
    finally:
        await writer.close()


async def test_build_raw_sink_from_settings(
    influxd, influx_db: str, make_point: Factory, tmp_path
) -> None:
    settings = load_settings(
        INFLUXDB_URL=influxd.url, INFLUXDB_DATABASE=influx_db, DATA_DIR=tmp_path
    )
    sink = build_raw_sink(settings)
    assert isinstance(sink.writer, InfluxV1Writer)
    try:
        await sink.write([make_point(request_id="via-settings")])
    finally:
        await sink.close()
    assert [r["request_id"] for r in influxd.rows(influx_db)] == ["via-settings"]


async def test_basic_auth_and_no_secrets_in_errors(
    make_point: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    with influxd_server(auth=("admin", "s3cret-pw")) as server:
        server.create_database("secured")
        settings = load_settings(
            INFLUXDB_URL=server.url,
            INFLUXDB_DATABASE="secured",
            INFLUXDB_USERNAME="admin",
            INFLUXDB_PASSWORD="s3cret-pw",
        )
        good = InfluxV1Writer.from_settings(settings)
        bad = InfluxV1Writer(server.url, "secured", username="admin", password="wrong-pw")
        # credentials in the URL are moved to the header, not sent in the URL
        in_url = InfluxV1Writer(server.url.replace("://", "://admin:s3cret-pw@"), "secured")
        try:
            await RawSink(good).write([make_point(request_id="authed")])
            await in_url.write_lines(["usage_tracking,user_id=x input_tokens=1i 5"])
            with pytest.raises(RawWriteError, match=r"^HTTP 401") as raised:
                await bad.write_lines(["usage_tracking,user_id=x input_tokens=1i 6"])
            assert "wrong-pw" not in str(raised.value)

            # a failing attempt through the sink logs one line without the password
            sink = RawSink(bad, backoff_base=0.01, backoff_cap=0.02)
            caplog.set_level(logging.WARNING, logger="streams.sinks.base")
            task = asyncio.create_task(sink.write([make_point()]))
            while sink.consecutive_failures < 1:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            for writer in (good, bad, in_url):
                await writer.close()
        assert "HTTP 401" in caplog.text
        assert "wrong-pw" not in caplog.text and "s3cret" not in caplog.text
        rows = server.rows("secured", "SELECT * FROM usage_tracking")
        assert {r["request_id"] for r in rows} == {"authed", None}  # None: the in-URL line
