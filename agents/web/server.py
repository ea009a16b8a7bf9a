"""HTTP endpoints on the worker's Faust web server (docs/contract.md §6).

The views are plain handlers; those that read the worker's state are made for it by a
``*_page`` function from the objects they read (agents/wiring.py registers them).
"""

from __future__ import annotations

import asyncio
import functools
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import orjson
from faust.web import Request, Response, View

from agents.hot_path.service import HotPath
from agents.web.readiness import Readiness
from streams.app import settings
from streams.metrics import REGISTRY, render
from streams.model.money import nano_text
from tables.summary_db.columns import DAILY_COLUMNS
from tables.summary_db.connection import SharedSummaryDb

if TYPE_CHECKING:
    from multidict import MultiMapping

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4"

#: A view's handler, as Faust's ``app.page(path)`` takes it (Faust makes it the view's
#: method, so it must be a plain function: the ``*_page`` functions return closures).
Page = Callable[[View, Request], Awaitable[Response]]


async def metrics(web: View, request: Request) -> Response:
    return web.bytes(render(), content_type=PROMETHEUS_CONTENT_TYPE)


async def health(web: View, request: Request) -> Response:
    return web.json({"status": "ok"})


def ready_page(readiness: Readiness) -> Page:
    async def ready(web: View, request: Request) -> Response:
        """200 only while this worker is consuming; else 503. The JSON names the ``phase``
        and the reasons (agents/web/readiness.py keeps them current in the background, so
        this answers at once, whatever the broker or the DB are doing)."""
        ok, body = readiness.answer()
        return web.json(body, status=200 if ok else 503)

    return ready


# Reads (/status, /usage) --------------------------------------------------------------

READ_TIMEOUT_SECONDS = 30.0
MAX_RANGE_DAYS = 366  # one (leap) year of daily rows per request
MAX_CLIENT_ID_CHARS = 128  # docs/contract.md §1: no event can carry a longer client_org_id
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")

# usage_daily's columns (docs/contract.md §3) plus ``final``: the keys of every /usage row.
USAGE_COLUMNS = (*DAILY_COLUMNS, "final")
# Exact decimal strings added beside the REAL columns: (key, nano column it is made from).
EXACT_MONEY = (
    ("raw_cost_usd_exact", "raw_cost_nano"),
    ("markup_cost_usd_exact", "markup_cost_nano"),
    ("markup_cost_pln_exact", "markup_cost_pln_nano"),
)
_USAGE_SQL = (
    f"SELECT {', '.join(USAGE_COLUMNS)} FROM usage_daily_live"
    " WHERE client_org_id = ? AND usage_date BETWEEN ? AND ?"
    " ORDER BY usage_date, user_id, model, final"
)


class ReadTimeout(Exception):
    """A read took longer than READ_TIMEOUT_SECONDS and was interrupted."""


