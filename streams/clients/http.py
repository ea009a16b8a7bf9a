"""One GET-JSON helper shared by the reference-data clients.

Transient failures (connection errors, timeouts, HTTP 5xx) are retried with exponential
backoff; a 4xx is an answer, not an outage, so it is never retried. Every failure ends in
one of a small set of exceptions whose ``str()`` is a single line fit for a log or the
``batch_runs.error`` column.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from types import TracebackType
from typing import Any, Self

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

__all__ = [
    "HttpResponse",
    "JsonHttpClient",
    "MalformedResponse",
    "RequestRejected",
    "RetryPolicy",
    "SourceError",
    "SourceUnavailable",
    "one_line",
]

log = logging.getLogger(__name__)

_BODY_PREVIEW = 200


def one_line(text: str, limit: int = 500) -> str:
    """Collapse whitespace so a message fits one log line / one DB cell."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class SourceError(Exception):
    """A reference-data source did not give a usable answer."""


class SourceUnavailable(SourceError):
    """Unreachable, timed out or 5xx, still after all retries."""


class MalformedResponse(SourceError):
    """The source answered, but not in the documented format; nothing may be stored."""


class RequestRejected(SourceError):
    """The source answered 4xx: our request is wrong (or, for NBP 404, there is no data)."""

    def __init__(self, message: str, status: int, body: str) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


def _no_nan(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


class _Transient(Exception):
    """Internal: a failure worth another attempt."""


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try before declaring a source unavailable (tests use tiny backoffs)."""

    attempts: int = 4
    initial_backoff_seconds: float = 1.0
    max_backoff_seconds: float = 30.0


@dataclass(frozen=True)
class HttpResponse:
    """A 2xx or 404 answer; ``payload`` is parsed JSON (floats as Decimal) or None."""

    status: int
    url: str
    payload: Any
    text: str


class JsonHttpClient:
    """GET JSON from ``base_url`` with a per-attempt timeout and retries.

    Use as an async context manager (one aiohttp session for all requests), or call
    :meth:`close` yourself.
    """

    def __init__(
        self,
        base_url: str,
        *,
        source: str,
        timeout_seconds: float,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.source = source
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self.retry = retry or RetryPolicy()
        self._headers = {"Accept": "application/json", **(headers or {})}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> JsonHttpClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout, headers=self._headers)
        return self._session

    async def get_json(
        self,
        path: str,
        params: Mapping[str, str] | None = None,
        *,
        allow_404: bool = False,
    ) -> HttpResponse:
        """GET ``base_url + path``; retries transient failures, raises :class:`SourceError`.

        With ``allow_404`` a 404 is returned (payload None) instead of raised, for APIs
        such as NBP that use it for "no data".
        """
        url = f"{self.base_url}/{path.lstrip('/')}"
        retrying = AsyncRetrying(
            stop=stop_after_attempt(max(1, self.retry.attempts)),
            wait=wait_exponential(
                multiplier=self.retry.initial_backoff_seconds,
                max=self.retry.max_backoff_seconds,
            ),
            retry=retry_if_exception_type(_Transient),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._attempt(url, params, allow_404)
        except _Transient as error:
            raise SourceUnavailable(
                f"{self.source}: GET {url}: {error} (after {self.retry.attempts} attempts)"
            ) from error
        raise AssertionError("unreachable: tenacity either returns or raises")

    def _log_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "%s: attempt %d failed (%s); retrying in %.2f s",
            self.source,
            state.attempt_number,
            error,
            delay,
        )

    async def _attempt(
        self, url: str, params: Mapping[str, str] | None, allow_404: bool
    ) -> HttpResponse:
        try:
            async with self._client_session().get(url, params=params) as response:
                body = await response.read()
                status = response.status
        except TimeoutError as error:
            raise _Transient(f"timed out after {self.timeout.total} s") from error
        except aiohttp.ClientError as error:
            raise _Transient(one_line(f"{type(error).__name__}: {error}")) from error
        text = body.decode("utf-8", errors="replace")
        if status >= 500:
            raise _Transient(f"HTTP {status}: {one_line(text, _BODY_PREVIEW)}")
        if status == 404 and allow_404:
            return HttpResponse(status=status, url=url, payload=None, text=text)
        if status >= 400:
            raise RequestRejected(
                f"{self.source}: GET {url}: HTTP {status}: {one_line(text, _BODY_PREVIEW)}",
                status,
                text,
            )
        if status != 200:
            raise MalformedResponse(f"{self.source}: GET {url}: unexpected HTTP {status}")
        return HttpResponse(status=status, url=url, payload=self._parse(url, body), text=text)

    def _parse(self, url: str, body: bytes) -> Any:
        """JSON with every non-integer number as an exact Decimal (never a float)."""
        try:
            return json.loads(body.decode("utf-8"), parse_float=Decimal, parse_constant=_no_nan)
        except ValueError as error:
            text = body.decode("utf-8", errors="replace")
            raise MalformedResponse(
                f"{self.source}: GET {url}: not JSON ({error}): {one_line(text, 80)!r}"
            ) from None


class ApiClient:
    """Base of the per-API clients: one :class:`JsonHttpClient` named after ``source``."""

    source = "api"

    def __init__(
        self,
        base_url: str,
        *,
        timeout_seconds: float,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.http = JsonHttpClient(
            base_url, source=self.source, timeout_seconds=timeout_seconds, retry=retry
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.close()
