"""HTTP endpoints on the worker's Faust web server (CONTRACT §6)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from typing import Any

from faust.web import Request, Response, View

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


async def broker_reachable(timeout: float = 2.0) -> str | None:
    """None when a bootstrap broker accepts a TCP connection, else the reason."""
    reasons = []
    for server in settings.broker_bootstrap():
        host, _, port = server.rpartition(":")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
        except (OSError, TimeoutError) as error:
            reasons.append(f"{server}: {type(error).__name__}")
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None
    return "broker unreachable (" + "; ".join(reasons) + ")"


def _try_write_lock(path: str) -> None:
    """Take and release SQLite's write lock, waiting at most 2 s (a fresh connection, so a
    long transaction of the worker's own connection cannot make /ready hang)."""
    conn = sqlite3.connect(path, timeout=2.0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
    finally:
        conn.close()


async def db_writable() -> str | None:
    """None when the summary DB takes the write lock, else the reason."""
    try:
        await summary_db()  # creates and migrates it on first use
        await asyncio.to_thread(_try_write_lock, str(settings.summary_db_path))
    except (sqlite3.Error, OSError) as error:
        return f"summary DB not writable: {error}"
    return None


@app.page("/ready")
async def ready(web: View, request: Request) -> Response:
    reasons = [reason for reason in (await broker_reachable(), await db_writable()) if reason]
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
