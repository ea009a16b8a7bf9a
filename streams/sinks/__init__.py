"""Raw point sinks (CONTRACT §2): InfluxDB v2 API, InfluxDB 1.x, or daily files."""

from __future__ import annotations

from streams.settings import Settings
from streams.sinks.base import RawSink, RawWriteError, RawWriter
from streams.sinks.lineprotocol import RawPoint

__all__ = ["RawPoint", "RawSink", "RawWriteError", "RawWriter", "build_raw_sink", "build_writer"]


def build_writer(settings: Settings) -> RawWriter:
    """The writer for ``settings.raw_sink_kind`` ("file", "influxdb-v1", "influxdb-v2")."""
    kind = settings.raw_sink_kind
    if kind == "file":
        from streams.sinks.files import FileWriter

        return FileWriter.from_settings(settings)
    if kind == "influxdb-v1":
        from streams.sinks.influx_v1 import InfluxV1Writer

        return InfluxV1Writer.from_settings(settings)
    if kind == "influxdb-v2":
        from streams.sinks.influx_v2 import InfluxV2Writer

        return InfluxV2Writer.from_settings(settings)
    raise ValueError(f"unknown raw sink kind {kind!r}")


def build_raw_sink(settings: Settings) -> RawSink:
    """The at-least-once raw sink configured by the environment."""
    return RawSink(
        build_writer(settings),
        batch_size=settings.RAW_BATCH_SIZE,
        name=f"raw sink ({settings.raw_sink_kind})",
    )