def _read_only(path: Path, timeout: float) -> sqlite3.Connection:
    """A fresh read-only connection to the summary DB (WAL: it never blocks the writer,
    and the writer never blocks it), interrupted after ``timeout`` seconds so that a huge
    request cannot hold a WAL snapshot (and so the checkpoint) for ever."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
    conn.execute("PRAGMA query_only = 1")
    deadline = time.monotonic() + timeout
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    return conn


def _query(
    path: Path, statements: Sequence[tuple[str, tuple[object, ...]]], timeout: float
) -> list[list[dict[str, Any]]]:
    """Run the SELECTs in one read transaction (one consistent snapshot), in a thread."""
    conn = _read_only(path, timeout)
    try:
        conn.execute("BEGIN")
        results = []
        for sql, params in statements:
            try:
                cursor = conn.execute(sql, params)
                rows = cursor.fetchall()
            except sqlite3.OperationalError as error:
                if "interrupted" in str(error):
                    raise ReadTimeout(f"query took longer than {timeout:.0f} s") from None
                raise
            names = [column[0] for column in cursor.description]
            results.append([dict(zip(names, row, strict=True)) for row in rows])
        conn.execute("COMMIT")
        return results
    finally:
        conn.close()


async def read_summary(
    db: SharedSummaryDb,
    *statements: tuple[str, tuple[object, ...]],
    timeout: float = READ_TIMEOUT_SECONDS,
) -> list[list[dict[str, Any]]]:
    """The rows of each SELECT, read off the event loop through a read-only connection:
    the worker's shared connection ``db`` would queue a page behind a rollup transaction
    (or behind its own first connect, which waits for the write lock to migrate); it only
    creates the file when there is none yet."""
    if not db.path.exists():  # the worker creates it at start-up; a read-only one cannot
        await db.get()
    return await asyncio.to_thread(_query, db.path, statements, timeout)


def _json(web: View, value: object, status: int = 200) -> Response:
    return web.bytes(orjson.dumps(value), content_type="application/json", status=status)


def status_page(hot_path: HotPath, db: SharedSummaryDb) -> Page:
    async def status(web: View, request: Request) -> Response:
        """Operator's view of one worker.

        ``consumer_lag`` lists the source topic's partitions only (``topic/partition`` →
        messages not yet recorded), never Faust's internal topics. ``open_days`` are the usage
        dates with provisional totals: increments pending and the day not closed (a closed day
        with late events pending is not open again, its corrections are merged within a
        rollup interval).
        """
        lag = {
            f"{sample.labels['topic']}/{sample.labels['partition']}": int(sample.value)
            for metric in REGISTRY.collect()
            if metric.name == "usage_stream_consumer_lag"
            for sample in metric.samples
            if sample.labels["topic"] == settings.USAGE_TOPIC
        }
        if not settings.SUMMARY_WRITER:  # no summary DB here: the writer has the rest
            return _json(
                web,
                {
                    "assigned_partitions": hot_path.assigned_partitions(),
                    "summary_writer": False,
                    "consumer_lag": lag,
                },
            )
        runs, refresh, open_days = await read_summary(
            db,
            ("SELECT * FROM batch_runs ORDER BY id DESC LIMIT 20", ()),
            ("SELECT * FROM refresh_status ORDER BY source", ()),
            (
                "SELECT DISTINCT usage_date FROM daily_pending WHERE usage_date NOT IN"
                " (SELECT usage_date FROM closed_days) ORDER BY usage_date",
                (),
            ),
        )
        return _json(
            web,
            {
                "assigned_partitions": hot_path.assigned_partitions(),
                "summary_writer": True,
                "last_batch_runs": runs,
                "refresh": refresh,
                "open_days": [row["usage_date"] for row in open_days],
                "consumer_lag": lag,
            },
        )

    return status


class BadRequest(ValueError):
    """A /usage parameter is missing or invalid; the message is the one-line reason."""


def summary_writer_query(handler: Page) -> Page:
    """A query page of the summary DB (``/usage``, ``/v1/usage/query``), its failures
    answered alike (docs/contract.md §6): 404 on a worker that is not the summary writer
    (it has no summary DB), 400 with the one-line reason of a :class:`BadRequest`, 503
    when the read timed out or the DB could not be read. One place, so that a client
    handles both pages' errors the same way."""

    @functools.wraps(handler)
    async def page(web: View, request: Request) -> Response:
        if not settings.SUMMARY_WRITER:
            return _json(
                web,
                {"error": "not the summary writer: ask the worker with SUMMARY_WRITER=true"},
                404,
            )
        try:
            return await handler(web, request)
        except BadRequest as error:
            return _json(web, {"error": str(error)}, status=400)
        except ReadTimeout as error:
            return _json(web, {"error": str(error)}, status=503)
        except sqlite3.Error as error:
            return _json(web, {"error": f"summary DB not readable: {error}"}, status=503)

    return page


def query_values(request: Request, name: str) -> list[str]:
    """Every value of query parameter ``name``. faust types ``Request.query`` as a
    ``Mapping``; under its aiohttp driver it is a ``MultiDictProxy``, repeats kept."""
    query = cast("MultiMapping[str]", request.query)
    return query.getall(name, [])


def _one(request: Request, name: str) -> str:
    values = query_values(request, name)
    if not values:
        raise BadRequest(f"missing parameter {name}")
    if len(values) > 1:
        raise BadRequest(f"parameter {name} given {len(values)} times")
    return values[0]


