"""``GET /v1/usage/query``: usage for the business application (docs/contract.md §6).

``?from=YYYY-MM-DD&to=YYYY-MM-DD[&client_org_id=ORG…][&granularity=day|month|total]
[&group_by=user_id,model]`` on the summary writer. Rows of ``usage_daily_live`` (closed
days and the open days' provisional rows) with usage dates in [from, to] (both included,
``BUSINESS_TIMEZONE``), of the clients named (repeat ``client_org_id``; none: every
client), summed per period (``usage_date``, ``usage_month``, or the whole range for
``total``), client and the ``group_by`` keys. The answer:

``{"time_zone", "as_of", "granularity", "group_by", "rows": [...]}``; each row has the
period, ``client_org_id`` and the grouping keys, the summed ``usage_daily`` columns
(``input_tokens``, ``output_tokens``, ``total_tokens``, ``requests``,
``estimated_requests`` as integers; ``raw_cost_usd``, ``markup_cost_usd``,
``markup_cost_pln`` as exact decimal strings summed from the nano integers,
``markup_cost_pln`` null while any of its days waits for an NBP rate) and ``final`` (1
when every day in it is closed). Ordered by period, client, user, model. ``as_of`` is the
moment of the read (RFC 3339 UTC): closed days are final; open days' rows are at most a
rollup interval old then.

``Accept: text/csv`` answers the same rows as RFC 4180 CSV (CRLF, a header line, empty
cell for null). Every bad parameter is a 400 ``{"error": "<one line>"}``: an unknown
name, a missing, repeated or malformed value, ``from`` after ``to``, a range over
:data:`MAX_RANGE_DAYS`, more than :data:`MAX_CLIENTS` clients, and a query that would
answer more than :data:`MAX_ROWS` rows (narrow it). Reads go through a fresh read-only
connection in one snapshot, cut off with a 503 after 30 s, as ``/usage``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from faust.web import Request, Response, View

from agents.web.server import (
    BadRequest,
    Page,
    _json,
    date_range,
    query_values,
    read_summary,
    summary_writer_query,
)
from streams.app import settings
from streams.model.money import nano_text
from tables.summary_db.connection import SharedSummaryDb
from tables.summary_db.schema import utc_now_text

__all__ = [
    "Query",
    "parse_query",
    "query_rows",
    "query_sql",
    "rows_as_csv",
    "usage_query_page",
    "wants_csv",
]

PARAMETERS = ("from", "to", "client_org_id", "granularity", "group_by")
GRANULARITIES = ("day", "month", "total")
GROUP_KEYS = ("user_id", "model")
MAX_RANGE_DAYS = 3660  # ten years of usage dates per request
MAX_CLIENTS = 1000
MAX_CLIENT_ID_CHARS = 128  # docs/contract.md §1
MAX_ROWS = 100_000
#: granularity -> (the period's key, its SQL expression); ``total`` has no period key
_PERIOD = {
    "day": ("usage_date", "usage_date"),
    "month": ("usage_month", "substr(usage_date, 1, 7)"),
}
_COUNTS = ("input_tokens", "output_tokens", "total_tokens", "requests", "estimated_requests")
_MONEY = (
    ("raw_cost_usd", "raw_cost_nano"),
    ("markup_cost_usd", "markup_cost_nano"),
    ("markup_cost_pln", "markup_cost_pln_nano"),
)


@dataclass(frozen=True, slots=True)
class Query:
    first: date
    last: date
    clients: tuple[str, ...]  # empty: every client
    granularity: str
    group_by: tuple[str, ...]  # in GROUP_KEYS order

    @property
    def keys(self) -> tuple[str, ...]:
        """The row keys, in order: the period (unless ``total``), client, grouping keys."""
        period = (_PERIOD[self.granularity][0],) if self.granularity in _PERIOD else ()
        return (*period, "client_org_id", *self.group_by)

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.keys, *_COUNTS, *(name for name, _ in _MONEY), "final")


def _once(request: Request, name: str, default: str) -> str:
    values = query_values(request, name)
    if len(values) > 1:
        raise BadRequest(f"parameter {name} given {len(values)} times")
    return values[0] if values else default


def parse_query(request: Request) -> Query:
    """The query of a request, or :class:`BadRequest` naming the first bad parameter."""
    for name in request.query:
        if name not in PARAMETERS:
            raise BadRequest(f"unknown parameter {name[:40]!r}: expected {', '.join(PARAMETERS)}")
    first, last = date_range(request, MAX_RANGE_DAYS)
    clients = tuple(dict.fromkeys(query_values(request, "client_org_id")))
    if len(clients) > MAX_CLIENTS:
        raise BadRequest(f"more than {MAX_CLIENTS} client_org_id values ({len(clients)})")
    for client in clients:
        if not 1 <= len(client) <= MAX_CLIENT_ID_CHARS:
            raise BadRequest(f"client_org_id must be 1-{MAX_CLIENT_ID_CHARS} characters")
    granularity = _once(request, "granularity", "day")
    if granularity not in GRANULARITIES:
        raise BadRequest(
            f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity[:40]!r}"
        )
    group_text = _once(request, "group_by", "")
    names = [part.strip() for part in group_text.split(",")] if group_text.strip() else []
    for name in names:
        if name not in GROUP_KEYS:
            raise BadRequest(
                f"group_by takes {' and '.join(GROUP_KEYS)} (comma-separated), got {name[:40]!r}"
            )
    if len(set(names)) != len(names):
        raise BadRequest("group_by names a key twice")
    group_by = tuple(key for key in GROUP_KEYS if key in names)
    return Query(first, last, clients, granularity, group_by)


_SUMMED = (*_COUNTS, "raw_cost_nano", "markup_cost_nano")


def _source(query: Query) -> str:
    """The rows to sum, as (keys, summed columns, ``rows``, ``pln``, ``pln_rows``,
    ``final``). Without ``user_id`` among the keys, closed days come from the totals the
    triggers keep per client (and model) and date (schema migration 21): a year of every
    client is ~18k rows there, 18M in ``usage_daily`` at 50k keys a day. Open days come
    from their provisional rows (a day or two). With ``user_id``, ``usage_daily_live``."""
    keys = ", ".join(("usage_date", "client_org_id", *query.group_by))
    summed = ", ".join(_SUMMED)
    if "user_id" in query.group_by:
        return (
            f"SELECT {keys}, {summed}, 1 AS rows, markup_cost_pln_nano AS pln,"
            " markup_cost_pln_nano IS NOT NULL AS pln_rows, final FROM usage_daily_live"
        )
    totals = "usage_client_model_daily" if query.group_by else "usage_client_daily"
    return (
        f"SELECT {keys}, {summed}, rows, markup_cost_pln_nano AS pln, pln_rows, 1 AS final"
        f" FROM {totals} WHERE {{where}} UNION ALL"
        f" SELECT {keys}, {summed}, 1, COALESCE(markup_cost_pln_nano, 0),"
        " markup_cost_pln_nano IS NOT NULL, 0 FROM usage_daily_open"
    )


def query_sql(query: Query) -> tuple[str, tuple[object, ...]]:
    """One GROUP BY over the query's source (:func:`_source`), every arm filtered by date
    and client so the indexes serve the range; ``LIMIT MAX_ROWS + 1`` tells a query that
    is too big without reading its every row into memory."""
    select: list[str] = []
    if query.granularity in _PERIOD:
        name, expression = _PERIOD[query.granularity]
        select.append(f"{expression} AS {name}")
    select += ["client_org_id", *query.group_by]
    group = list(range(1, len(select) + 1))
    sums = [f"SUM({name}) AS {name}" for name in _SUMMED] + [
        "CASE WHEN SUM(pln_rows) = SUM(rows) THEN SUM(pln) END AS markup_cost_pln_nano",
        "MIN(final) AS final",
    ]
    where = "usage_date BETWEEN ? AND ?"
    params: list[object] = [query.first.isoformat(), query.last.isoformat()]
    if query.clients:
        where += f" AND client_org_id IN ({','.join('?' * len(query.clients))})"
        params += query.clients
    source = _source(query)
    arms = source.count("{where}") + 1
    source = source.replace("{where}", where) + f" WHERE {where}"
    order = ", ".join(str(position) for position in group)
    sql = (
        f"SELECT {', '.join(select + sums)} FROM ({source})"
        f" GROUP BY {order} ORDER BY {order} LIMIT {MAX_ROWS + 1}"
    )
    return sql, tuple(params) * arms


def query_rows(query: Query, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The answer's rows: keys, integer counts, money as exact decimal strings, final."""
    out = []
    for row in rows:
        values = {key: row[key] for key in query.keys}
        values |= {name: int(row[name]) for name in _COUNTS}
        for name, nano in _MONEY:
            values[name] = None if row[nano] is None else nano_text(int(row[nano]))
        values["final"] = int(row["final"])
        out.append(values)
    return out


