"""HTTP endpoints on the worker's Faust web server (CONTRACT §6)."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

from faust.web import Request, Response, View

from agents.health import PROBE_TIMEOUT_SECONDS, broker_answers, summary_db_writable
from agents.pipeline import hot_path
from streams.app import app, settings, summary_db
from streams.metrics import REGISTRY, render
from tables.summary_store import pending_dates

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4"


@app.page("/metrics")
async def metrics(web: View, request: Request) -> Response:
    return web.bytes(render(), content_type=PROMETHEUS_CONTENT_TYPE)


@app.page("/health")
async def health(web: View, request: Request) -> Response:
    return web.json({"status": "ok"})


async def broker_reachable(timeout: float = PROBE_TIMEOUT_SECONDS) -> str | None:
    """None when the broker answers a real request (ApiVersions + Metadata) within
    ``timeout``, else the reason: a frozen broker still accepts TCP connections."""
    return await broker_answers(settings, timeout)


async def db_writable() -> str | None:
    """None when the summary DB takes the write lock (or the worker's own batch or
    rollup holds it), else the reason naming the DB (:mod:`agents.health`)."""
    pipeline = hot_path()
    try:
        shared = await asyncio.wait_for(summary_db(), PROBE_TIMEOUT_SECONDS)  # creates it
    except (sqlite3.Error, OSError, TimeoutError) as error:
        return f"summary DB {settings.summary_db_path} not writable: {error!r}"
    own = (shared, pipeline.store._conn if pipeline else None)
    return await summary_db_writable(settings.summary_db_path, own)


@app.page("/ready")
async def ready(web: View, request: Request) -> Response:
    """200 when the broker answers, the summary DB is writable and the hot path is not
    stuck retrying; else 503 with ``{"ready": false, "reasons": [...]}`` (one line each).
    The probes run concurrently, so the answer comes within about 2 s."""
    pipeline = hot_path()
    probed = await asyncio.gather(broker_reachable(), db_writable())
    reasons = [reason for reason in probed if reason]
    stuck = pipeline.not_ready_reason() if pipeline else None
    if stuck:
        reasons.append(stuck)
    if reasons:
        return web.json({"ready": False, "reasons": reasons}, status=503)
    return web.json({"ready": True})


async def _rows(sql: str) -> list[dict[str, Any]]:
    conn = await summary_db()
    async with conn.execute(sql) as cursor:
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]


@app.page("/status")
async def status(web: View, request: Request) -> Response:
    conn = await summary_db()
    pipeline = hot_path()
    lag = {
        f"{sample.labels['topic']}/{sample.labels['partition']}": int(sample.value)
        for metric in REGISTRY.collect()
        if metric.name == "usage_stream_consumer_lag"
        for sample in metric.samples
    }
    return web.json(
        {
            "assigned_partitions": pipeline.assigned_partitions() if pipeline else [],
            "last_batch_runs": await _rows("SELECT * FROM batch_runs ORDER BY id DESC LIMIT 20"),
            "refresh": await _rows("SELECT * FROM refresh_status ORDER BY source"),
            "open_days": await pending_dates(conn),
            "consumer_lag": lag,
        }
    )
