"""The price book: which markup multiplier prices a ``usage_daily`` row (docs/contract.md §3).

``markup_rules`` rows say "from ``effective_from`` on, usage of ``client_org_id`` (NULL:
every client) on ``model`` (NULL: every model) is marked up by ``multiplier``". The
multiplier of a row of usage date D is the most specific rule (client and model > client
> model > neither) with the latest ``effective_from`` <= D (the latest added among rules of
one scope and date), else ``USAGE_MARKUP_MULTIPLIER``.

Rules apply forward only: ``effective_from`` may not be before the oldest date still open
(:func:`oldest_open_date`), so the rules in force on a closed date never change, and a
replay or a late event prices a date exactly as it was priced when it closed. Adding a
rule marks the open dates it covers for a rewrite of their provisional rows
(``daily_pending.live_dirty``), so ``usage_daily_live`` shows the new price within a
rollup interval.

Multipliers are exact decimals, stored and recorded (``usage_daily.markup_multiplier``)
as canonical text (:func:`multiplier_text`: ``1.5``, never ``1.50`` or ``15E-1``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from zoneinfo import ZoneInfo

import aiosqlite

from tables.summary_db.schema import utc_now_text

__all__ = [
    "MAX_MULTIPLIER",
    "DayMarkups",
    "MarkupRule",
    "Pricebook",
    "RuleRefused",
    "add_rule",
    "list_rules",
    "load_pricebook",
    "load_rules_sync",
    "multiplier_text",
    "oldest_open_date",
    "parse_multiplier",
]

#: The same bound as USAGE_MARKUP_MULTIPLIER's: nano-USD sums stay inside SQLite's int64.
MAX_MULTIPLIER = Decimal(1000)

_RULE_COLUMNS = "id, client_org_id, model, multiplier, effective_from, created_at, note"


class RuleRefused(ValueError):
    """A rule that may not be added; ``str()`` is the one-line reason."""


@dataclass(frozen=True, slots=True)
class MarkupRule:
    id: int
    client_org_id: str | None
    model: str | None
    multiplier: Decimal
    effective_from: str  # ISO date
    created_at: str
    note: str | None

    @property
    def scope(self) -> str:
        """``client+model``, ``client``, ``model`` or ``all``: what the rule covers."""
        if self.client_org_id is not None:
            return "client+model" if self.model is not None else "client"
        return "model" if self.model is not None else "all"


def multiplier_text(value: Decimal) -> str:
    """The canonical decimal text of a multiplier: ``1.5`` for 1.50, ``100`` for 1E+2."""
    return format(value.normalize(), "f")


def parse_multiplier(text: str) -> Decimal:
    """A rule's multiplier: a finite decimal > 0 and <= :data:`MAX_MULTIPLIER`."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise RuleRefused(f"--multiplier must be a decimal number, got {text[:40]!r}") from None
    if not value.is_finite() or value <= 0 or value > MAX_MULTIPLIER:
        raise RuleRefused(
            f"--multiplier must be a decimal > 0 and <= {MAX_MULTIPLIER}, got {text[:40]!r}"
        )
    return value


class DayMarkups:
    """The multipliers in force on one usage date: ``markups(client, model)``."""

    __slots__ = ("by_pair", "by_client", "by_model", "fallback")

    def __init__(
        self,
        by_pair: dict[tuple[str, str], Decimal],
        by_client: dict[str, Decimal],
        by_model: dict[str, Decimal],
        fallback: Decimal,
    ) -> None:
        self.by_pair = by_pair
        self.by_client = by_client
        self.by_model = by_model
        self.fallback = fallback

    def __call__(self, client_org_id: str, model: str) -> Decimal:
        found = self.by_pair.get((client_org_id, model))
        if found is None:
            found = self.by_client.get(client_org_id)
            if found is None:
                found = self.by_model.get(model, self.fallback)
        return found


class Pricebook:
    """Every rule, and the default multiplier; :meth:`for_day` resolves one date."""

    def __init__(self, rules: Iterable[MarkupRule], default: Decimal) -> None:
        # oldest first, the later-added first among rules of one date: a later rule of
        # the same scope and date overrides an earlier one
        self.rules = sorted(rules, key=lambda rule: (rule.effective_from, rule.id))
        self.default = default
        self._days: dict[str, DayMarkups] = {}

    def for_day(self, usage_date: str | date) -> DayMarkups:
        day = usage_date if isinstance(usage_date, str) else usage_date.isoformat()
        found = self._days.get(day)
        if found is None:
            found = self._days[day] = self._resolve(day)
        return found

    def _resolve(self, day: str) -> DayMarkups:
        by_pair: dict[tuple[str, str], Decimal] = {}
        by_client: dict[str, Decimal] = {}
        by_model: dict[str, Decimal] = {}
        fallback = self.default
        for rule in self.rules:
            if rule.effective_from > day:
                break
            if rule.client_org_id is not None and rule.model is not None:
                by_pair[(rule.client_org_id, rule.model)] = rule.multiplier
            elif rule.client_org_id is not None:
                by_client[rule.client_org_id] = rule.multiplier
            elif rule.model is not None:
                by_model[rule.model] = rule.multiplier
            else:
                fallback = rule.multiplier
        return DayMarkups(by_pair, by_client, by_model, fallback)


