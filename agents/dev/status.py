"""The live status line of ``usage-stream dev``: what the worker is doing, without opening
SQLite or Grafana.

It reads the worker's own ``/metrics`` (counters and the ``open_days`` gauge) and
``/status`` (last batch runs, last refresh per source) over HTTP, as any operator tool
would, so it shows what the worker reports rather than a second opinion. On a terminal one
line is redrawn every second; otherwise (a log file, CI) a line is printed every
``PLAIN_INTERVAL_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Snapshot", "StatusLine", "format_status", "parse_metrics"]

TTY_INTERVAL_SECONDS = 1.0
PLAIN_INTERVAL_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the worker reported at one poll (``at``: monotonic seconds)."""

    at: float
    consumed: float
    duplicates: float
    invalid: float
    open_days: float | None
    last_rollup: dict[str, Any] | None
    refresh: list[dict[str, Any]]


def parse_metrics(text: str) -> dict[str, float]:
    """The few sums the status line shows, from Prometheus text (labels summed over)."""
    wanted = {
        "usage_stream_events_consumed_total": "consumed",
        "usage_stream_events_duplicate_total": "duplicates",
        "usage_stream_events_invalid_total": "invalid",
        "usage_stream_open_days": "open_days",
    }
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = wanted.get(sample.name)
            if key is not None:
                values[key] = values.get(key, 0.0) + sample.value
    return values


def _age(stamp: object, now: datetime) -> str:
    """``12s ago`` / ``3m ago`` / ``2h ago`` from an RFC 3339 text, ``?`` if unreadable."""
    if not isinstance(stamp, str):
        return "?"
    try:
        then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return "?"
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    seconds = max((now - then).total_seconds(), 0.0)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.0f}h ago"


def _refresh_text(rows: list[dict[str, Any]], now: datetime) -> str:
    if not rows:
        return "none yet"
    parts = []
    for row in rows:
        source = row.get("source", "?")
        success, attempt = row.get("last_success_at"), row.get("last_attempt_at")
        if attempt and attempt != success:
            parts.append(f"{source} failed {_age(attempt, now)}")
        elif success:
            parts.append(f"{source} ok {_age(success, now)}")
        else:
            parts.append(f"{source} never")
    return ", ".join(parts)


def format_status(previous: Snapshot | None, current: Snapshot, now: datetime) -> str:
    """One line: events/s since the previous poll, totals, open days, last rollup/refresh."""
    rate = "…"
    if previous is not None and current.at > previous.at:
        rate = f"{max(current.consumed - previous.consumed, 0) / (current.at - previous.at):.0f}"
    rollup = "none yet"
    if current.last_rollup:
        day = current.last_rollup.get("processing_date") or "?"
        ok = "" if current.last_rollup.get("success", 1) else " FAILED"
        stamp = current.last_rollup.get("finished_at") or current.last_rollup.get("started_at")
        rollup = f"{day}{ok} {_age(stamp, now)}"
    open_days = "?" if current.open_days is None else f"{current.open_days:.0f}"
    return (
        f"{rate} events/s | {current.consumed:.0f} consumed | "
        f"{current.duplicates:.0f} duplicates | {current.invalid:.0f} invalid | "
        f"open days {open_days} | last rollup {rollup} | "
        f"refresh {_refresh_text(current.refresh, now)}"
    )


class StatusLine:
    """Polls ``base_url`` (the worker's web server) and writes the status line to ``out``."""

    def __init__(self, base_url: str, out: TextIO | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self._drawn = False

    async def snapshot(self, session: aiohttp.ClientSession) -> Snapshot | None:
        """None while the worker does not answer (starting, or gone)."""
        try:
            async with session.get(f"{self.base_url}/metrics") as response:
                if response.status != 200:
                    return None
                metrics = parse_metrics(await response.text())
            status: dict[str, Any] = {}
            async with session.get(f"{self.base_url}/status") as response:
                if response.status == 200:
                    status = orjson.loads(await response.read())
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            return None
        runs = status.get("last_batch_runs") or []
        rollups = [run for run in runs if isinstance(run, dict) and run.get("kind") == "rollup"]
        open_days = metrics.get("open_days")
        if open_days is None and isinstance(status.get("open_days"), list):
            open_days = float(len(status["open_days"]))
        return Snapshot(
            at=time.monotonic(),
            consumed=metrics.get("consumed", 0.0),
            duplicates=metrics.get("duplicates", 0.0),
            invalid=metrics.get("invalid", 0.0),
            open_days=open_days,
            last_rollup=max(rollups, key=lambda run: run.get("id", 0)) if rollups else None,
            refresh=[row for row in status.get("refresh") or [] if isinstance(row, dict)],
        )

    def _write(self, line: str) -> None:
        if self.tty:
            width = shutil.get_terminal_size((120, 24)).columns
            self.out.write("\r\x1b[2K" + line[: max(width - 1, 20)])
            self._drawn = True
        else:
            self.out.write(f"[{datetime.now().strftime('%H:%M:%S')}] {line}\n")
        self.out.flush()

    def finish(self) -> None:
        """End a redrawn line, so whatever is printed next starts on its own line."""
        if self._drawn:
            self.out.write("\n")
            self.out.flush()
            self._drawn = False

    async def run(self, stop: asyncio.Event) -> None:
        interval = TTY_INTERVAL_SECONDS if self.tty else PLAIN_INTERVAL_SECONDS
        timeout = aiohttp.ClientTimeout(total=2)
        previous: Snapshot | None = None
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not stop.is_set():
                current = await self.snapshot(session)
                if current is None:
                    self._write(f"waiting for the worker at {self.base_url} …")
                else:
                    self._write(format_status(previous, current, datetime.now(UTC)))
                    previous = current
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
        self.finish()
