"""Raw point sinks (docs/contract.md §2): InfluxDB v2 API, InfluxDB 1.x, or daily files.

With ``INFLUXDB_URL`` set, the worker's sink spools to ``DATA_DIR/spool/`` and ships from
there (:mod:`streams.sinks.shipper`), so billing never waits for InfluxDB. Without it,
the daily files under ``DATA_DIR/raw/`` are the local store and are written directly.
"""

from __future__ import annotations

from pathlib import Path

from streams.settings import Settings
from streams.sinks.base import RawSink, RawWriteError, RawWriter
from streams.sinks.lineprotocol import RawPoint

__all__ = [
    "RawPoint",
    "RawSink",
    "RawWriteError",
    "RawWriter",
    "build_raw_sink",
    "build_writer",
    "spool_dir",
]


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


def spool_dir(settings: Settings) -> Path:
    """Where the spooling sink keeps its segments (``DATA_DIR/spool``)."""
    return settings.DATA_DIR / "spool"


def build_raw_sink(settings: Settings) -> RawSink:
    """The at-least-once raw sink configured by the environment: a
    :class:`~streams.sinks.shipper.SpoolingSink` for InfluxDB (nothing is touched on disk
    before its ``start()``/first write), a direct :class:`RawSink` for the daily files."""
    name = f"raw sink ({settings.raw_sink_kind})"
    writer = build_writer(settings)
    if settings.raw_sink_kind == "file":
        # RAW_BATCH_SIZE sizes HTTP requests; a file takes a batch in one write and one
        # fsync (ten fsyncs per 50k-record batch had made the file sink the slow stage)
        whole = max(settings.RAW_BATCH_SIZE, settings.BATCH_MAX_EVENTS)
        return RawSink(writer, batch_size=whole, name=name)
    from streams.sinks.shipper import SpoolingSink

    return SpoolingSink(writer, spool_dir(settings), batch_size=settings.RAW_BATCH_SIZE, name=name)
