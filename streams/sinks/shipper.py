"""The spooling raw sink: billing appends to the local spool, a shipper feeds InfluxDB.

Why: with a direct sink the hot path waited for InfluxDB, so an InfluxDB outage stopped
the bills and a 4xx (missing database, bad token) blocked everything forever.
:class:`SpoolingSink` is what :func:`streams.sinks.build_raw_sink` returns when
``INFLUXDB_URL`` is set:

* :meth:`SpoolingSink.write_lines` (the hot path) appends the lines to the spool
  (:mod:`streams.sinks.spool`), ``fsync``\\ s and returns: the pipeline commits the batch's
  offsets and summaries right after, whatever InfluxDB is doing.
* a shipper task (started by :meth:`SpoolingSink.start`) sends the spooled records in
  order, in chunks of ``RAW_BATCH_SIZE``, through the inherited :class:`RawSink`
  machinery: transient failures (timeouts, connection errors, 5xx, 408, 429) are
  retried forever with backoff and the circuit breaker
  (``usage_stream_raw_sink_circuit_open``). A segment is deleted only after InfluxDB
  acknowledged all of it; progress inside a segment is kept in memory only, so a crash
  re-sends the segment, and the re-sent points land on the very same points (series and
  timestamp derive from the request, :mod:`streams.sinks.lineprotocol`).
* a permanent rejection (another 4xx) is tried ``reject_after`` (5) times with backoff;
  then the whole segment moves to ``DATA_DIR/spool/rejected/`` with a JSON sidecar
  (one-line reason, first failure, attempts; no secrets), ONE error line is logged,
  ``usage_stream_raw_points_rejected_total`` counts its points and shipping continues
  with the next segment. While rejections go on (the database is still missing), each
  next segment gets a single attempt, paced at one per ``open_interval`` when caught
  up, so the spool does not grow behind a known-bad target and the log stays short.
  ``usage-stream raw-resend`` (:func:`resend_rejected`) sends them once fixed.

:meth:`SpoolingSink.write` (points) still writes straight through, acknowledged by the
server before it returns: tools and tests that need that keep it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter, Gauge

from streams.metrics import REGISTRY
from streams.sinks.base import RawSink, RawWriter, describe_error, http_status, is_permanent
from streams.sinks.spool import (
    REJECTED,
    SEGMENT_BYTES,
    Segment,
    Spool,
    SpoolCorrupt,
    read_records,
    rejected_segments,
)

__all__ = [
    "SPOOL_BYTES",
    "SPOOL_OLDEST_AGE",
    "SPOOL_POINTS",
    "ResendSummary",
    "SpoolingSink",
    "resend_rejected",
]

log = logging.getLogger(__name__)

_P = "usage_stream_"
SPOOL_BYTES = Gauge(
    _P + "raw_spool_bytes",
    "Bytes of raw points in the local spool not yet acknowledged by InfluxDB",
    registry=REGISTRY,
)
SPOOL_POINTS = Gauge(
    _P + "raw_spool_points",
    "Raw points in the local spool not yet acknowledged by InfluxDB",
    registry=REGISTRY,
)
SPOOL_OLDEST_AGE = Gauge(
    _P + "raw_spool_oldest_age_seconds",
    "Seconds since the oldest unshipped raw point was spooled (0 when none)",
    registry=REGISTRY,
)
SPOOL_SHIPPED = Counter(
    _P + "raw_spool_points_shipped",
    "Spooled raw points acknowledged by InfluxDB",
    registry=REGISTRY,
)
POINTS_REJECTED = Counter(
    _P + "raw_points_rejected",
    "Raw points moved to DATA_DIR/spool/rejected/ after InfluxDB refused them for good",
    registry=REGISTRY,
)
REJECTED_SEGMENTS = Gauge(
    _P + "raw_rejected_segments",
    "Segments waiting in DATA_DIR/spool/rejected/ for usage-stream raw-resend",
    registry=REGISTRY,
)
for _gauge in (SPOOL_BYTES, SPOOL_POINTS, SPOOL_OLDEST_AGE):
    _gauge.set_function(lambda: 0.0)

REJECT_AFTER = 5
IDLE_SECONDS = 5.0  # re-count rejected/, look for orphaned lanes
DRAIN_ON_CLOSE_SECONDS = 5.0


@dataclass(slots=True)
class _Rejection:
    error: BaseException | SpoolCorrupt
    attempts: int
    first_failure: float  # unix time


class SpoolingSink(RawSink):
    """A :class:`RawSink` whose :meth:`write_lines` only spools (module docstring)."""

    def __init__(
        self,
        writer: RawWriter,
        spool_dir: Path,
        *,
        reject_after: int = REJECT_AFTER,
        segment_bytes: int | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(writer, **kwargs)  # type: ignore[arg-type]
        if reject_after < 1:
            raise ValueError("reject_after must be >= 1")
        self.spool = Spool(spool_dir, segment_bytes=segment_bytes or SEGMENT_BYTES)
        self.reject_after = reject_after
        self._wake = asyncio.Event()
        self._shipper: asyncio.Task[None] | None = None
        self._rejecting = False
        self._last_rejection = float("-inf")
        self._last_error = ""

    # The sink interface ---------------------------------------------------------------

    async def start(self) -> None:
        """Open the spool (resuming what an earlier run left) and start the shipper."""
        await asyncio.to_thread(self.spool.open)
        self._publish_metrics()
        size, points, _ = self.spool.pending()
        log.info(
            "%s: spooling to %s (%d points, %d bytes to ship)",
            self.name,
            self.spool.lane,
            points,
            size,
        )
        if self._shipper is None:
            self._shipper = asyncio.create_task(self._ship_forever(), name="raw spool shipper")

    async def write_lines(self, lines: Sequence[str]) -> None:
        """Append to the spool, durably; InfluxDB is the shipper's business."""
        if not lines:
            return
        await asyncio.to_thread(self.spool.append, lines)
        self._wake.set()

    async def close(self) -> None:
        """Give the shipper a moment to drain (when InfluxDB is healthy), then stop it.

        Whatever is left stays spooled and is shipped by the next run."""
        if self._shipper is not None:
            deadline = time.monotonic() + DRAIN_ON_CLOSE_SECONDS
            while (
                self.spool.pending()[1]
                and not self.circuit_open
                and not self._rejecting
                and not self._shipper.done()
                and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.05)
            self._shipper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._shipper
            self._shipper = None
        # as the shipper left it: a cancel while _reject awaited its count left it short
        REJECTED_SEGMENTS.set(len(await asyncio.to_thread(rejected_segments, self.spool.root)))
        await asyncio.to_thread(self.spool.close)
        for gauge in (SPOOL_BYTES, SPOOL_POINTS, SPOOL_OLDEST_AGE):
            gauge.set_function(lambda: 0.0)
        await super().close()

    @property
    def idle(self) -> bool:
        """Nothing left to ship (tests, tools)."""
        return self.spool.pending()[1] == 0

    # Metrics --------------------------------------------------------------------------

    def _publish_metrics(self) -> None:
        spool = self.spool

        def oldest_age() -> float:
            oldest = spool.pending()[2]
            return 0.0 if oldest is None else max(time.time() - oldest / 1000, 0.0)

        SPOOL_BYTES.set_function(lambda: float(spool.pending()[0]))
        SPOOL_POINTS.set_function(lambda: float(spool.pending()[1]))
        SPOOL_OLDEST_AGE.set_function(oldest_age)
        REJECTED_SEGMENTS.set(len(rejected_segments(spool.root)))

    # The shipper ----------------------------------------------------------------------

    async def _ship_forever(self) -> None:
        """Ship until cancelled; an unexpected error is logged (once per kind) and retried."""
        last_idle_work = 0.0
        while True:
            try:
                if await self._ship_once():
                    self._last_error = ""
                    continue
                if time.monotonic() - last_idle_work >= IDLE_SECONDS:
                    last_idle_work = time.monotonic()
                    await self._idle_work()
                    continue
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), IDLE_SECONDS)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                text = describe_error(error)
                if text != self._last_error:
                    log.error("%s: shipper failed, retrying every 5 s: %s", self.name, text)
                    self._last_error = text
                await asyncio.sleep(5.0)

    async def _idle_work(self) -> None:
        REJECTED_SEGMENTS.set(len(await asyncio.to_thread(rejected_segments, self.spool.root)))
        await asyncio.to_thread(self.spool.adopt_orphans)

    async def _ship_once(self) -> bool:
        """Ship (part of) the oldest segment; False when there is nothing to do now."""
        segments = self.spool.segments()
        if not segments:
            return False
        segment = segments[0]
        if segment.shipped >= segment.size:
            return await asyncio.to_thread(self.spool.retire, segment)
        if self._rejecting and not segment.sealed:  # caught up behind a refusing target
            wait = self._last_rejection + self.open_interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                return True
        try:
            records = await asyncio.to_thread(self.spool.read, segment, self.batch_size)
        except SpoolCorrupt as error:
            await self._reject(segment, _Rejection(error, 1, time.time()))
            return True
        lines = [text for record in records for text in record.lines]
        for start in range(0, len(lines), self.batch_size):
            chunk = lines[start : start + self.batch_size]
            rejection = await self._ship_chunk(chunk)
            if rejection is not None:
                await self._reject(segment, rejection)
                return True
            self.spool.shipped(segment, segment.shipped, len(chunk))
            SPOOL_SHIPPED.inc(len(chunk))
        self.spool.shipped(segment, records[-1].end, 0)
        return True

    async def _ship_chunk(self, chunk: list[str]) -> _Rejection | None:
        """Store ``chunk`` (transient failures retried forever) or give up on a permanent
        rejection after ``reject_after`` attempts (one while rejections go on)."""
        attempts, first_failure = 0, 0.0
        while True:
            error = await self.write_chunk_or_permanent(chunk, is_permanent)
            if error is None:
                if self._rejecting:
                    log.warning("%s: InfluxDB accepts spooled points again", self.name)
                self._rejecting = False
                return None
            attempts += 1
            first_failure = first_failure or time.time()
            if self._rejecting or attempts >= self.reject_after:
                return _Rejection(error, attempts, first_failure)
            await asyncio.sleep(min(self.backoff_base * 2 ** (attempts - 1), self.backoff_cap))

    async def _reject(self, segment: Segment, rejection: _Rejection) -> None:
        reason = (
            str(rejection.error)
            if isinstance(rejection.error, SpoolCorrupt)
            else describe_error(rejection.error)
        )
        unwritten = segment.pending_points
        sidecar = {
            "reason": reason,
            "http_status": http_status(rejection.error),
            "attempts": rejection.attempts,
            "first_failure": _iso(rejection.first_failure),
            "rejected_at": _iso(time.time()),
            "points": segment.points,
            "sink": self.name,
        }

        def set_aside() -> Path:
            # counted in the thread that moves the file: a close() that cancels this task
            # while the thread runs (tests wait for the file, then close) cannot separate
            # the two
            target = self.spool.reject(segment, sidecar)
            POINTS_REJECTED.inc(unwritten)
            return target

        target = await asyncio.to_thread(set_aside)
        # say so before the next await, which a close() may cancel (the gauge's count
        # comes last; close() counts again)
        self._rejecting = not isinstance(rejection.error, SpoolCorrupt)
        self._last_rejection = time.monotonic()
        log.error(
            "%s: InfluxDB refused %d raw points for good (%s, %d attempts); kept in %s, "
            "fix the target and run `usage-stream raw-resend`",
            self.name,
            unwritten,
            reason,
            rejection.attempts,
            target,
        )
        REJECTED_SEGMENTS.set(len(await asyncio.to_thread(rejected_segments, self.spool.root)))


