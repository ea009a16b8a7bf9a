"""Budgets per client and their threshold alerts in the summary DB (docs/contract.md §3).

``client_budgets``: a monthly limit in marked-up USD (``monthly_limit_nano``), the
thresholds in percent (``50,80,100``), an optional webhook (NULL: ``BUDGET_WEBHOOK_URL``).
``budget_alerts``: one row per client, business-time month and threshold that fired (the
primary key is what makes "at most once" hold across restarts and races), with its
delivery state. Removing a budget drops its client's undelivered alerts: they stay on
record with ``dropped_at`` set and ``last_error`` :data:`DROPPED`, and are never sent; the
delivered ones stay as they are.

This module is the SQL and the validation; the watch that fires thresholds is
tables/summary_db/budget_watch.py and the webhook delivery agents/budgets.py. Plain ``sqlite3``: the
command line and the watch's own thread use it.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from streams.model.money import to_nano
from tables.summary_db.schema import utc_now_text

__all__ = [
    "DEFAULT_THRESHOLDS",
    "DROPPED",
    "MAX_LIMIT_USD",
    "AlertRow",
    "Budget",
    "BudgetRefused",
    "Fired",
    "alerts_of_month",
    "list_budgets",
    "mark_attempt",
    "parse_limit",
    "parse_thresholds",
    "remove_budget",
    "set_budget",
    "thresholds_text",
    "undelivered_alerts",
]

DEFAULT_THRESHOLDS = (50, 80, 100)
#: A month's limit in USD: its nano-units and percentages of them stay inside int64.
MAX_LIMIT_USD = Decimal(1_000_000_000)
MAX_THRESHOLD_PCT = 1000
MAX_THRESHOLDS = 20
_INTEGER = re.compile(r"\d{1,4}")
#: ``last_error`` of an alert dropped by ``budget rm`` before it was delivered.
DROPPED = "dropped: budget removed before delivery"


class BudgetRefused(ValueError):
    """Bad budget input; ``str()`` is the one-line reason."""


@dataclass(frozen=True, slots=True)
class Budget:
    client_org_id: str
    monthly_limit_nano: int
    thresholds: tuple[int, ...]
    webhook_url: str | None
    created_at: str = ""
    updated_at: str = ""


@dataclass(frozen=True, slots=True)
class Fired:
    """A threshold crossed: what ``budget_alerts`` records when it fires (budget_watch.py).
    :class:`AlertRow` extends it, so that the alert fired and the alert read back for
    delivery cannot drift apart."""

    client_org_id: str
    usage_month: str
    threshold_pct: int
    spent_nano: int
    limit_nano: int
    fired_at: str


@dataclass(frozen=True, slots=True)
class AlertRow(Fired):
    """A ``budget_alerts`` row, and where it goes now (the budget's webhook, if any)."""

    delivered: bool
    attempts: int
    last_error: str | None
    webhook_url: str | None  # the budget's own; None: BUDGET_WEBHOOK_URL

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.client_org_id, self.usage_month, self.threshold_pct)


def parse_limit(text: str) -> int:
    """``--monthly-usd``: a decimal > 0, at most 9 decimals (exact in nano-USD) and at
    most :data:`MAX_LIMIT_USD`; the limit in nano-USD."""
    try:
        amount = Decimal(text.strip())
    except InvalidOperation:
        raise BudgetRefused(f"--monthly-usd must be a decimal amount, got {text[:40]!r}") from None
    if not amount.is_finite() or not 0 < amount <= MAX_LIMIT_USD:
        raise BudgetRefused(
            f"--monthly-usd must be more than 0 and at most {MAX_LIMIT_USD}, got {text[:40]!r}"
        )
    nano = to_nano(amount)
    if Decimal(nano) != amount * 1_000_000_000:
        raise BudgetRefused(f"--monthly-usd has more than 9 decimals: {text[:40]!r}")
    return nano


def parse_thresholds(text: str) -> tuple[int, ...]:
    """``--alert-at``: comma-separated whole percentages 1-1000, each once."""
    parts = [part.strip() for part in text.split(",")]
    if not parts or not all(_INTEGER.fullmatch(part) for part in parts):
        raise BudgetRefused(
            f"--alert-at must be whole percentages separated by commas (50,80,100),"
            f" got {text[:60]!r}"
        )
    values = [int(part) for part in parts]
    if not all(1 <= value <= MAX_THRESHOLD_PCT for value in values):
        raise BudgetRefused(f"--alert-at percentages must be 1-{MAX_THRESHOLD_PCT}")
    if len(set(values)) != len(values):
        raise BudgetRefused("--alert-at lists a percentage twice")
    if len(values) > MAX_THRESHOLDS:
        raise BudgetRefused(f"--alert-at lists more than {MAX_THRESHOLDS} percentages")
    return tuple(sorted(values))


def thresholds_text(thresholds: Sequence[int]) -> str:
    return ",".join(str(value) for value in thresholds)


# A row as its SELECT lists the columns (sqlite3 types rows as Any).
_BudgetRow = tuple[str, int, str, str | None, str, str]
_AlertRowValues = tuple[str, str, int, int, int, str, int, int, str | None, str | None]


