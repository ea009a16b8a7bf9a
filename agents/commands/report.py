"""``usage-stream report``: the monthly statement per client, from the summary DB.

The business side asks "what do we bill org-3 for November?": this answers from the daily
summaries without SQL. Amounts are summed from the exact ``*_nano`` integers and printed as
exact decimal strings (9 decimals, ``.`` as the separator), never through floats. A total
that is not final is flagged, never silently summed:

* days still waiting for an NBP rate leave ``markup_cost_pln`` empty and are listed in
  ``pln_pending_dates`` (a partial PLN sum would read as a complete one);
* open days (provisional rows of ``usage_daily_live``, ``final`` = 0) are included and
  listed in ``provisional_dates``; the statement's ``open_dates`` also lists the days of
  the month that are not over yet, so ``final`` is 1 only for a complete, closed month.
  On an older DB without ``usage_daily_live`` only closed days are reported, and the days
  with no closed data yet (not over, or recorded but not rolled up) are listed instead.

A closed month (its statement issued ``STATEMENT_GRACE_DAYS`` after its last day,
tables/summary_db/statements.py) is stated as issued: each client's line is its ``statements`` row
(totals only; the rates are on the ``--detail`` lines, which show ``usage_daily`` as it is
now), followed by the adjustments recorded since, one line each. An open month lists the
adjustments that land on it (corrections of closed months) as lines of their own. So the
sum of a report's lines is what to bill: a closed month's issued statement plus its later
corrections, or an open month's usage plus the corrections billed on it.

Exit status: 0 with a statement; 1 when there is nothing to state (no rows for the month or
the client: an empty bill is almost always a mistyped month or client, and a script must
not send it); 2 when no statement can be made (bad ``--month``, unreadable DB). Each
non-zero exit prints one line on stderr.
"""

from __future__ import annotations

import csv
import io
import os
import re
import sqlite3
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import click
import orjson
from faust.cli import option

from streams.app import settings
from streams.cli import fail
from streams.model.money import nano_text
from tables.summary_db.columns import SUMMED_COLUMNS
from tables.summary_db.report_queries import (
    AdjustmentRow,
    IssuedRow,
    ReportRow,
    ReportSourceError,
    adjustment_rows,
    closed_at,
    issued_rows,
    last_usage_month,
    month_bounds,
    month_rows,
    open_readonly,
    unrolled_dates,
    usage_source,
)

__all__ = ["Statement", "StatementLine", "build_statement", "report"]

_MONTH = re.compile(r"(\d{4})-(0[1-9]|1[0-2])")

# CSV columns and JSON keys, in order: usage_daily's names (usage_month as in
# client_monthly_usage) plus the flags that keep unfinished totals from passing as final.
_KEY_COLUMNS = ("usage_month", "client_org_id")
_DETAIL_COLUMNS = ("user_id", "model")
_VALUE_COLUMNS = (
    "requests",
    "estimated_requests",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "raw_cost_usd",
    "markup_cost_usd",
    "markup_cost_pln",
    "usd_pln_rate",
    "nbp_table_no",
    "final",
    "provisional_dates",
    "pln_pending_dates",
)
# After them, what tells a statement line from an adjustment line (empty on the former).
_LINE_COLUMNS = (
    "line",
    "adjustment_id",
    "usage_date",
    "reason",
    "statement_month",
    "recorded_at",
)

_NOT_IN_JSON_ADJUSTMENTS = (
    "usd_pln_rate",
    "nbp_table_no",
    "final",
    "provisional_dates",
    "pln_pending_dates",
    "line",
)


def date_ranges(dates: Iterable[str]) -> str:
    """``2025-03-01..2025-03-03, 2025-03-05``: a compact list for the terminal table."""
    days = sorted({date.fromisoformat(day) for day in dates})
    spans: list[tuple[date, date]] = []
    for day in days:
        if spans and day - spans[-1][1] == timedelta(days=1):
            spans[-1] = (spans[-1][0], day)
        else:
            spans.append((day, day))
    return ", ".join(
        first.isoformat() if first == last else f"{first.isoformat()}..{last.isoformat()}"
        for first, last in spans
    )