def _iso(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix, dt.UTC).isoformat(timespec="seconds")


# raw-resend -----------------------------------------------------------------------------


@dataclass(slots=True)
class ResendSummary:
    """What :func:`resend_rejected` did; ``failed`` segments stay in ``rejected/``."""

    resent: int = 0
    points: int = 0
    failed: int = 0


async def resend_rejected(
    spool_dir: Path,
    writer: RawWriter,
    *,
    batch_size: int,
    dry_run: bool = False,
    out: Callable[[str], None] = print,
    attempts: int = 3,
) -> ResendSummary:
    """Send every segment in ``spool_dir/rejected/`` to ``writer``, oldest first; delete
    each (and its sidecar) once all its points were acknowledged; one line per segment.

    Transient failures get ``attempts`` tries with a short backoff; a segment that still
    fails stays where it is (re-sending is idempotent, so a partly sent one is simply
    sent again next time)."""
    summary = ResendSummary()
    directory = spool_dir / REJECTED
    segments = rejected_segments(spool_dir)
    if not segments:
        return summary
    lock = os.open(directory / ".resend.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another raw-resend is running on {directory}") from None
        for path in segments:
            await _resend_one(path, writer, batch_size, dry_run, out, attempts, summary)
    finally:
        os.close(lock)
    return summary


