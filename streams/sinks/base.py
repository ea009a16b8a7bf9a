"""At-least-once raw point sink: chunking, retry forever, backoff, circuit breaker.

The caller acknowledges Kafka offsets only after :meth:`RawSink.write` returns, so a
chunk is retried until the server takes it; nothing is dropped. Retrying is safe: a
point's series and timestamp are derived from the event, so a re-sent point overwrites
itself (see :mod:`streams.sinks.lineprotocol`).

Failure handling, per sink (shared by concurrent callers):

* closed: a failed attempt waits ``min(base * 2**(n-1), cap)`` (1, 2, 4, 8 s by default)
  before the next one;
* after ``failure_threshold`` (3) consecutive failures the circuit opens
  (``usage_stream_raw_sink_circuit_open`` = 1): callers queue behind one lock and each
  attempt is a single half-open probe (a real chunk) at most once per ``open_interval``
  (>= the backoff cap); the first success closes the circuit and resets the count.

The loop is explicit rather than ``tenacity``: the breaker state is shared between
calls and changes the wait and the locking per attempt, which tenacity's per-call
retry policies would only express through callbacks reaching back into this object.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from streams.metrics import (
    RAW_POINTS_WRITTEN,
    RAW_SINK_CIRCUIT_OPEN,
    RAW_WRITE_ERRORS,
    RAW_WRITE_SECONDS,
)
from streams.sinks.lineprotocol import RawPoint, to_lines

__all__ = [
    "RawSink",
    "RawWriteError",
    "RawWriter",
    "describe_error",
    "http_status",
    "is_permanent",
]

log = logging.getLogger(__name__)

_URL_USERINFO = re.compile(r"(?<=://)[^/\s@]*@")
_SECRET_PARAMS = re.compile(r"(?i)\b(token|password|passwd|secret|u|p|authorization)=[^&\s]*")
_HTTP_STATUS = re.compile(r"^HTTP (\d{3})\b")
_RETRY = object()


class RawWriteError(Exception):
    """A writer's failed attempt; the message is one line and carries no secrets."""


class RawWriter(Protocol):
    """Sends line protocol lines somewhere; one call is one attempt."""

    async def write_lines(self, lines: list[str]) -> None:
        """Store all ``lines`` or raise."""
        ...

    async def close(self) -> None: ...


