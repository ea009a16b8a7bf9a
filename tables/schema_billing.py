"""Schema migrations of the billing features (issue 23): the price book, budgets and their
alerts, closed statements and adjustments (CONTRACT §3).

Kept apart from :mod:`tables.schema` so the core migrations (versions 7-19 are reserved
for them) and these (20 and up) grow without touching each other's lines;
:data:`tables.schema.MIGRATIONS` appends these after its own, and every migration is
recorded by version, so the order in the list only matters for a fresh database.

What is true after version 20:

* ``usage_daily.markup_multiplier`` (and ``usage_daily_open``'s, hence
  ``usage_daily_live``'s: that view selects ``*``) is the multiplier a row was priced
  with, as a canonical decimal string; NULL on rows written before the price book.
* ``statements``, ``adjustments`` and ``closed_months`` are append-only: triggers refuse
  any UPDATE or DELETE, so "written once, never changed" holds whoever writes to the file.
* ``usage_daily_by_client_date`` serves per-client month and year reads (budgets, the
  query API, the report); ``usage_daily_pln_pending`` (partial) finds the rows still
  waiting for an NBP rate without scanning a month.
"""

from __future__ import annotations

__all__ = ["BILLING_MIGRATIONS"]


def _append_only(table: str, why: str) -> list[str]:
    return [
        f"""CREATE TRIGGER {table}_never_updated BEFORE UPDATE ON {table}
            BEGIN SELECT RAISE(ABORT, '{table} are never changed: {why}'); END""",
        f"""CREATE TRIGGER {table}_never_deleted BEFORE DELETE ON {table}
            BEGIN SELECT RAISE(ABORT, '{table} are never deleted: {why}'); END""",
    ]


_DELTAS = """
    requests INTEGER NOT NULL,
    estimated_requests INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL,
    raw_cost_nano INTEGER NOT NULL,
    markup_cost_nano INTEGER NOT NULL,
    markup_cost_pln_nano INTEGER
"""

BILLING_MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        20,
        [
            # The price book: the multiplier of a row of usage date D is the most specific
            # rule (client and model > client > model > neither) with the latest
            # effective_from <= D, else USAGE_MARKUP_MULTIPLIER (tables/pricebook.py).
            """CREATE TABLE markup_rules (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                client_org_id TEXT,
                model TEXT,
                multiplier TEXT NOT NULL,
                effective_from TEXT NOT NULL,
                created_at TEXT NOT NULL,
                note TEXT
            )""",
            "ALTER TABLE usage_daily ADD COLUMN markup_multiplier TEXT",
            "ALTER TABLE usage_daily_open ADD COLUMN markup_multiplier TEXT",
            # Budgets per client, in marked-up USD per business-time month, and the
            # thresholds fired (at most once per client, month and threshold: the key).
            """CREATE TABLE client_budgets (
                client_org_id TEXT PRIMARY KEY,
                monthly_limit_nano INTEGER NOT NULL CHECK (monthly_limit_nano > 0),
                thresholds TEXT NOT NULL,
                webhook_url TEXT,
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL
            )""",
            """CREATE TABLE budget_alerts (
                client_org_id TEXT NOT NULL,
                usage_month TEXT NOT NULL,
                threshold_pct INTEGER NOT NULL,
                spent_nano INTEGER NOT NULL,
                fired_at TEXT NOT NULL,
                delivered INTEGER NOT NULL DEFAULT 0,
                attempts INTEGER NOT NULL DEFAULT 0,
                last_error TEXT,
                -- the limit the threshold was crossed against (the webhook's limit_usd,
                -- also when the budget changes before the alert is delivered)
                limit_nano INTEGER NOT NULL,
                delivered_at TEXT,
                PRIMARY KEY (client_org_id, usage_month, threshold_pct)
            )""",
            "CREATE INDEX budget_alerts_undelivered ON budget_alerts (fired_at)"
            " WHERE delivered = 0",
            # Months whose statements are issued; contiguous from the first month closed,
            # so a month is closed when it is at most MAX(usage_month).
            """CREATE TABLE closed_months (
                usage_month TEXT PRIMARY KEY,
                closed_at TEXT NOT NULL
            )""",
            *_append_only("closed_months", "a closed month stays closed"),
            """CREATE TABLE statements (
                client_org_id TEXT NOT NULL,
                usage_month TEXT NOT NULL,
                closed_at TEXT NOT NULL,
                input_tokens INTEGER NOT NULL,
                output_tokens INTEGER NOT NULL,
                total_tokens INTEGER NOT NULL,
                requests INTEGER NOT NULL,
                estimated_requests INTEGER NOT NULL,
                raw_cost_nano INTEGER NOT NULL,
                markup_cost_nano INTEGER NOT NULL,
                markup_cost_pln_nano INTEGER,
                raw_cost_usd REAL NOT NULL,
                markup_cost_usd REAL NOT NULL,
                markup_cost_pln REAL,
                PRIMARY KEY (client_org_id, usage_month)
            )""",
            *_append_only("statements", "corrections go to adjustments"),
            f"""CREATE TABLE adjustments (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                client_org_id TEXT NOT NULL,
                usage_date TEXT NOT NULL,
                statement_month TEXT NOT NULL,
                {_DELTAS},
                reason TEXT NOT NULL CHECK (reason IN ('late_events', 'replay')),
                created_at TEXT NOT NULL
            )""",
            *_append_only("adjustments", "a correction is a new adjustment"),
            "CREATE INDEX adjustments_by_date ON adjustments (usage_date)",
            "CREATE INDEX adjustments_by_statement_month ON adjustments (statement_month)",
            "CREATE INDEX usage_daily_by_client_date ON usage_daily (client_org_id, usage_date)",
            "CREATE INDEX usage_daily_pln_pending ON usage_daily (usage_date)"
            " WHERE markup_cost_pln_nano IS NULL",
        ],
    ),
]