async def _resend_one(
    path: Path,
    writer: RawWriter,
    batch_size: int,
    dry_run: bool,
    out: Callable[[str], None],
    attempts: int,
    summary: ResendSummary,
) -> None:
    sidecar = path.with_suffix(".json")
    try:
        reason = json.loads(sidecar.read_text()).get("reason", "?")
    except (OSError, ValueError):
        reason = "?"
    try:
        records = await asyncio.to_thread(read_records, path, 0)
    except (SpoolCorrupt, OSError) as error:
        summary.failed += 1
        out(f"FAILED {path.name}: {error} (inspect it by hand)")
        return
    lines = [text for record in records for text in record.lines]
    if dry_run:
        summary.resent += 1
        summary.points += len(lines)
        out(f"would resend {path.name}: {len(lines)} points (rejected: {reason})")
        return
    for start in range(0, len(lines), batch_size):
        chunk = lines[start : start + batch_size]
        for attempt in range(1, attempts + 1):
            try:
                await writer.write_lines(chunk)
                break
            except Exception as error:
                if is_permanent(error) or attempt == attempts:
                    summary.failed += 1
                    out(f"FAILED {path.name}: {describe_error(error)}")
                    return
                await asyncio.sleep(float(attempt))
    with contextlib.suppress(FileNotFoundError):
        sidecar.unlink()
    path.unlink()
    summary.resent += 1
    summary.points += len(lines)
    out(f"resent {path.name}: {len(lines)} points")
