"""Schema migrations of the billing features (issue 23): the price book, budgets and their
alerts, closed statements and adjustments (docs/contract.md §3).

Kept apart from :mod:`tables.summary_db.schema` so the core migrations (versions 7-19 are reserved
for them) and these (20 and up) grow without touching each other's lines;
:data:`tables.summary_db.schema.MIGRATIONS` appends these after its own, and every migration is
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

After version 21: ``usage_client_daily`` and ``usage_client_model_daily`` hold
``usage_daily``'s summed columns per (client, date) and (client, model, date), with
``rows`` and ``pln_rows`` (rows with a PLN amount: the PLN sum is complete when they are
equal). Triggers on ``usage_daily`` keep them exact in the same transaction as every
insert, update and delete, whoever writes; rows that fall to zero rows are deleted. They
cost ~10-15 % more per ``usage_daily`` row written (measured on an 80k-row upsert) and
let a year of every client be read as ~18k rows instead of 18M at 50k keys a day.

After version 22: ``budget_alerts.dropped_at`` is set on the alerts still undelivered
when their client's budget was removed (``budget rm``); nothing delivers them any more.
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

# usage_daily's summed columns, kept per client (and model) and date by the triggers of
# migration 21; markup_cost_pln_nano sums the rows that have one, pln_rows counts them.
_TOTALS = (
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "requests",
    "estimated_requests",
    "raw_cost_nano",
    "markup_cost_nano",
)
_LEVELS = {
    "usage_client_daily": ("client_org_id", "usage_date"),
    "usage_client_model_daily": ("client_org_id", "model", "usage_date"),
}


def _totals_table(table: str, keys: tuple[str, ...]) -> list[str]:
    columns = ", ".join(f"{name} INTEGER NOT NULL" for name in _TOTALS)
    sums = ", ".join(f"SUM({name})" for name in _TOTALS)
    return [
        f"""CREATE TABLE {table} (
            {", ".join(f"{key} TEXT NOT NULL" for key in keys)},
            rows INTEGER NOT NULL,
            {columns},
            markup_cost_pln_nano INTEGER NOT NULL,
            pln_rows INTEGER NOT NULL,
            PRIMARY KEY ({", ".join(keys)})
        ) WITHOUT ROWID""",
        f"CREATE INDEX {table}_by_date ON {table} (usage_date)",
        f"""INSERT INTO {table} SELECT {", ".join(keys)}, COUNT(*), {sums},
            COALESCE(SUM(markup_cost_pln_nano), 0), COUNT(markup_cost_pln_nano)
            FROM usage_daily GROUP BY {", ".join(keys)}""",
    ]


def _add(table: str, keys: tuple[str, ...], row: str, sign: str) -> str:
    """Add (``sign`` "+") or subtract ("-") trigger row ``row`` (NEW or OLD) to its totals."""
    values = [f"{row}.{key}" for key in keys]
    values.append(f"{sign}1")
    values += [f"{sign}{row}.{name}" for name in _TOTALS]
    values.append(f"{sign}COALESCE({row}.markup_cost_pln_nano, 0)")
    values.append(f"{sign}({row}.markup_cost_pln_nano IS NOT NULL)")
    return _upsert(table, keys, values)


def _delta(table: str, keys: tuple[str, ...]) -> str:
    """Add NEW - OLD of an updated row whose keys did not change."""
    values = [f"NEW.{key}" for key in keys]
    values.append("0")
    values += [f"NEW.{name} - OLD.{name}" for name in _TOTALS]
    values.append("COALESCE(NEW.markup_cost_pln_nano, 0) - COALESCE(OLD.markup_cost_pln_nano, 0)")
    values.append("(NEW.markup_cost_pln_nano IS NOT NULL) - (OLD.markup_cost_pln_nano IS NOT NULL)")
    return _upsert(table, keys, values)


def _upsert(table: str, keys: tuple[str, ...], values: list[str]) -> str:
    summed = ["rows", *_TOTALS, "markup_cost_pln_nano", "pln_rows"]
    return (
        f"INSERT INTO {table} VALUES ({', '.join(values)})"
        f" ON CONFLICT ({', '.join(keys)}) DO UPDATE SET "
        + ", ".join(f"{name} = {name} + excluded.{name}" for name in summed)
        + ";"
    )


def _drop_empty(table: str, keys: tuple[str, ...]) -> str:
    match = " AND ".join(f"{key} = OLD.{key}" for key in keys)
    return f"DELETE FROM {table} WHERE {match} AND rows = 0;"


def _totals_triggers() -> list[str]:
    same_keys = " AND ".join(
        f"OLD.{key} = NEW.{key}" for key in ("client_org_id", "model", "usage_date")
    )
    watched = ", ".join(["client_org_id", "model", "usage_date", *_TOTALS, "markup_cost_pln_nano"])
    levels = _LEVELS.items()
    return [
        "CREATE TRIGGER usage_daily_totals_insert AFTER INSERT ON usage_daily BEGIN "
        + " ".join(_add(t, k, "NEW", "+") for t, k in levels)
        + " END",
        "CREATE TRIGGER usage_daily_totals_delete AFTER DELETE ON usage_daily BEGIN "
        + " ".join(_add(t, k, "OLD", "-") + " " + _drop_empty(t, k) for t, k in levels)
        + " END",
        f"CREATE TRIGGER usage_daily_totals_update AFTER UPDATE OF {watched} ON usage_daily"
        f" WHEN {same_keys} BEGIN " + " ".join(_delta(t, k) for t, k in levels) + " END",
        f"CREATE TRIGGER usage_daily_totals_rekey AFTER UPDATE OF {watched} ON usage_daily"
        f" WHEN NOT ({same_keys}) BEGIN "
        + " ".join(
            _add(t, k, "OLD", "-") + " " + _drop_empty(t, k) + " " + _add(t, k, "NEW", "+")
            for t, k in levels
        )
        + " END",
    ]


BILLING_MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        20,
        [
            # The price book: the multiplier of a row of usage date D is the most specific
            # rule (client and model > client > model > neither) with the latest
            # effective_from <= D, else USAGE_MARKUP_MULTIPLIER (tables/summary_db/pricebook.py).
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
    (
        21,
        [
            # usage_daily summed per client and date, and per client, model and date,
            # kept exact by triggers whoever writes usage_daily (the rollup, a replay, the
            # PLN fill, an operator's UPDATE): the query API, budgets and statements read
            # a year of every client from these instead of 18M rows at 50k keys a day.
            *(stmt for table, keys in _LEVELS.items() for stmt in _totals_table(table, keys)),
            *_totals_triggers(),
        ],
    ),
    (
        22,
        [
            # Removing a budget drops its undelivered alerts: the row stays (delivered 0,
            # last_error saying why), dropped_at says when; the delivery skips them.
            "ALTER TABLE budget_alerts ADD COLUMN dropped_at TEXT",
        ],
    ),
]
