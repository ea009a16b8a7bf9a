"""The price book (docs/contract.md §3, §4): markup rules per client and model from a date on,
forward only, with the real ``usage-stream markup`` command and a real worker; expected
rows from tests/ground_truth.py with each row's multiplier worked out here by hand."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import timedelta
from decimal import Decimal

import orjson

from tables.summary_db.pricebook import MarkupRule, Pricebook, oldest_open_date
from tables.summary_db.schema import connect
from tests.billing.helpers import event, local_today, one_line_error, publish, settled
from tests.ground_truth import WARSAW, Key, ground_truth
from tests.harness import Stack, wait_for

COLUMNS = (
    "input_tokens, output_tokens, total_tokens, requests, estimated_requests, raw_cost_nano,"
    " markup_cost_nano, markup_cost_pln_nano, raw_cost_usd, markup_cost_usd, markup_cost_pln,"
    " usd_pln_rate, nbp_table_no"
)


def live(stack: Stack) -> dict[Key, tuple]:
    rows = stack.query(
        f"SELECT client_org_id, user_id, model, usage_date, {COLUMNS}, markup_multiplier"
        " FROM usage_daily_live"
    )
    return {tuple(row[:4]): tuple(row[4:]) for row in rows}


def expected(events: list[dict], multiplier: dict[tuple[str, str, str], str]) -> dict:
    """Ground truth, each row priced with ``multiplier[(client, model, date)]``."""

    def markup(key: Key) -> Decimal:
        return Decimal(multiplier[(key[0], key[2], key[3])])

    truth = ground_truth(events, markup=markup)
    return {key: (*row, multiplier[(key[0], key[2], key[3])]) for key, row in truth.items()}


def cli_ok(stack: Stack, *args: str) -> str:
    result = stack.cli(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode()


def test_rules_price_rows_by_client_model_and_date_forward_only(stack: Stack) -> None:
    today = local_today()
    old = today - timedelta(days=5)
    tomorrow = today + timedelta(days=1)

    # a rule from long ago, as if added while `old` was still open (the command refuses
    # to date one in the past: below)
    async def historical_rule() -> None:
        conn = await connect(stack.db_path)
        await conn.execute(
            "INSERT INTO markup_rules (client_org_id, model, multiplier, effective_from,"
            " created_at, note) VALUES ('org-a', NULL, '1.7', ?, '2020-01-01T00:00:00Z', NULL)",
            ((old - timedelta(days=10)).isoformat(),),
        )
        await conn.commit()
        await conn.close()

    asyncio.run(historical_rule())
    m1, m2 = "openai/gpt-4o-mini", "anthropic/claude-3.5-sonnet"
    cli_ok(stack, "markup", "set", "--client", "org-a", "--multiplier", "2.00",
           "--from", today.isoformat(), "--note", "org-a's new contract")  # fmt: skip
    cli_ok(stack, "markup", "set", "--client", "org-b", "--model", m2, "--multiplier", "1.1",
           "--from", today.isoformat())  # fmt: skip
    cli_ok(stack, "markup", "set", "--model", m2, "--multiplier", "3", "--from", today.isoformat())

    worker = stack.worker().start()
    worker.wait_assigned()
    events = []
    for day in (old, today):
        for n, (client, model) in enumerate(
            [("org-a", m1), ("org-a", m2), ("org-b", m1), ("org-b", m2), ("org-c", m2)]
        ):
            for copy in range(3):
                events.append(
                    event(
                        f"{day}-{client}-{n}-{copy}",
                        client,
                        day,
                        f"0.{n + 1}{copy}3456789{copy}7",  # rounds half-even to the nano
                        model=model,
                        second=n * 3 + copy,
                    )
                )
    publish(stack, events)
    settled(stack, len(events))
    prices = {
        # the old date: org-a's historical rule, the default for everyone else
        ("org-a", m1, str(old)): "1.7",
        ("org-a", m2, str(old)): "1.7",
        ("org-b", m1, str(old)): "1.3",
        ("org-b", m2, str(old)): "1.3",
        ("org-c", m2, str(old)): "1.3",
        # today, two clients at different markups on one day: client beats its older
        # rule, client+model beats model, model beats the default
        ("org-a", m1, str(today)): "2",
        ("org-a", m2, str(today)): "2",
        ("org-b", m1, str(today)): "1.3",
        ("org-b", m2, str(today)): "1.1",
        ("org-c", m2, str(today)): "3",
    }
    assert live(stack) == expected(events, prices)

    # a change from tomorrow leaves today alone
    today_rows = stack.query("SELECT * FROM usage_daily_open ORDER BY 1, 2, 3, 4")
    cli_ok(stack, "markup", "set", "--multiplier", "1.25", "--from", tomorrow.isoformat())
    time.sleep(2)  # four rollup passes
    assert stack.query("SELECT * FROM usage_daily_open ORDER BY 1, 2, 3, 4") == today_rows

    # a rule from today re-prices today's open rows within a rollup interval or two
    cli_ok(stack, "markup", "set", "--client", "org-c", "--multiplier", "4",
           "--from", today.isoformat())  # fmt: skip
    prices[("org-c", m2, str(today))] = "4"
    wait_for(lambda: live(stack) == expected(events, prices), 30, "org-c re-priced at 4")

    # a replay of the old date after the changes keeps the old prices: damage the date's
    # org-a rows, and the replay restores them at 1.7 (not today's 2)
    conn = sqlite3.connect(stack.db_path, timeout=30)
    conn.execute(
        "UPDATE usage_daily SET markup_cost_nano = 0, markup_multiplier = '9'"
        " WHERE client_org_id = 'org-a' AND usage_date = ?",
        (old.isoformat(),),
    )
    conn.commit()
    conn.close()
    result = stack.cli("replay", "--date", old.isoformat())
    assert result.returncode == 0, result.stderr
    assert live(stack) == expected(events, prices)

    # a rule dated before the oldest open date: one line, nothing changes
    rules = stack.query("SELECT * FROM markup_rules ORDER BY id")
    for day in (old, today - timedelta(days=2)):
        line = one_line_error(
            stack.cli("markup", "set", "--multiplier", "5", "--from", day.isoformat())
        )
        assert line.startswith(f"usage-stream: --from {day} is before the oldest date still open")
    assert stack.query("SELECT * FROM markup_rules ORDER BY id") == rules
    listed = orjson.loads(cli_ok(stack, "markup", "list", "--format", "json"))
    assert listed["default_multiplier"] == "1.3"
    assert [(r["client_org_id"], r["multiplier"], r["status"]) for r in listed["rules"]] == [
        ("org-a", "1.7", "superseded"),
        ("org-a", "2", "in force"),
        ("org-b", "1.1", "in force"),
        (None, "3", "in force"),
        ("org-c", "4", "in force"),
        (None, "1.25", "future"),
    ]
    assert listed["rules"][1]["note"] == "org-a's new contract"
    assert worker.stop() == 0


def test_bad_markup_input_is_one_line_and_changes_nothing(stack: Stack) -> None:
    today = local_today()
    cli_ok(stack, "markup", "set", "--multiplier", "1.4", "--from", today.isoformat())
    rules = stack.query("SELECT * FROM markup_rules")
    start = ("markup", "set", "--from", today.isoformat())
    cases = [
        ((*start, "--multiplier", "0"), "--multiplier must be a decimal > 0"),
        ((*start, "--multiplier", "-1.2"), "--multiplier must be a decimal > 0"),
        ((*start, "--multiplier", "1001"), "--multiplier must be a decimal > 0 and <= 1000"),
        ((*start, "--multiplier", "Infinity"), "--multiplier must be a decimal > 0"),
        ((*start, "--multiplier", "one"), "--multiplier must be a decimal number"),
        ((*start, "--multiplier", "1.2", "--client", ""), "--client must be 1-128 characters"),
        ((*start, "--multiplier", "1.2", "--model", "m" * 257), "--model must be 1-256"),
        (("markup", "set", "--multiplier", "2", "--from", "2026-02-30"), "--from must be a date"),
        (("markup", "set", "--multiplier", "2", "--from", "tomorrow"), "--from must be a date"),
        (("markup", "set", "--multiplier", "2"), "markup set: Missing option '--from'"),
        (("markup", "list", "--format", "xml"), "markup list: Invalid value for '--format'"),
    ]
    for args, expected_line in cases:
        line = one_line_error(stack.cli(*args))
        assert line.startswith(f"usage-stream: {expected_line}"), (args, line)
    assert stack.query("SELECT * FROM markup_rules") == rules


def test_most_specific_rule_with_the_latest_date_wins() -> None:
    def rule(n: int, client: str | None, model: str | None, x: str, day: str) -> MarkupRule:
        return MarkupRule(n, client, model, Decimal(x), day, "t", None)

    book = Pricebook(
        [
            rule(1, None, None, "1.5", "2026-01-01"),
            rule(2, None, "m", "2", "2026-02-01"),
            rule(3, "c", None, "3", "2026-03-01"),
            rule(4, "c", "m", "4", "2026-04-01"),
            rule(5, "c", None, "3.5", "2026-05-01"),  # a newer client rule: still below c+m
            rule(7, None, "m", "2.5", "2026-06-01"),
            rule(6, None, "m", "2.2", "2026-06-01"),  # same scope and date: the later added wins
        ],
        Decimal("1.3"),
    )
    assert book.for_day("2025-12-31")("c", "m") == Decimal("1.3")
    assert book.for_day("2026-01-01")("c", "m") == Decimal("1.5")
    assert book.for_day("2026-02-01")("c", "m") == Decimal("2")
    assert book.for_day("2026-02-01")("x", "other") == Decimal("1.5")
    assert book.for_day("2026-03-15")("c", "m") == Decimal("3")
    assert book.for_day("2026-03-15")("d", "m") == Decimal("2")
    assert book.for_day("2026-05-02")("c", "m") == Decimal("4")
    assert book.for_day("2026-05-02")("c", "other") == Decimal("3.5")
    assert book.for_day("2026-06-01")("d", "m") == Decimal("2.5")


def test_the_oldest_open_date_follows_the_clock_and_the_closed_days() -> None:
    from datetime import datetime

    at = datetime(2026, 12, 5, 0, 30, tzinfo=WARSAW)  # within the hour of grace
    assert str(oldest_open_date(at, WARSAW, 3600, None)) == "2026-12-04"
    assert str(oldest_open_date(at, WARSAW, 3600, "2026-12-04")) == "2026-12-05"
    assert str(oldest_open_date(at, WARSAW, 0, "2026-11-30")) == "2026-12-05"