@dataclass
class RateUse:
    """One USD/PLN rate and the days (and amounts) of a statement line it converted."""

    usd_pln_rate: str
    nbp_table_no: set[str] = field(default_factory=set)
    usage_dates: set[str] = field(default_factory=set)
    markup_cost_nano: int = 0
    markup_cost_pln_nano: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "usd_pln_rate": self.usd_pln_rate,
            "nbp_table_no": " ".join(sorted(self.nbp_table_no)),
            "usage_dates": sorted(self.usage_dates),
            "markup_cost_usd": nano_text(self.markup_cost_nano),
            "markup_cost_pln": nano_text(self.markup_cost_pln_nano),
        }


@dataclass
class StatementLine:
    """Exact sums of ``usage_daily`` rows for one client (or one client, user and model)."""

    client_org_id: str
    user_id: str | None = None
    model: str | None = None
    requests: int = 0
    estimated_requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    raw_cost_nano: int = 0
    markup_cost_nano: int = 0
    markup_cost_pln_nano: int = 0  # of the days that have a rate; shown only if all do
    pln_pending_dates: set[str] = field(default_factory=set)
    provisional_dates: set[str] = field(default_factory=set)
    rates: dict[str, RateUse] = field(default_factory=dict)

    def add(self, row: ReportRow) -> None:
        usage = row.usage
        self.requests += usage.requests
        self.estimated_requests += usage.estimated_requests
        self.input_tokens += usage.input_tokens
        self.output_tokens += usage.output_tokens
        self.total_tokens += usage.total_tokens
        self.raw_cost_nano += usage.raw_cost_nano
        self.markup_cost_nano += usage.markup_cost_nano
        if not row.final:
            self.provisional_dates.add(row.usage_date)
        if usage.markup_cost_pln_nano is None or row.usd_pln_rate is None:
            self.pln_pending_dates.add(row.usage_date)
            return
        self.markup_cost_pln_nano += usage.markup_cost_pln_nano
        use = self.rates.setdefault(row.usd_pln_rate, RateUse(row.usd_pln_rate))
        if row.nbp_table_no:
            use.nbp_table_no.add(row.nbp_table_no)
        use.usage_dates.add(row.usage_date)
        use.markup_cost_nano += usage.markup_cost_nano
        use.markup_cost_pln_nano += usage.markup_cost_pln_nano

    def merge(self, other: StatementLine) -> None:
        """Add another line's sums (a grand total over clients)."""
        for name in SUMMED_COLUMNS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.pln_pending_dates |= other.pln_pending_dates
        self.provisional_dates |= other.provisional_dates
        for rate, use in other.rates.items():
            mine = self.rates.setdefault(rate, RateUse(rate))
            mine.nbp_table_no |= use.nbp_table_no
            mine.usage_dates |= use.usage_dates
            mine.markup_cost_nano += use.markup_cost_nano
            mine.markup_cost_pln_nano += use.markup_cost_pln_nano

    @property
    def markup_cost_pln(self) -> str | None:
        """None while any day of the line waits for a rate: no partial PLN totals."""
        return None if self.pln_pending_dates else nano_text(self.markup_cost_pln_nano)

    def ordered_rates(self) -> list[RateUse]:
        return sorted(self.rates.values(), key=lambda use: min(use.usage_dates))

    def values(self, month: str, detail: bool, final: bool) -> dict[str, Any]:
        """The line keyed by column name; money as exact strings, dates as sorted lists."""
        rates = self.ordered_rates()
        values: dict[str, Any] = {"usage_month": month, "client_org_id": self.client_org_id}
        if detail:
            values |= {"user_id": self.user_id, "model": self.model}
        values |= {
            "requests": self.requests,
            "estimated_requests": self.estimated_requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
            "raw_cost_usd": nano_text(self.raw_cost_nano),
            "markup_cost_usd": nano_text(self.markup_cost_nano),
            "markup_cost_pln": self.markup_cost_pln,
            "usd_pln_rate": " ".join(use.usd_pln_rate for use in rates) or None,
            "nbp_table_no": " ".join(" ".join(sorted(use.nbp_table_no)) for use in rates) or None,
            "final": int(final and not self.provisional_dates),
            "provisional_dates": sorted(self.provisional_dates),
            "pln_pending_dates": sorted(self.pln_pending_dates),
        }
        return values