def rows_as_csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    """RFC 4180: a header line, CRLF line ends, quoting where needed, null as empty."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(columns)
    for row in rows:
        writer.writerow("" if row[name] is None else row[name] for name in columns)
    return buffer.getvalue()


def wants_csv(accept: str) -> bool:
    """True when ``Accept`` asks for ``text/csv`` and does not prefer JSON over it."""
    quality: dict[str, float] = {}
    for part in accept.split(","):
        media, *options = (piece.strip() for piece in part.split(";"))
        q = 1.0
        for option in options:
            name, _, value = option.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        quality[media.lower()] = q
    csv_q = quality.get("text/csv", 0.0)
    return csv_q > 0 and csv_q >= quality.get("application/json", 0.0)


def usage_query_page(db: SharedSummaryDb) -> Page:
    @summary_writer_query
    async def usage_query(web: View, request: Request) -> Response:
        """The query API (module docstring)."""
        query = parse_query(request)
        as_of = utc_now_text()
        (rows,) = await read_summary(db, query_sql(query))
        if len(rows) > MAX_ROWS:
            return _json(
                web,
                {
                    "error": f"the query answers more than {MAX_ROWS} rows: narrow the dates,"
                    " the clients, the granularity or group_by"
                },
                status=400,
            )
        answer = query_rows(query, rows)
        if wants_csv(request.headers.get("Accept", "")):
            # as a header: aiohttp refuses a content_type carrying a charset
            return web.bytes(
                rows_as_csv(query.columns, answer).encode("utf-8"),
                headers={"Content-Type": "text/csv; charset=utf-8; header=present"},
            )
        return _json(
            web,
            {
                "time_zone": settings.BUSINESS_TIMEZONE,
                "as_of": as_of,
                "granularity": query.granularity,
                "group_by": list(query.group_by),
                "rows": answer,
            },
        )

    return usage_query
