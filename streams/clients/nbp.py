"""NBP (Narodowy Bank Polski) table A mid rates.

NBP answers a range request with the tables inside it, and 404 ("Brak danych") when
there is none, which is normal for weekends and holidays. The documented limit is 93
days per request (the server enforces 367), so longer ranges are paged.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

from streams.clients.http import (
    ApiClient,
    MalformedResponse,
    RequestRejected,
)

__all__ = ["MAX_RANGE_DAYS", "NBP_FIRST_DATE", "NbpClient", "NbpRate", "day_chunks"]

log = logging.getLogger(__name__)

MAX_RANGE_DAYS = 93
"""Days (inclusive) per range request, the limit NBP documents."""

NBP_FIRST_DATE = date(2002, 1, 2)
"""The first table A the API serves."""

_TABLE_NO = re.compile(r"^\d{1,3}/A/NBP/\d{4}$")
_NO_DATA_MARKERS = ("Brak danych", "NotFound")


@dataclass(frozen=True)
class NbpRate:
    """One table A mid rate: PLN per 1 unit of ``currency``, exactly as NBP wrote it."""

    currency: str
    effective_date: date
    table_no: str
    mid: Decimal


def day_chunks(start: date, end: date, size: int = MAX_RANGE_DAYS) -> list[tuple[date, date]]:
    """Split the inclusive range ``[start, end]`` into consecutive ranges of ≤ ``size`` days."""
    chunks = []
    while start <= end:
        chunk_end = min(end, start + timedelta(days=size - 1))
        chunks.append((start, chunk_end))
        start = chunk_end + timedelta(days=1)
    return chunks


class NbpClient(ApiClient):
    """``GET {base}/exchangerates/rates/a/{code}/{start}/{end}/?format=json``."""

    source = "nbp"

    async def rates(self, start: date, end: date, currency: str = "USD") -> list[NbpRate]:
        """Every table A rate with ``start <= effectiveDate <= end``, paged by 93 days."""
        if start > end:
            raise ValueError(f"empty date range {start}..{end}")
        found: list[NbpRate] = []
        for chunk_start, chunk_end in day_chunks(start, end):
            found.extend(await self.fetch_range(chunk_start, chunk_end, currency))
        return found

    async def fetch_range(self, start: date, end: date, currency: str = "USD") -> list[NbpRate]:
        """One range request as given (the server validates it); [] on NBP's "no data" 404."""
        path = f"exchangerates/rates/a/{currency.lower()}/{start.isoformat()}/{end.isoformat()}/"
        response = await self.http.get_json(path, {"format": "json"}, allow_404=True)
        if response.status == 404:
            if not any(marker in response.text for marker in _NO_DATA_MARKERS):
                raise RequestRejected(
                    f"nbp: GET {response.url}: HTTP 404 without NBP's no-data text"
                    " (wrong NBP_API_URL?)",
                    404,
                    response.text,
                )
            log.debug("nbp: no table A for %s in %s..%s", currency, start, end)
            return []
        try:
            return parse_rates(response.payload, currency, start, end)
        except MalformedResponse as error:
            raise MalformedResponse(f"nbp: GET {response.url}: {error}") from None


def parse_rates(payload: Any, currency: str, start: date, end: date) -> list[NbpRate]:
    """Validate a rates-endpoint object; any defect rejects the whole answer."""
    if not isinstance(payload, dict):
        raise MalformedResponse(f"expected a JSON object, got {type(payload).__name__}")
    code = payload.get("code")
    if code != currency.upper():
        raise MalformedResponse(f"currency code {code!r}, expected {currency.upper()!r}")
    if payload.get("table") != "A":
        raise MalformedResponse(f"table {payload.get('table')!r}, expected 'A'")
    items = payload.get("rates")
    if not isinstance(items, list):
        raise MalformedResponse("missing 'rates' list")
    return [_parse_rate(item, index, code, start, end) for index, item in enumerate(items)]


def _parse_rate(item: Any, index: int, code: str, start: date, end: date) -> NbpRate:
    where = f"rates[{index}]"
    if not isinstance(item, dict):
        raise MalformedResponse(f"{where} is not an object")
    table_no = item.get("no")
    if not isinstance(table_no, str) or not _TABLE_NO.match(table_no):
        raise MalformedResponse(f"{where}.no is not a table A number: {table_no!r}")
    try:
        effective = date.fromisoformat(item.get("effectiveDate"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise MalformedResponse(
            f"{where}.effectiveDate is not a date: {item.get('effectiveDate')!r}"
        ) from None
    if not start <= effective <= end:
        raise MalformedResponse(f"{where}.effectiveDate {effective} outside {start}..{end}")
    return NbpRate(code, effective, table_no, _parse_mid(item.get("mid"), where))


def _parse_mid(value: Any, where: str) -> Decimal:
    """A JSON number parsed as Decimal (ints too); strings, bools and non-positives fail."""
    if isinstance(value, bool) or not isinstance(value, Decimal | int):
        raise MalformedResponse(f"{where}.mid is not a decimal number: {value!r}")
    mid = Decimal(value)
    if not mid.is_finite() or mid <= 0:
        raise MalformedResponse(f"{where}.mid is not a positive decimal: {value!r}")
    return mid