@dataclass
class Statement:
    """The month's statement: one line per client, and per client, user and model."""

    month: str
    source: str
    timezone: str
    open_dates: list[str]
    clients: list[StatementLine]
    detail: list[StatementLine]
    #: when the month's statement was issued (None: the month is open)
    closed_at: str | None = None
    #: closed: the corrections of its dates since; open: the corrections billed on it
    adjustments: list[AdjustmentRow] = field(default_factory=list)

    @property
    def final(self) -> bool:
        return not self.open_dates

    def grand_total(self) -> StatementLine:
        total = StatementLine("all clients")
        for line in self.clients:
            total.merge(line)
        return total


def build_statement(
    rows: Sequence[ReportRow],
    month: date,
    source: str,
    timezone: str,
    today: date,
    unrolled: Sequence[str] = (),
) -> Statement:
    """Sum ``rows`` per client and per (client, user, model) and work out the open dates.

    ``open_dates``: the days of ``month`` from ``today`` on (not over yet), days with
    provisional rows, and ``unrolled`` (recorded but not rolled up: older DBs only).
    """
    clients: dict[str, StatementLine] = {}
    detail: dict[tuple[str, str, str], StatementLine] = {}
    for row in rows:
        clients.setdefault(row.client_org_id, StatementLine(row.client_org_id)).add(row)
        key = (row.client_org_id, row.user_id, row.model)
        detail.setdefault(key, StatementLine(*key)).add(row)
    start, end = (date.fromisoformat(bound) for bound in month_bounds(month))
    open_dates = {
        (start + timedelta(days=offset)).isoformat()
        for offset in range((end - start).days)
        if start + timedelta(days=offset) >= today
    }
    open_dates |= {row.usage_date for row in rows if not row.final}
    open_dates |= set(unrolled)
    return Statement(
        month=month.strftime("%Y-%m"),
        source=source,
        timezone=timezone,
        open_dates=sorted(open_dates),
        clients=[clients[name] for name in sorted(clients)],
        detail=[detail[key] for key in sorted(detail)],
    )


def as_issued(statement: Statement, issued: Sequence[IssuedRow]) -> None:
    """A closed month's client lines become its ``statements`` rows, as issued: totals
    only (rates and dates are on the detail lines, which show the rows as they are now)."""
    lines = []
    for row in issued:
        pln = row.usage.markup_cost_pln_nano
        line = StatementLine(
            row.client_org_id, **row.usage._replace(markup_cost_pln_nano=pln or 0)._asdict()
        )
        if pln is None:  # not issued so (a month waits for its rates)
            line.pln_pending_dates.add(f"{statement.month}-01")
        lines.append(line)
    statement.clients = lines