def describe_error(error: BaseException, limit: int = 300) -> str:
    """One line about ``error`` without credentials (URL user info, token/password params)."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    first = _SECRET_PARAMS.sub(r"\1=***", _URL_USERINFO.sub("***@", first))
    name = type(error).__name__
    return f"{name}: {first[:limit]}" if first else name


def http_status(error: BaseException) -> int | None:
    """The HTTP status of a failed write (both InfluxDB writers raise ``RawWriteError``
    starting with ``HTTP <status>:``); None for timeouts and connection errors."""
    if not isinstance(error, RawWriteError):
        return None
    match = _HTTP_STATUS.match(str(error))
    return int(match.group(1)) if match else None


def is_permanent(error: BaseException) -> bool:
    """A rejection that retrying the same lines will not fix: a 4xx (missing database,
    bad token, unparseable line), except 408 (timeout) and 429 (slow down)."""
    status = http_status(error)
    return status is not None and 400 <= status < 500 and status not in (408, 429)


class RawSink:
    """Writes :class:`RawPoint` batches through a :class:`RawWriter`, at least once."""

    def __init__(
        self,
        writer: RawWriter,
        *,
        batch_size: int = 5000,
        backoff_base: float = 1.0,
        backoff_cap: float = 8.0,
        failure_threshold: int = 3,
        open_interval: float | None = None,
        name: str = "raw sink",
    ) -> None:
        if batch_size < 1 or backoff_base <= 0 or backoff_cap < backoff_base:
            raise ValueError("need batch_size >= 1 and 0 < backoff_base <= backoff_cap")
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        self.writer = writer
        self.batch_size = batch_size
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.failure_threshold = failure_threshold
        self.open_interval = max(open_interval or backoff_cap, backoff_cap)
        self.name = name
        self._failures = 0
        self._open = False
        self._next_probe_at = 0.0
        self._probe_lock = asyncio.Lock()
        RAW_SINK_CIRCUIT_OPEN.set(0)

    @property
    def circuit_open(self) -> bool:
        return self._open

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    async def write(self, points: Sequence[RawPoint]) -> None:
        """Store every point (chunks of ``batch_size``), retrying each chunk until it succeeds.

        Returns only when all points are stored; ``CancelledError`` propagates at once.
        """
        for start in range(0, len(points), self.batch_size):
            await self._write_chunk(to_lines(points[start : start + self.batch_size]))

    async def start(self) -> None:
        """Called once by the worker before the first write (a spooling sink starts its
        shipper here); nothing to do for a direct sink."""

    async def write_lines(self, lines: Sequence[str]) -> None:
        """:meth:`write` for lines already built (:func:`~streams.sinks.lineprotocol.line`)."""
        for start in range(0, len(lines), self.batch_size):
            await self._write_chunk(list(lines[start : start + self.batch_size]))

    async def close(self) -> None:
        await self.writer.close()

    async def _write_chunk(self, lines: list[str]) -> None:
        while True:
            if self._open:
                async with self._probe_lock:
                    if self._open:  # still open: one half-open probe per open interval
                        await asyncio.sleep(max(0.0, self._next_probe_at - time.monotonic()))
                        if await self._attempt(lines):
                            return
                        continue
            if await self._attempt(lines):
                return
            if not self._open:
                await asyncio.sleep(self._backoff())

    async def write_chunk_or_permanent(
        self, lines: list[str], permanent: Callable[[BaseException], bool] = is_permanent
    ) -> BaseException | None:
        """One chunk, retried like :meth:`write_lines` (backoff, circuit breaker), except a
        failure ``permanent`` accepts: that attempt is counted and logged, and its error
        returned to the caller (the spool shipper decides when to set lines aside).

        A permanent failure proves the server answers, so it closes an open circuit
        instead of feeding it. Returns None once the chunk is stored."""
        while True:
            if self._open:
                async with self._probe_lock:
                    if self._open:
                        await asyncio.sleep(max(0.0, self._next_probe_at - time.monotonic()))
                        outcome = await self._attempt_or_permanent(lines, permanent)
                        if outcome is not _RETRY:
                            return outcome  # type: ignore[return-value]
                        continue
            outcome = await self._attempt_or_permanent(lines, permanent)
            if outcome is not _RETRY:
                return outcome  # type: ignore[return-value]
            if not self._open:
                await asyncio.sleep(self._backoff())

    async def _attempt_or_permanent(
        self, lines: list[str], permanent: Callable[[BaseException], bool]
    ) -> object:
        """None on success, the error when permanent, ``_RETRY`` otherwise."""
        try:
            with RAW_WRITE_SECONDS.time():
                await self.writer.write_lines(lines)
        except Exception as error:
            if not permanent(error):
                self._failed(error, len(lines))
                return _RETRY
            RAW_WRITE_ERRORS.inc()
            log.warning(
                "%s: write of %d points rejected: %s", self.name, len(lines), describe_error(error)
            )
            self._reachable()
            return error
        self._succeeded(len(lines))
        return None

    def _reachable(self) -> None:
        """The server answered (if only to refuse): close the circuit, reset the count."""
        if self._open:
            log.warning("%s: circuit closed, the server answers again", self.name)
            self._open = False
            RAW_SINK_CIRCUIT_OPEN.set(0)
        self._failures = 0

    def _backoff(self) -> float:
        return min(self.backoff_base * 2.0 ** (self._failures - 1), self.backoff_cap)

    async def _attempt(self, lines: list[str]) -> bool:
        """One write attempt; updates metrics and the breaker. True on success."""
        try:
            with RAW_WRITE_SECONDS.time():
                await self.writer.write_lines(lines)
        except Exception as error:  # any failure is retried; CancelledError is not caught
            self._failed(error, len(lines))
            return False
        self._succeeded(len(lines))
        return True

    def _failed(self, error: Exception, count: int) -> None:
        RAW_WRITE_ERRORS.inc()
        self._failures += 1
        if self._failures >= self.failure_threshold:
            self._next_probe_at = time.monotonic() + self.open_interval
            if not self._open:
                self._open = True
                RAW_SINK_CIRCUIT_OPEN.set(1)
                log.error(
                    "%s: circuit open after %d consecutive failures; probing every %.1f s",
                    self.name,
                    self._failures,
                    self.open_interval,
                )
            wait = self.open_interval
        else:
            wait = self._backoff()
        log.warning(
            "%s: write of %d points failed (attempt %d, retry in %.2f s): %s",
            self.name,
            count,
            self._failures,
            wait,
            describe_error(error),
        )

    def _succeeded(self, count: int) -> None:
        RAW_POINTS_WRITTEN.inc(count)
        if self._open:
            log.warning(
                "%s: circuit closed, write succeeded after %d failures", self.name, self._failures
            )
            self._open = False
            RAW_SINK_CIRCUIT_OPEN.set(0)
        self._failures = 0
