"""``usage-stream budget set|list|rm``: monthly budgets per client (docs/contract.md §4).

``budget set ORG --monthly-usd AMOUNT [--alert-at 50,80,100] [--webhook URL]`` sets (or
replaces) a client's budget in marked-up USD per business-time month; the summary writer
fires each threshold once per month (agents/budgets.py) and POSTs it to the webhook
(else ``BUDGET_WEBHOOK_URL``). ``budget list`` shows every budget with this month's live
spend and the alerts fired this month; ``budget rm ORG`` removes one (its fired alerts
stay on record; the undelivered ones are dropped, never sent). Webhook URLs are shown
as ``scheme://host/…``: their path may be a token.

Runs without the Faust app (agents/main.py); bad input is one line on stderr, exit 2, and
changes nothing; an unknown client for ``rm`` or an unusable DB exit 1.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, TypedDict

import click

from agents.commands.group import OneLineGroup, format_option, print_json, print_table
from streams.cli import fail
from streams.model.money import nano_text
from streams.settings import Settings, get_settings, webhook_url_problem

if TYPE_CHECKING:
    from tables.summary_db.budgets import AlertRow

__all__ = ["standalone"]


class _AlertJSON(TypedDict):
    threshold_pct: int
    fired_at: str
    delivered: bool
    attempts: int
    last_error: str | None


class _BudgetJSON(TypedDict):
    """A budget as ``budget list --format json`` shows it."""

    client_org_id: str
    monthly_limit_usd: str
    thresholds: list[int]
    webhook: str
    usage_month: str
    spent_usd: str
    used_pct: str
    alerts: list[_AlertJSON]


MAX_CLIENT_CHARS = 128  # docs/contract.md §1


def _client(value: str) -> str:
    if not 1 <= len(value) <= MAX_CLIENT_CHARS:
        fail(f"ORG (client_org_id) must be 1-{MAX_CLIENT_CHARS} characters", 2)
    return value


def _redacted(url: str | None) -> str:
    from urllib.parse import urlsplit

    if url is None:
        return "BUDGET_WEBHOOK_URL"
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}/…"


def _db_error(settings: Settings, error: BaseException) -> None:
    path = settings.summary_db_path
    fail(f"summary DB {path}: {' '.join(str(error).split())}")


HELP = """Monthly budgets per client, with alerts.

A webhook is called once per client and month as the marked-up spend crosses each
alert threshold.

\b
Example:
  usage-stream budget set acme --monthly-usd 500 --alert-at 50,80,100
  usage-stream budget list