def adjustment_values(adjustment: AdjustmentRow, month: str, detail: bool) -> dict[str, Any]:
    """An adjustment as a report line: the deltas in the statement's columns, money as
    exact strings (negative when usage went down)."""
    values: dict[str, Any] = {"usage_month": month, "client_org_id": adjustment.client_org_id}
    if detail:
        values |= {"user_id": None, "model": None}
    deltas = adjustment.usage
    pln = deltas.markup_cost_pln_nano
    values |= {
        "requests": deltas.requests,
        "estimated_requests": deltas.estimated_requests,
        "input_tokens": deltas.input_tokens,
        "output_tokens": deltas.output_tokens,
        "total_tokens": deltas.total_tokens,
        "raw_cost_usd": nano_text(deltas.raw_cost_nano),
        "markup_cost_usd": nano_text(deltas.markup_cost_nano),
        "markup_cost_pln": None if pln is None else nano_text(pln),
        "usd_pln_rate": None,
        "nbp_table_no": None,
        "final": 1,
        "provisional_dates": [],
        "pln_pending_dates": [],
        "line": "adjustment",
        "adjustment_id": adjustment.id,
        "usage_date": adjustment.usage_date,
        "reason": adjustment.reason,
        "statement_month": adjustment.statement_month,
        "recorded_at": adjustment.created_at,
    }
    return values


def _statement_line(values: dict[str, Any]) -> dict[str, Any]:
    return values | dict.fromkeys(_LINE_COLUMNS[1:]) | {"line": "statement"}


def _lines(statement: Statement, detail: bool) -> list[dict[str, Any]]:
    chosen = statement.detail if detail else statement.clients
    month, final = statement.month, statement.final
    lines = [_statement_line(line.values(month, detail, final)) for line in chosen]
    lines += [adjustment_values(a, statement.month, detail) for a in statement.adjustments]
    return lines


def render_csv(statement: Statement, detail: bool) -> str:
    """RFC 4180 CSV (comma, CRLF, quoting when needed, UTF-8): a spreadsheet imports it as
    is. Only lines of the chosen level and the adjustments (``line`` says which), no total
    rows, so a column sum is the total to bill. Lists (dates, several rates) are
    space-separated inside their cell; empty = none."""
    columns = [
        *_KEY_COLUMNS,
        *(_DETAIL_COLUMNS if detail else ()),
        *_VALUE_COLUMNS,
        *_LINE_COLUMNS,
    ]
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(columns)
    for values in _lines(statement, detail):
        writer.writerow(_cell(values[column]) for column in columns)
    return buffer.getvalue()


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(str(item) for item in value)
    return str(value)


def render_json(statement: Statement, detail: bool) -> bytes:
    """One object: the month's flags, ``clients`` (and ``detail``), amounts as strings."""

    def with_rates(line: StatementLine, level_detail: bool) -> dict[str, Any]:
        values = line.values(statement.month, level_detail, statement.final)
        values["rates"] = [use.as_dict() for use in line.ordered_rates()]
        return values

    document: dict[str, Any] = {
        "usage_month": statement.month,
        "source": statement.source,
        "business_timezone": statement.timezone,
        "final": int(statement.final),
        "open_dates": statement.open_dates,
        "closed_at": statement.closed_at,
        "clients": [with_rates(line, False) for line in statement.clients],
    }
    if detail:
        document["detail"] = [with_rates(line, True) for line in statement.detail]
    document["adjustments"] = [
        {
            key: value
            for key, value in adjustment_values(adjustment, statement.month, False).items()
            if key not in _NOT_IN_JSON_ADJUSTMENTS
        }
        for adjustment in statement.adjustments
    ]
    return orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"


def _console(out: Any) -> Any:
    """A console on ``out``: the terminal's width, else ``COLUMNS`` or 250 (a file)."""
    from rich.console import Console

    width = None
    if not out.isatty():
        try:
            width = int(os.environ.get("COLUMNS") or 250)
        except ValueError:
            width = 250
    return Console(file=out, width=width, highlight=False)


