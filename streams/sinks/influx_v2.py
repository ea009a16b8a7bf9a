"""InfluxDB v2 API writer (InfluxDB 2.x, Cloud, 3.x; VictoriaMetrics) via influxdb-client.

Uses ``InfluxDBClientAsync``; the client (an aiohttp session) is created lazily inside
the running event loop.
"""

from __future__ import annotations

from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
from influxdb_client.domain.write_precision import WritePrecision
from influxdb_client.rest import ApiException

from streams.settings import Settings
from streams.sinks.base import RawWriteError

__all__ = ["InfluxV2Writer"]


class InfluxV2Writer:
    """A :class:`~streams.sinks.base.RawWriter` for the v2 ``/api/v2/write`` endpoint."""

    def __init__(
        self,
        url: str,
        token: str,
        org: str,
        bucket: str,
        *,
        timeout_seconds: float = 10.0,
        use_gzip: bool = False,
    ) -> None:
        self._url = url
        self._token = token
        self._org = org
        self._bucket = bucket
        self._timeout_ms = int(timeout_seconds * 1000)
        self._gzip = use_gzip
        self._client: InfluxDBClientAsync | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, use_gzip: bool = False) -> InfluxV2Writer:
        url, token = settings.INFLUXDB_URL, settings.INFLUXDB_TOKEN
        org, bucket = settings.INFLUXDB_ORG, settings.INFLUXDB_BUCKET
        if not (url and token and org and bucket):
            raise ValueError("InfluxDB v2 needs INFLUXDB_URL, _TOKEN, _ORG and _BUCKET")
        return cls(
            url,
            token.get_secret_value(),
            org,
            bucket,
            timeout_seconds=settings.HTTP_TIMEOUT_SECONDS,
            use_gzip=use_gzip,
        )

    async def write_lines(self, lines: list[str]) -> None:
        if not lines:
            return
        if self._client is None:
            self._client = InfluxDBClientAsync(
                url=self._url,
                token=self._token,
                org=self._org,
                timeout=self._timeout_ms,
                enable_gzip=self._gzip,
            )
        try:
            await self._client.write_api().write(
                bucket=self._bucket,
                org=self._org,
                record="\n".join(lines),  # one str: cheaper to serialize than a list
                # WritePrecision's members are plain str class attributes in its types
                write_precision=WritePrecision.NS,  # type: ignore[arg-type]
            )
        except ApiException as error:
            body = (error.body or "").strip() if isinstance(error.body, str) else ""
            first = body.splitlines()[0] if body else (error.reason or "")
            raise RawWriteError(f"HTTP {error.status}: {first[:300]}") from None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()  # type: ignore[no-untyped-call]  # unannotated
            self._client = None