"""


@click.group(name="budget", cls=OneLineGroup, help=HELP)
def standalone() -> None:
    pass


@standalone.command(name="set")
@click.argument("org")
@click.option("--monthly-usd", "monthly_usd", required=True, help="limit, marked-up USD")
@click.option("--alert-at", "alert_at", default="50,80,100", show_default=True, help="percent")
@click.option("--webhook", default=None, help="http(s) URL (default: BUDGET_WEBHOOK_URL)")
def set_budget_command(org: str, monthly_usd: str, alert_at: str, webhook: str | None) -> None:
    """Set (or replace) a client's monthly budget.

    \b
    Example:
      usage-stream budget set acme --monthly-usd 500 --alert-at 80,100 \\
          --webhook https://hooks.example.com/budget
    """
    from tables.summary_db.budgets import (
        Budget,
        BudgetRefused,
        parse_limit,
        parse_thresholds,
        set_budget,
    )
    from tables.summary_db.command_db import CommandDbError, open_read_write

    client = _client(org)
    try:
        limit = parse_limit(monthly_usd)
        thresholds = parse_thresholds(alert_at)
    except BudgetRefused as error:
        fail(str(error), 2)
    if webhook is not None and (problem := webhook_url_problem(webhook)):
        fail(f"--webhook {problem}", 2)
    settings = get_settings()
    try:
        conn = open_read_write(settings.summary_db_path)
    except CommandDbError as error:
        fail(str(error))
    try:
        stored, new = set_budget(conn, Budget(client, limit, thresholds, webhook))
    except Exception as error:  # sqlite3.Error, OSError: one line, no traceback
        _db_error(settings, error)
    finally:
        conn.close()
    print(
        f"budget {'set' if new else 'replaced'} for {stored.client_org_id}:"
        f" {nano_text(stored.monthly_limit_nano)} USD a month (marked up), alerts at"
        f" {','.join(str(p) for p in stored.thresholds)} % to {_redacted(stored.webhook_url)}"
    )


@standalone.command(name="rm")
@click.argument("org")
def remove_budget_command(org: str) -> None:
    """Remove a client's budget (its fired alerts stay on record; undelivered ones are
    dropped, never sent).

    \b
    Example:
      usage-stream budget rm acme
    """
    from tables.summary_db.budgets import remove_budget
    from tables.summary_db.command_db import CommandDbError, has_table, open_read_write

    client = _client(org)
    settings = get_settings()
    if not settings.summary_db_path.is_file():
        fail(f"no budget for {client!r}: summary DB {settings.summary_db_path} does not exist")
    try:
        conn = open_read_write(settings.summary_db_path)
    except CommandDbError as error:
        fail(str(error))
    try:
        removed, dropped = (
            remove_budget(conn, client) if has_table(conn, "client_budgets") else (False, 0)
        )
    except Exception as error:  # sqlite3.Error: one line, no traceback
        _db_error(settings, error)
    finally:
        conn.close()
    if not removed:
        fail(f"no budget for {client!r}: nothing removed")
    dropped_note = f" ({dropped} undelivered alert{'s' if dropped != 1 else ''} dropped)"
    print(f"budget removed for {client}{dropped_note if dropped else ''}")


@standalone.command(name="list")
@format_option
def list_budgets_command(output_format: str) -> None:
    """List the budgets with this month's live spend and the alerts fired.

    \b
    Example:
      usage-stream budget list --format json
    """
    from tables.summary_db.budgets import alerts_of_month, list_budgets
    from tables.summary_db.command_db import CommandDbError, has_table, open_read_only
    from tables.summary_db.statements import next_month

    settings = get_settings()
    month = datetime.now(settings.tz).strftime("%Y-%m")
    try:
        conn = open_read_only(settings.summary_db_path)
    except CommandDbError as error:
        fail(str(error))
    try:
        if has_table(conn, "client_budgets"):
            budgets = list_budgets(conn)
            alerts = alerts_of_month(conn, month)
            spent = {
                budget.client_org_id: conn.execute(
                    "SELECT SUM(markup_cost_nano) FROM usage_daily_live WHERE client_org_id = ?"
                    " AND usage_date >= ? AND usage_date < ?",
                    (budget.client_org_id, f"{month}-01", f"{next_month(month)}-01"),
                ).fetchone()[0]
                for budget in budgets
            }
        else:
            budgets, alerts, spent = [], [], {}
    except Exception as error:  # sqlite3.Error: one line, no traceback
        _db_error(settings, error)
    finally:
        conn.close()
    fired: dict[str, list[AlertRow]] = {}
    for alert in alerts:
        fired.setdefault(alert.client_org_id, []).append(alert)
    rows: list[_BudgetJSON] = []
    for budget in budgets:
        used = int(spent.get(budget.client_org_id) or 0)
        rows.append(
            {
                "client_org_id": budget.client_org_id,
                "monthly_limit_usd": nano_text(budget.monthly_limit_nano),
                "thresholds": list(budget.thresholds),
                "webhook": _redacted(budget.webhook_url),
                "usage_month": month,
                "spent_usd": nano_text(used),
                "used_pct": f"{used * 100 / budget.monthly_limit_nano:.1f}",
                "alerts": [
                    {
                        "threshold_pct": alert.threshold_pct,
                        "fired_at": alert.fired_at,
                        "delivered": alert.delivered,
                        "attempts": alert.attempts,
                        "last_error": alert.last_error,
                    }
                    for alert in fired.get(budget.client_org_id, [])
                ],
            }
        )
    if output_format == "json":
        print_json({"usage_month": month, "budgets": rows})
        return
    print_table(
        f"budgets, {month} ({settings.BUSINESS_TIMEZONE}; spend = marked-up USD, open days"
        " included)",
        ["client_org_id", "monthly_limit_usd", "spent_usd", "used %", "alert at %", "fired"]
        + ["webhook"],
        [
            [
                row["client_org_id"],
                row["monthly_limit_usd"],
                row["spent_usd"],
                row["used_pct"],
                ",".join(str(p) for p in row["thresholds"]),
                " ".join(
                    f"{a['threshold_pct']}%" + ("" if a["delivered"] else " (pending)")
                    for a in row["alerts"]
                )
                or "-",
                row["webhook"],
            ]
            for row in rows
        ],
    )