def _print_rows(
    console: Any,
    title: str,
    columns: Sequence[tuple[str, str]],
    rows: Sequence[tuple[Sequence[str], bool]],
) -> None:
    """``rows`` (cells, is a total) as one table when it fits the width; otherwise one
    name/value block per row. Never truncated: an amount cut to ``1.46…`` is no bill."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for cells, total in rows:
        table.add_row(*cells, style="bold" if total else None, end_section=total)
    natural = console.measure(table, options=console.options.update(max_width=100_000))
    if natural.maximum <= console.width:
        console.print(table)
        return
    console.print(f"{title} (a block per line: the table is wider than {console.width} columns)")
    for cells, total in rows:
        block = Table(show_header=False, box=box.SIMPLE, style="bold" if total else "")
        block.add_column(overflow="fold")
        block.add_column(overflow="fold")
        for (name, _), value in zip(columns, cells, strict=True):
            if value:
                block.add_row(name, value)
        console.print(block)


def render_table(statement: Statement, detail: bool, stream: Any = None) -> None:
    """A rich table with a total row per client (and over all clients), the rates used,
    and notes naming every date whose amounts are not final."""
    console = _console(stream or sys.stdout)
    state = "final" if statement.final else "NOT FINAL"
    if statement.closed_at:
        state = f"closed {statement.closed_at}, as issued"
    columns = [("client_org_id", "left")]
    if detail:
        columns += [("user_id", "left"), ("model", "left")]
    columns += [(name, "right") for name in _VALUE_COLUMNS[:9]]
    columns.append(("flags", "left"))

    def cells(line: StatementLine, label: Sequence[str]) -> list[str]:
        values = line.values(statement.month, False, statement.final)
        flags = []
        if line.provisional_dates:
            flags.append(f"provisional: {date_ranges(line.provisional_dates)}")
        if line.pln_pending_dates:
            flags.append(f"PLN pending: {date_ranges(line.pln_pending_dates)}")
        return [
            *label,
            *(_cell(values[name]) for name in _VALUE_COLUMNS[:7]),
            _cell(values["markup_cost_pln"]) or "pending",
            _cell(values["usd_pln_rate"]),
            "; ".join(flags),
        ]

    rows: list[tuple[Sequence[str], bool]] = []
    for client in statement.clients:
        if detail:
            for line in statement.detail:
                if line.client_org_id == client.client_org_id:
                    label = (line.client_org_id, line.user_id or "", line.model or "")
                    rows.append((cells(line, label), False))
            rows.append((cells(client, (client.client_org_id, "total", "")), True))
        else:
            rows.append((cells(client, (client.client_org_id,)), True))
    if len(statement.clients) > 1:
        blank = ("", "") if detail else ()
        rows.append((cells(statement.grand_total(), ("all clients", *blank)), True))
    _print_rows(
        console,
        f"usage statement {statement.month} ({state}; from {statement.source}, "
        f"usage dates in {statement.timezone})",
        columns,
        rows,
    )

    rates = [
        (
            [
                client.client_org_id,
                use.usd_pln_rate,
                converted["nbp_table_no"],
                date_ranges(use.usage_dates),
                converted["markup_cost_usd"],
                converted["markup_cost_pln"],
            ],
            False,
        )
        for client in statement.clients
        for use in client.ordered_rates()
        if (converted := use.as_dict())
    ]
    if rates:
        _print_rows(
            console,
            "USD/PLN rates used (NBP table A mid)",
            [
                ("client_org_id", "left"),
                ("usd_pln_rate", "left"),
                ("nbp_table_no", "left"),
                ("usage dates", "left"),
                ("markup_cost_usd", "right"),
                ("markup_cost_pln", "right"),
            ],
            rates,
        )
    if statement.adjustments:
        _print_rows(
            console,
            "adjustments: corrections of a closed month "
            + (
                f"recorded after {statement.month} closed (billed on statement_month)"
                if statement.closed_at
                else f"billed on {statement.month}"
            ),
            [
                ("id", "right"),
                ("client_org_id", "left"),
                ("usage_date", "left"),
                ("reason", "left"),
                ("statement_month", "left"),
                ("recorded_at", "left"),
                *((name, "right") for name in _VALUE_COLUMNS[:8]),
            ],
            [
                (
                    [
                        str(values["adjustment_id"]),
                        values["client_org_id"],
                        values["usage_date"],
                        values["reason"],
                        values["statement_month"],
                        values["recorded_at"],
                        *(_cell(values[name]) for name in _VALUE_COLUMNS[:7]),
                        _cell(values["markup_cost_pln"]) or "pending",
                    ],
                    False,
                )
                for values in (
                    adjustment_values(a, statement.month, False) for a in statement.adjustments
                )
            ],
        )
    if statement.open_dates:
        console.print(
            f"not final: {date_ranges(statement.open_dates)} not closed yet"
            + (
                " (provisional rows included and flagged)"
                if statement.source == "usage_daily_live"
                else " (no closed data for these days yet: they are not included)"
            )
        )
    for client in statement.clients:
        if client.pln_pending_dates:
            console.print(
                f"PLN pending for {client.client_org_id}: no NBP rate yet for "
                f"{date_ranges(client.pln_pending_dates)}, so markup_cost_pln is left empty"
            )


def parse_month(text: str) -> date:
    match = _MONTH.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"bad --month {text!r}: expected YYYY-MM, e.g. 2026-11")
    return date(int(match.group(1)), int(match.group(2)), 1)


#: ``report``'s options in Faust's CLI
OPTIONS = (
    option("--month", required=True, help="the month to state, YYYY-MM"),
    option("--client", default=None, help="only this client_org_id"),
    option("--detail", is_flag=True, default=False, help="also per user_id and model"),
    option(
        "--format",
        "output_format",
        type=click.Choice(["table", "csv", "json"]),
        default="table",
        help="table (terminal), csv (spreadsheet) or json",
    ),
)


async def report(
    self: object, month: str, client: str | None, detail: bool, output_format: str
) -> None:
    """Monthly statement per client, in exact amounts.

    Per user and model too with --detail. Exit 0 with a statement, 1 when there is no
    usage for the month/client, 2 on a bad --month or an unreadable summary DB.

    \b
    Example:
      usage-stream report --month 2026-11
      usage-stream report --month 2026-11 --client acme --detail --format csv > acme.csv
    """
    try:
        first = parse_month(month)
    except ValueError as error:
        fail(str(error), 2)
    path = settings.summary_db_path
    try:
        conn = open_readonly(path)
    except ReportSourceError as error:
        fail(str(error), 2)
    try:
        source = usage_source(conn)
        rows = month_rows(conn, source, first, client)
        unrolled = unrolled_dates(conn, first) if source == "usage_daily" else []
        previous = last_usage_month(conn, source, client) if client and not rows else None
        closed = closed_at(conn, first)
        issued = issued_rows(conn, first, client) if closed else []
        adjustments = adjustment_rows(conn, first, client, closed=closed is not None)
    except (ReportSourceError, sqlite3.Error) as error:
        fail(f"summary DB {path}: {error}", 2)
    finally:
        conn.close()
    label = first.strftime("%Y-%m")
    if not rows and not issued and not adjustments:
        if client is None:
            fail(f"no usage in {label} in {path}")
        elif previous is None:
            fail(f"unknown client {client!r}: no usage recorded for it in {path}")
        else:
            fail(f"no usage for client {client!r} in {label} (its latest usage: {previous})")
    today = datetime.now(settings.tz).date()
    statement = build_statement(rows, first, source, settings.BUSINESS_TIMEZONE, today, unrolled)
    statement.adjustments = adjustments
    if closed is not None:
        statement.closed_at = closed
        as_issued(statement, issued)
    if output_format == "csv":
        sys.stdout.buffer.write(render_csv(statement, detail).encode("utf-8"))
    elif output_format == "json":
        sys.stdout.buffer.write(render_json(statement, detail))
    else:
        render_table(statement, detail)
    sys.stdout.flush()
