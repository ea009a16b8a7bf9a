"""RawSink + InfluxV2Writer (influxdb-client, /api/v2/write) against real servers.

VictoriaMetrics accepts the v2 write API as influxdb-client sends it (it ignores org and
token) and exposes each field as a metric ``usage_tracking_<field>``. It keeps
millisecond timestamps and no string values, so the string field ``request_id`` is not
checked there; exact nanosecond behaviour is covered by the InfluxDB 1.x tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from streams.settings import load_settings
from streams.sinks import build_raw_sink
from streams.sinks.base import RawSink, RawWriteError
from streams.sinks.influx_v2 import InfluxV2Writer
from streams.sinks.lineprotocol import RawPoint

Factory = Callable[..., RawPoint]

NUMERIC = ("input_tokens", "output_tokens", "total_tokens", "cost_usd", "markup_cost_usd")


def by_metric(exported: list[dict[str, Any]], org: str) -> dict[str, dict[str, Any]]:
    """``{field: export record}`` for the series of one client org."""
    found = {}
    for record in exported:
        labels = record["metric"]
        if labels.get("client_org_id") == org:
            found[labels["__name__"].removeprefix("usage_tracking_")] = record
    return found


async def test_numeric_fields_and_tags_via_v2_api(victoria_metrics, make_point: Factory) -> None:
    now_ms = int(time.time() * 1000)
    point = make_point(
        client_org_id="org-v2",
        user_id="user v2",
        model="openai/gpt-4o",
        input_tokens=1500,
        output_tokens=250,
        cost_nano=12_345_678_901,
        markup_cost_nano=16_049_382_571,
        event_ms=now_ms,
    )
    writer = InfluxV2Writer(victoria_metrics.url, "unused-token", "unused-org", "usage")
    sink = RawSink(writer, backoff_base=0.05, backoff_cap=0.2)
    try:
        await sink.write([point])
    finally:
        await sink.close()

    exported = victoria_metrics.export('{__name__=~"usage_tracking_.*",client_org_id="org-v2"}')
    series = by_metric(exported, "org-v2")
    assert set(NUMERIC) <= set(series)
    expected = {
        "input_tokens": 1500,
        "output_tokens": 250,
        "total_tokens": 1750,
        "cost_usd": 12.345678901,
        "markup_cost_usd": 16.049382571,
    }
    for field, value in expected.items():
        record = series[field]
        assert record["values"] == [value], field
        assert record["timestamps"] == [now_ms], field  # VictoriaMetrics keeps ms
        labels = {k: v for k, v in record["metric"].items() if k not in ("__name__", "db")}
        assert labels == {
            "client_org_id": "org-v2",
            "user_id": "user v2",
            "model": "openai/gpt-4o",
        }


async def test_many_points_in_chunks(victoria_metrics, make_point: Factory) -> None:
    now_ms = int(time.time() * 1000)
    points = [
        make_point(client_org_id="org-chunks", user_id=f"u{i}", input_tokens=i, event_ms=now_ms)
        for i in range(40)
    ]
    settings = load_settings(
        INFLUXDB_URL=victoria_metrics.url,
        INFLUXDB_TOKEN="unused-token",
        INFLUXDB_ORG="unused-org",
        INFLUXDB_BUCKET="usage",
        RAW_BATCH_SIZE=7,
    )
    sink = build_raw_sink(settings)
    assert isinstance(sink.writer, InfluxV2Writer) and sink.batch_size == 7
    try:
        await sink.write(points)
    finally:
        await sink.close()
    records = victoria_metrics.export(
        'usage_tracking_input_tokens{client_org_id="org-chunks"}', min_series=40
    )
    assert sorted(r["values"][0] for r in records) == list(range(40))


async def test_http_error_is_one_line_without_token(influxd) -> None:
    # InfluxDB 1.6 has no /api/v2/write: a real non-2xx answer from a real server.
    writer = InfluxV2Writer(influxd.url, "top-secret-token", "org", "bucket")
    try:
        with pytest.raises(RawWriteError, match=r"^HTTP 404") as raised:
            await writer.write_lines(["usage_tracking,a=b f=1i 1"])
    finally:
        await writer.close()
    assert "top-secret-token" not in str(raised.value)
    assert "\n" not in str(raised.value)