def _date(request: Request, name: str) -> date:
    text = _one(request, name)
    try:
        if not _DATE.fullmatch(text):
            raise ValueError
        return date.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"{name} must be a date YYYY-MM-DD, got {text[:40]!r}") from None


def date_range(request: Request, max_days: int) -> tuple[date, date]:
    """``from`` and ``to`` of a query page, both inclusive, or :class:`BadRequest`. Each
    page passes its own bound (``/usage`` :data:`MAX_RANGE_DAYS`, the query API its
    own): the checks and their messages stay one, so a client reads both pages' alike."""
    first, last = _date(request, "from"), _date(request, "to")
    if first > last:
        raise BadRequest(f"from {first} is after to {last}")
    if (days := (last - first).days + 1) > max_days:
        raise BadRequest(f"range over {max_days} days ({days}): ask for it in parts")
    return first, last


def usage_query(request: Request) -> tuple[str, date, date]:
    """(client_org_id, from, to) of a /usage request, or :class:`BadRequest`."""
    client = _one(request, "client_org_id")
    if not 1 <= len(client) <= MAX_CLIENT_ID_CHARS:
        raise BadRequest(f"client_org_id must be 1-{MAX_CLIENT_ID_CHARS} characters")
    first, last = date_range(request, MAX_RANGE_DAYS)
    return client, first, last


def usage_row(row: dict[str, Any]) -> dict[str, Any]:
    """One ``usage_daily_live`` row as served: stored values as they are, plus the exact
    decimal strings of the money (see :func:`usage`)."""
    for key, nano in EXACT_MONEY:
        row[key] = None if row[nano] is None else nano_text(row[nano])
    return row


def usage_page(db: SharedSummaryDb) -> Page:
    @summary_writer_query
    async def usage(web: View, request: Request) -> Response:
        """``GET /usage?client_org_id=…&from=YYYY-MM-DD&to=YYYY-MM-DD`` (docs/contract.md §6).

        A JSON array of ``usage_daily_live`` rows of one client, closed and open days together,
        ordered by ``usage_date``, ``user_id``, ``model``. Keys: ``usage_daily``'s column names
        plus ``final`` (1: the day closed, the row is the bill; 0: the day is still open and
        the row is provisional, rewritten every ``ROLLUP_INTERVAL_SECONDS`` until it closes).
        A late event re-writes a closed row (``revision`` + 1) and it stays ``final`` = 1.

        Money for billing: every value is returned as stored, because a consumer reconciling
        against the summary DB must see the same numbers. The exact amounts are the
        ``*_nano`` integers (1e-9 USD or PLN). They are JSON integers, exact for any parser
        with 64-bit integers but not for JavaScript's ``Number`` beyond 2**53 nano (~9 M per
        row), so each is also given as an exact decimal string with 9 decimals:
        ``raw_cost_usd_exact``, ``markup_cost_usd_exact``, ``markup_cost_pln_exact`` (null
        while no rate is known, like ``markup_cost_pln_nano``). Sum those or the nano
        integers; the REAL columns (``raw_cost_usd``…) are for display only, summing floats
        drifts. ``usd_pln_rate`` is a decimal string, as stored.

        Parameters, all required once: a missing, repeated or invalid one is a 400 with
        ``{"error": "<one-line reason>"}``: a date that is not ``YYYY-MM-DD`` or not a real
        day, ``from`` after ``to``, a range over 366 days (a year per request keeps a page
        bounded; ask for longer spans in parts), a client_org_id outside 1-128 characters.
        Both dates are inclusive usage dates (``BUSINESS_TIMEZONE``). A client without rows
        in the range, known or not, is a 200 with ``[]``: there is no client registry to tell
        "unknown" from "no usage", and an empty bill is the truthful answer for both.

        The rows are read in one snapshot through a fresh read-only connection (WAL), so a
        long request never blocks the hot path or the rollup; a read over 30 s is cut off
        with a 503. Served by the summary writer only (docs/contract.md §6): another worker answers
        404 with the reason, it has no summary DB.
        """
        client, first, last = usage_query(request)
        (rows,) = await read_summary(
            db, (_USAGE_SQL, (client, first.isoformat(), last.isoformat()))
        )
        return _json(web, [usage_row(row) for row in rows])

    return usage