# A ``markup_rules`` row as its SELECT lists the columns (sqlite3 types rows as Any).
_RuleRow = tuple[int, str | None, str | None, str, str, str, str | None]


def _rule(row: _RuleRow) -> MarkupRule:
    return MarkupRule(
        id=int(row[0]),
        client_org_id=row[1],
        model=row[2],
        multiplier=Decimal(str(row[3])),
        effective_from=str(row[4]),
        created_at=str(row[5]),
        note=row[6],
    )


async def load_pricebook(conn: aiosqlite.Connection, default: Decimal) -> Pricebook:
    """The price book as stored now (a few rows: read whole, inside the caller's
    transaction when there is one, so a pass prices with one consistent set)."""
    async with conn.execute(f"SELECT {_RULE_COLUMNS} FROM markup_rules") as cursor:
        # aiosqlite types rows as sqlite3.Row; with no row_factory they are plain tuples
        rows: Iterable[_RuleRow] = await cursor.fetchall()  # type: ignore[assignment]
        return Pricebook([_rule(row) for row in rows], default)


def load_rules_sync(conn: sqlite3.Connection, default: Decimal) -> Pricebook:
    """:func:`load_pricebook` on a plain ``sqlite3`` connection (the commands')."""
    return Pricebook(list_rules(conn), default)


def list_rules(conn: sqlite3.Connection) -> list[MarkupRule]:
    rows = conn.execute(f"SELECT {_RULE_COLUMNS} FROM markup_rules ORDER BY effective_from, id")
    return [_rule(row) for row in rows.fetchall()]


def oldest_open_date(
    now: datetime, tz: ZoneInfo, grace_seconds: int, latest_closed: str | None
) -> date:
    """The oldest usage date that may still be open: a date closes when the wall clock
    passes local midnight after it plus ``WINDOW_GRACE_SECONDS`` (or earlier, by the
    event-time watermark: then it is in ``closed_days``), so every date before the local
    date of ``now - grace`` is closed or about to be, and so is every date up to the
    latest closed one."""
    by_clock = (now - timedelta(seconds=grace_seconds)).astimezone(tz).date()
    if latest_closed is not None:
        by_clock = max(by_clock, date.fromisoformat(latest_closed) + timedelta(days=1))
    return by_clock


def add_rule(
    conn: sqlite3.Connection,
    *,
    client_org_id: str | None,
    model: str | None,
    multiplier: Decimal,
    effective_from: date,
    note: str | None,
    tz: ZoneInfo,
    grace_seconds: int,
    now: datetime | None = None,
) -> MarkupRule:
    """Add a rule, forward only; raises :class:`RuleRefused` and changes nothing when
    ``effective_from`` is before the oldest open date.

    One ``BEGIN IMMEDIATE`` transaction: the check reads ``closed_days`` under the write
    lock the rollup takes to close a day, so a day cannot close between the check and the
    insert with the rule then applying to it afterwards (on a replay)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        (latest_closed,) = conn.execute("SELECT MAX(usage_date) FROM closed_days").fetchone()
        oldest = oldest_open_date(now or datetime.now(tz), tz, grace_seconds, latest_closed)
        if effective_from < oldest:
            raise RuleRefused(
                f"--from {effective_from} is before the oldest date still open ({oldest}):"
                " rules apply forward only, closed days keep the price they were billed at"
            )
        created_at = utc_now_text()
        cursor = conn.execute(
            "INSERT INTO markup_rules (client_org_id, model, multiplier, effective_from,"
            " created_at, note) VALUES (?, ?, ?, ?, ?, ?)",
            (
                client_org_id,
                model,
                multiplier_text(multiplier),
                effective_from.isoformat(),
                created_at,
                note,
            ),
        )
        rule_id = cursor.lastrowid
        # the open dates it covers: their provisional rows are rewritten at the next pass
        conn.execute(
            "UPDATE daily_pending SET live_dirty = 1 WHERE usage_date >= ? AND live_dirty = 0",
            (effective_from.isoformat(),),
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    assert rule_id is not None
    return MarkupRule(
        rule_id,
        client_org_id,
        model,
        Decimal(multiplier_text(multiplier)),
        effective_from.isoformat(),
        created_at,
        note,
    )