def _budget(row: _BudgetRow) -> Budget:
    return Budget(
        str(row[0]),
        int(row[1]),
        tuple(int(part) for part in str(row[2]).split(",")),
        row[3],
        str(row[4]),
        str(row[5]),
    )


_BUDGET_COLUMNS = (
    "client_org_id, monthly_limit_nano, thresholds, webhook_url, created_at, updated_at"
)


def list_budgets(conn: sqlite3.Connection) -> list[Budget]:
    rows = conn.execute(f"SELECT {_BUDGET_COLUMNS} FROM client_budgets ORDER BY client_org_id")
    return [_budget(row) for row in rows.fetchall()]


def set_budget(conn: sqlite3.Connection, budget: Budget) -> tuple[Budget, bool]:
    """Insert or replace a client's budget (keeping when it was first set); returns the
    stored budget and whether it is new. Thresholds already fired this month stay fired:
    each fires at most once per client and month (docs/contract.md §3)."""
    now = utc_now_text()
    conn.execute("BEGIN IMMEDIATE")
    try:
        existed = conn.execute(
            "SELECT 1 FROM client_budgets WHERE client_org_id = ?", (budget.client_org_id,)
        ).fetchone()
        conn.execute(
            "INSERT INTO client_budgets VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (client_org_id) DO UPDATE SET"
            " monthly_limit_nano = excluded.monthly_limit_nano,"
            " thresholds = excluded.thresholds, webhook_url = excluded.webhook_url,"
            " updated_at = excluded.updated_at",
            (
                budget.client_org_id,
                budget.monthly_limit_nano,
                thresholds_text(budget.thresholds),
                budget.webhook_url,
                now,
                now,
            ),
        )
        stored = conn.execute(
            f"SELECT {_BUDGET_COLUMNS} FROM client_budgets WHERE client_org_id = ?",
            (budget.client_org_id,),
        ).fetchone()
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return _budget(stored), existed is None


def remove_budget(conn: sqlite3.Connection, client_org_id: str) -> tuple[bool, int]:
    """Delete a client's budget and drop its undelivered alerts, in one transaction:
    (removed, alerts dropped); (False, 0) and nothing changed when it has none.

    Its alerts stay in ``budget_alerts`` (the record of what was sent): the delivered ones
    as they are, the undelivered ones with ``dropped_at`` and ``last_error`` =
    :data:`DROPPED`, so the delivery never sends them (to ``BUDGET_WEBHOOK_URL`` or
    anywhere) and they no longer count as undelivered. A budget set again later does not
    revive them: each threshold fires at most once per month."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        cursor = conn.execute(
            "DELETE FROM client_budgets WHERE client_org_id = ?", (client_org_id,)
        )
        removed = cursor.rowcount > 0
        dropped = 0
        if removed:
            dropped = conn.execute(
                "UPDATE budget_alerts SET dropped_at = ?, last_error = ?"
                " WHERE client_org_id = ? AND delivered = 0 AND dropped_at IS NULL",
                (utc_now_text(), DROPPED, client_org_id),
            ).rowcount
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return removed, dropped


_ALERT_SELECT = """
SELECT a.client_org_id, a.usage_month, a.threshold_pct, a.spent_nano, a.limit_nano,
       a.fired_at, a.delivered, a.attempts, a.last_error, b.webhook_url
FROM budget_alerts a LEFT JOIN client_budgets b USING (client_org_id)
"""


def _alert(row: _AlertRowValues) -> AlertRow:
    return AlertRow(
        str(row[0]),
        str(row[1]),
        int(row[2]),
        int(row[3]),
        int(row[4]),
        str(row[5]),
        bool(row[6]),
        int(row[7]),
        row[8],
        row[9],
    )


def undelivered_alerts(conn: sqlite3.Connection) -> list[AlertRow]:
    """Alerts to deliver (not delivered, not dropped by ``budget rm``), oldest first."""
    rows = conn.execute(
        _ALERT_SELECT + " WHERE a.delivered = 0 AND a.dropped_at IS NULL"
        " ORDER BY a.fired_at, a.client_org_id, a.threshold_pct"
    )
    return [_alert(row) for row in rows.fetchall()]


def alerts_of_month(conn: sqlite3.Connection, usage_month: str) -> list[AlertRow]:
    rows = conn.execute(
        _ALERT_SELECT + " WHERE a.usage_month = ? ORDER BY a.client_org_id, a.threshold_pct",
        (usage_month,),
    )
    return [_alert(row) for row in rows.fetchall()]


def mark_attempt(conn: sqlite3.Connection, key: tuple[str, str, int], error: str | None) -> None:
    """Record one delivery attempt: delivered when ``error`` is None. A failed attempt
    that was under way when ``budget rm`` dropped the alert leaves it as dropped."""
    conn.execute(
        "UPDATE budget_alerts SET attempts = attempts + 1, last_error = ?,"
        " delivered = ?, delivered_at = ?"
        " WHERE client_org_id = ? AND usage_month = ? AND threshold_pct = ?"
        " AND (dropped_at IS NULL OR ?)",
        (
            error,
            int(error is None),
            utc_now_text() if error is None else None,
            *key,
            int(error is None),
        ),
    )
