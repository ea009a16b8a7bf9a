"""InfluxDB 1.x writer: ``POST {INFLUXDB_URL}/write?db=&rp=&precision=ns`` with aiohttp.

Credentials (``INFLUXDB_USERNAME``/``INFLUXDB_PASSWORD``) go in an HTTP basic auth
header, never in the URL; user info embedded in ``INFLUXDB_URL`` is moved to the header
too. The database must exist (``CREATE DATABASE``): a 404 is retried and logged.
"""

from __future__ import annotations

import base64
import gzip

import aiohttp
from yarl import URL

from streams.settings import Settings
from streams.sinks.base import RawWriteError

__all__ = ["InfluxV1Writer"]


class InfluxV1Writer:
    """A :class:`~streams.sinks.base.RawWriter` for the InfluxDB 1.x ``/write`` endpoint."""

    def __init__(
        self,
        url: str,
        database: str,
        *,
        retention_policy: str | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout_seconds: float = 10.0,
        use_gzip: bool = False,
    ) -> None:
        base = URL(url)
        if base.user and username is None:
            username, password = base.user, base.password
        base = base.with_user(None).with_password(None)
        params = {"db": database, "precision": "ns"}
        if retention_policy:
            params["rp"] = retention_policy
        self._url = (base / "write").with_query(params)
        self._headers = {"Content-Type": "text/plain; charset=utf-8"}
        if username:  # built by hand: aiohttp.BasicAuth is deprecated in aiohttp 3.14
            token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._gzip = use_gzip
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, use_gzip: bool = False) -> InfluxV1Writer:
        if not settings.INFLUXDB_URL or not settings.INFLUXDB_DATABASE:
            raise ValueError("InfluxDB v1 needs INFLUXDB_URL and INFLUXDB_DATABASE")
        password = settings.INFLUXDB_PASSWORD
        return cls(
            settings.INFLUXDB_URL,
            settings.INFLUXDB_DATABASE,
            retention_policy=settings.INFLUXDB_RETENTION_POLICY,
            username=settings.INFLUXDB_USERNAME,
            password=password.get_secret_value() if password else None,
            timeout_seconds=settings.HTTP_TIMEOUT_SECONDS,
            use_gzip=use_gzip,
        )

    async def write_lines(self, lines: list[str]) -> None:
        if not lines:
            return
        body = "\n".join(lines).encode()
        headers = self._headers
        if self._gzip:
            body = gzip.compress(body, compresslevel=1)
            headers = {**headers, "Content-Encoding": "gzip"}
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.post(self._url, data=body, headers=headers) as response:
                if response.status // 100 == 2:
                    return
                text = (await response.text(errors="replace")).strip()
        except (aiohttp.ClientError, TimeoutError) as error:
            reason = str(error).splitlines()[0] if str(error) else "timed out"
            # aiohttp messages may embed the URL; ours carries no credentials.
            raise RawWriteError(f"{type(error).__name__}: {reason}") from None
        first = text.splitlines()[0] if text else ""
        raise RawWriteError(f"HTTP {response.status}: {first[:300]}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
