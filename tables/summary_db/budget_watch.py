"""Which budget thresholds a pass of the summary writer fires (docs/contract.md §3, budgets).

A client's spend in a business-time month is the sum of ``markup_cost_nano`` over its
rows of ``usage_daily_live`` in that month: the closed days (``usage_daily``) and the open
days' provisional rows (``usage_daily_open``), which the rollup refreshes every
``ROLLUP_INTERVAL_SECONDS``. A threshold fires when ``spent × 100 >= limit × pct`` (exact
integers), at most once per client, month and threshold: ``budget_alerts``' primary key,
``INSERT OR IGNORE``, so a restart or a second pass never fires it again.

Each pass (:meth:`BudgetWatch.run`) reads the closed part from ``usage_client_daily``
(``usage_daily`` summed per client and date by triggers: a month of 50k keys a day is 1.5M
rows there, 31 per client here), kept per (date, client) in memory and re-read only for
the dates that changed since the previous pass, which ``batch_runs`` names: every
rollup merge (a day closing, late events) and every replay writes a row there. The open
part is small (the open days) and read whole. All reads of a pass come
from one snapshot; a date that changed after it is re-read at the next pass, so an error
is only ever a spend seen one pass late, never a spend counted twice.

Months watched: the current one, the previous one at start, and any month whose usage
changed (a late event, a replay) or has open rows. A new budget therefore watches the
current month at once (a client already over a threshold fires at the next pass) and an
older month when its usage changes, never the whole history.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tables.summary_db.budgets import Fired, list_budgets
from tables.summary_db.schema import open_sync, utc_now_text
from tables.summary_db.statements import next_month

__all__ = ["BudgetWatch", "Fired", "WatchPass", "previous_month"]


@dataclass(slots=True)
class WatchPass:
    fired: list[Fired] = field(default_factory=list)
    #: the current month's spend / limit per budgeted client
    used: dict[str, float] = field(default_factory=dict)
    undelivered: int = 0


def previous_month(month: str) -> str:
    year, number = int(month[:4]), int(month[5:7])
    return f"{year - (number == 1):04d}-{(number - 2) % 12 + 1:02d}"


_CHANGED_DATES = """
SELECT DISTINCT processing_date FROM batch_runs
WHERE id > ? AND id <= ? AND kind IN ('rollup', 'replay') AND success = 1
  AND processing_date IS NOT NULL
"""
_OPEN_SUMS = """
SELECT client_org_id, substr(usage_date, 1, 7), SUM(markup_cost_nano)
FROM usage_daily_open GROUP BY 1, 2
"""


class BudgetWatch:
    """The watch's state between passes (module docstring); one thread uses it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        #: the last ``batch_runs`` id seen (None: not started)
        self.position: int | None = None
        #: month -> usage date -> client -> closed markup_cost_nano
        self.closed: dict[str, dict[str, dict[str, int]]] = {}

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = open_sync(self.path)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _date_sums(self, day: str) -> dict[str, int]:
        rows = self.conn.execute(
            "SELECT client_org_id, markup_cost_nano FROM usage_client_daily WHERE usage_date = ?",
            (day,),
        )
        return {client: int(nano) for client, nano in rows.fetchall()}

    def _month_sums(self, month: str) -> dict[str, dict[str, int]]:
        days: dict[str, dict[str, int]] = {}
        rows = self.conn.execute(
            "SELECT usage_date, client_org_id, markup_cost_nano FROM usage_client_daily"
            " WHERE usage_date >= ? AND usage_date < ?",
            (f"{month}-01", f"{next_month(month)}-01"),
        )
        for day, client, nano in rows.fetchall():
            days.setdefault(day, {})[client] = int(nano)
        return days

    def run(self, current_month: str) -> WatchPass:
        """One pass: read the spend of the watched months, fire what crossed."""
        conn = self.conn
        result = WatchPass()
        conn.execute("BEGIN")  # one snapshot for every read of the pass
        try:
            budgets = {budget.client_org_id: budget for budget in list_budgets(conn)}
            (top,) = conn.execute("SELECT COALESCE(MAX(id), 0) FROM batch_runs").fetchone()
            (result.undelivered,) = conn.execute(
                "SELECT COUNT(*) FROM budget_alerts WHERE delivered = 0 AND dropped_at IS NULL"
            ).fetchone()
            months = {current_month}
            if self.position is None or not budgets:
                months.add(previous_month(current_month))
                self.closed.clear()  # nothing tracked changes while there is no budget
            else:
                for (day,) in conn.execute(_CHANGED_DATES, (self.position, top)).fetchall():
                    months.add(day[:7])
                    if day[:7] in self.closed:
                        self.closed[day[:7]][day] = self._date_sums(day)
            self.position = top
            if not budgets:
                return result
            open_sums: dict[tuple[str, str], int] = {}
            for client, month, nano in conn.execute(_OPEN_SUMS).fetchall():
                open_sums[(client, month)] = int(nano)
                if client in budgets:
                    months.add(month)
            for month in months:
                if month not in self.closed:
                    self.closed[month] = self._month_sums(month)
            fired_before = self._fired(conn, months)
        finally:
            conn.execute("COMMIT")
        now = utc_now_text()
        candidates = []
        for client, budget in budgets.items():
            for month in sorted(months):
                spent = open_sums.get((client, month), 0) + sum(
                    day.get(client, 0) for day in self.closed[month].values()
                )
                if month == current_month:
                    result.used[client] = spent / budget.monthly_limit_nano
                for pct in budget.thresholds:
                    if (client, month, pct) not in fired_before and (
                        spent * 100 >= budget.monthly_limit_nano * pct
                    ):
                        candidates.append(
                            Fired(client, month, pct, spent, budget.monthly_limit_nano, now)
                        )
        for month in list(self.closed):  # keep what the next pass needs
            if month not in (current_month, previous_month(current_month)):
                del self.closed[month]
        result.fired = self._record(candidates)
        result.undelivered += len(result.fired)
        return result

    def _fired(self, conn: sqlite3.Connection, months: Iterable[str]) -> set[tuple[str, str, int]]:
        wanted = sorted(months)
        rows = conn.execute(
            "SELECT client_org_id, usage_month, threshold_pct FROM budget_alerts"
            f" WHERE usage_month IN ({','.join('?' * len(wanted))})",
            wanted,
        )
        return {tuple(row) for row in rows.fetchall()}

    def _record(self, candidates: list[Fired]) -> list[Fired]:
        """Insert the alerts (``INSERT OR IGNORE``: a row already there was fired by an
        earlier pass or process); the ones this call inserted."""
        if not candidates:
            return []
        conn = self.conn
        fired = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for alert in candidates:
                cursor = conn.execute(
                    "INSERT OR IGNORE INTO budget_alerts (client_org_id, usage_month,"
                    " threshold_pct, spent_nano, fired_at, delivered, attempts, limit_nano)"
                    " VALUES (?, ?, ?, ?, ?, 0, 0, ?)",
                    (
                        alert.client_org_id,
                        alert.usage_month,
                        alert.threshold_pct,
                        alert.spent_nano,
                        alert.fired_at,
                        alert.limit_nano,
                    ),
                )
                if cursor.rowcount == 1:
                    fired.append(alert)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return fired
