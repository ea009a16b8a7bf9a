"""``usage-stream markup set|list``: the price book (tables/summary_db/pricebook.py,
docs/contract.md §4).

``markup set [--client ORG] [--model MODEL] --multiplier X --from YYYY-MM-DD [--note TEXT]``
adds a rule: from that usage date on, that client's (every client's) usage of that model
(every model) is marked up by X. Rules apply forward only: a date before the oldest date
still open is refused with one line and nothing changes. ``markup list`` shows every rule
with what it covers today (``in force``, ``superseded``, ``future``) and the default
multiplier (``USAGE_MARKUP_MULTIPLIER``).

Runs without the Faust app (agents/main.py); bad input is one line on stderr, exit 2;
a refused rule or an unusable DB exit 1.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING

import click

from agents.commands.group import OneLineGroup, format_option, print_json, print_table
from streams.cli import fail
from streams.settings import get_settings

if TYPE_CHECKING:
    from tables.summary_db.pricebook import MarkupRule

__all__ = ["rule_status", "standalone"]

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
MAX_CLIENT_CHARS = 128  # docs/contract.md §1
MAX_MODEL_CHARS = 256  # the event validator's bound (streams/model/event.py)
MAX_NOTE_CHARS = 1000


def _text(value: str | None, option: str, longest: int) -> str | None:
    if value is None:
        return None
    if not 1 <= len(value) <= longest:
        fail(f"{option} must be 1-{longest} characters", 2)
    return value


def _date(text: str) -> date:
    try:
        if not _DATE.fullmatch(text):
            raise ValueError
        return date.fromisoformat(text)
    except ValueError:
        fail(f"--from must be a date YYYY-MM-DD, got {text[:40]!r}", 2)
        raise  # unreachable: fail() exits


HELP = """The price book: markup rules per client/model.

A rule applies from a usage date on (forward only); the most specific rule in force
prices a row, else USAGE_MARKUP_MULTIPLIER.

\b
Example:
  usage-stream markup set --client acme --multiplier 1.2 --from 2026-12-01
  usage-stream markup list
"""


@click.group(name="markup", cls=OneLineGroup, help=HELP)
def standalone() -> None:
    pass


@standalone.command(name="set")
@click.option("--client", "client", default=None, help="client_org_id (default: every client)")
@click.option("--model", "model", default=None, help="model (default: every model)")
@click.option("--multiplier", required=True, help="the markup multiplier, a decimal > 0")
@click.option("--from", "effective_from", required=True, help="first usage date, YYYY-MM-DD")
@click.option("--note", default=None, help="why (shown by markup list)")
def set_rule(
    client: str | None, model: str | None, multiplier: str, effective_from: str, note: str | None
) -> None:
    """Add a markup rule, from a usage date on (forward only).

    \b
    Example:
      usage-stream markup set --client acme --model openai/gpt-4o-mini \\
          --multiplier 1.15 --from 2026-12-01 --note "volume discount"
    """
    from tables.summary_db.command_db import CommandDbError, open_read_write
    from tables.summary_db.pricebook import RuleRefused, add_rule, parse_multiplier

    client = _text(client, "--client", MAX_CLIENT_CHARS)
    model = _text(model, "--model", MAX_MODEL_CHARS)
    note = _text(note, "--note", MAX_NOTE_CHARS)
    first = _date(effective_from)
    try:
        factor = parse_multiplier(multiplier)
    except RuleRefused as error:
        fail(str(error), 2)
    settings = get_settings()
    try:
        conn = open_read_write(settings.summary_db_path)
    except CommandDbError as error:
        fail(str(error))
    try:
        rule = add_rule(
            conn,
            client_org_id=client,
            model=model,
            multiplier=factor,
            effective_from=first,
            note=note,
            tz=settings.tz,
            grace_seconds=settings.WINDOW_GRACE_SECONDS,
        )
    except RuleRefused as error:
        fail(str(error))
    except Exception as error:  # sqlite3.Error, OSError: one line, no traceback
        fail(f"summary DB {settings.summary_db_path}: {' '.join(str(error).split())}")
    finally:
        conn.close()
    print(
        f"markup rule {rule.id}: {_who(rule.client_org_id, rule.model)} x{rule.multiplier}"
        f" from {rule.effective_from}"
    )


def _who(client: str | None, model: str | None) -> str:
    return f"client {client or '*'}, model {model or '*'}"


def rule_status(rules: list[MarkupRule], today: str) -> dict[int, str]:
    """Per rule id: ``future`` (not in force yet), ``superseded`` (a later rule of the
    same client and model scope is in force) or ``in force``."""
    latest: dict[tuple[str | None, str | None], int] = {}
    for rule in rules:  # oldest first, the later-added first among one date
        if rule.effective_from <= today:
            latest[(rule.client_org_id, rule.model)] = rule.id
    status = {}
    for rule in rules:
        if rule.effective_from > today:
            status[rule.id] = "future"
        elif latest[(rule.client_org_id, rule.model)] == rule.id:
            status[rule.id] = "in force"
        else:
            status[rule.id] = "superseded"
    return status


@standalone.command(name="list")
@format_option
def list_rules_command(output_format: str) -> None:
    """List the markup rules, oldest first, and the default multiplier.

    \b
    Example:
      usage-stream markup list --format json
    """
    from tables.summary_db.command_db import CommandDbError, has_table, open_read_only
    from tables.summary_db.pricebook import list_rules, multiplier_text

    settings = get_settings()
    try:
        conn = open_read_only(settings.summary_db_path)
        rules = list_rules(conn) if has_table(conn, "markup_rules") else []
        conn.close()
    except CommandDbError as error:
        fail(str(error))
    except Exception as error:  # sqlite3.Error: one line, no traceback
        fail(f"summary DB {settings.summary_db_path}: {' '.join(str(error).split())}")
    today = datetime.now(settings.tz).date().isoformat()
    status = rule_status(rules, today)
    default = multiplier_text(Decimal(settings.USAGE_MARKUP_MULTIPLIER))
    if output_format == "json":
        print_json(
            {
                "default_multiplier": default,
                "today": today,
                "rules": [
                    {
                        "id": rule.id,
                        "client_org_id": rule.client_org_id,
                        "model": rule.model,
                        "multiplier": multiplier_text(rule.multiplier),
                        "effective_from": rule.effective_from,
                        "created_at": rule.created_at,
                        "note": rule.note,
                        "status": status[rule.id],
                    }
                    for rule in rules
                ],
            }
        )
        return
    print_table(
        f"markup rules (default USAGE_MARKUP_MULTIPLIER {default}; today {today},"
        f" {settings.BUSINESS_TIMEZONE})",
        ["id", "effective_from", "client_org_id", "model", "multiplier", "status", "note"],
        [
            [
                str(rule.id),
                rule.effective_from,
                rule.client_org_id or "* (every client)",
                rule.model or "* (every model)",
                multiplier_text(rule.multiplier),
                status[rule.id],
                rule.note or "",
            ]
            for rule in rules
        ],
    )
