"""Statements that close, and adjustments (docs/contract.md §3, §4), with a real worker.

A month two months back (past its close whatever today is) gets usage on two dates,
with an NBP rate for every date (a statement waits for PLN). One client's rows of one
date are then lost (deleted from ``usage_daily``, as a damaged day would be) before the
month closes, so the statement is issued without them. Then:

* late events for a date of the closed month correct ``usage_daily`` and become
  ``late_events`` adjustments, exact to the nano, on the first month still open;
* a replay of the damaged date restores it and becomes a ``replay`` adjustment;
* the statement never changes, and statement + adjustments = ``usage_daily`` = the
  ground truth of every event;
* ``usage-stream report`` states the closed month as issued with its adjustments, and
  the open month they are billed on lists them as lines of their own.
"""

from __future__ import annotations

import csv
import io
import sqlite3
from collections import defaultdict
from datetime import date, timedelta
from decimal import Decimal

import orjson
import pytest

from tests.billing.helpers import event, local_today, publish, seed_rates, settled
from tests.ground_truth import ground_truth
from tests.harness import Stack, wait_for

SUMS = (
    "requests",
    "estimated_requests",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "raw_cost_nano",
    "markup_cost_nano",
    "markup_cost_pln_nano",
)


def per_client(rows: dict, dates: set[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Ground-truth rows summed per client, in :data:`SUMS` order."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0] * len(SUMS))
    for (client, _, _, day), row in rows.items():
        if dates is not None and day not in dates:
            continue
        values = (
            row.requests,
            row.estimated_requests,
            row.input_tokens,
            row.output_tokens,
            row.total_tokens,
            row.raw_cost_nano,
            row.markup_cost_nano,
            row.markup_cost_pln_nano,
        )
        total = totals[client]
        for index, value in enumerate(values):
            total[index] += value
    return {client: tuple(values) for client, values in totals.items()}


def minus(a: dict[str, tuple], b: dict[str, tuple]) -> dict[str, tuple]:
    clients = set(a) | set(b)
    zero = (0,) * len(SUMS)
    deltas = {
        c: tuple(x - y for x, y in zip(a.get(c, zero), b.get(c, zero), strict=True))
        for c in clients
    }
    return {c: d for c, d in deltas.items() if any(d)}


def statements(stack: Stack, month: str) -> dict[str, tuple]:
    rows = stack.query(
        f"SELECT client_org_id, {', '.join(SUMS)} FROM statements WHERE usage_month = ?",
        (month,),
    )
    return {row[0]: tuple(row[1:]) for row in rows}


def adjustments(stack: Stack, reason: str) -> list[tuple]:
    return stack.query(
        f"SELECT client_org_id, usage_date, statement_month, {', '.join(SUMS)} FROM adjustments"
        " WHERE reason = ? ORDER BY id",
        (reason,),
    )


def summed(rows: list[tuple]) -> dict[tuple, tuple]:
    """Adjustment rows summed per (client, usage_date, statement_month)."""
    totals: dict[tuple, tuple] = {}
    for client, day, billed_on, *deltas in rows:
        before = totals.get((client, day, billed_on), (0,) * len(SUMS))
        totals[(client, day, billed_on)] = tuple(x + y for x, y in zip(before, deltas, strict=True))
    return totals


def usage_daily(stack: Stack, month: str) -> dict[str, tuple]:
    rows = stack.query(
        f"SELECT client_org_id, {', '.join(f'SUM({name})' for name in SUMS)} FROM usage_daily"
        " WHERE substr(usage_date, 1, 7) = ? GROUP BY 1",
        (month,),
    )
    return {row[0]: tuple(row[1:]) for row in rows}


def test_late_events_and_a_replay_after_the_close_become_exact_adjustments(
    stack: Stack,
) -> None:
    today = local_today()
    first_of_month = today.replace(day=1)
    day_in_month = first_of_month - timedelta(days=35)  # two months back
    month = day_in_month.strftime("%Y-%m")
    d1, d2 = date.fromisoformat(f"{month}-05"), date.fromisoformat(f"{month}-20")
    rates = seed_rates(stack, d1.replace(day=1), first_of_month)

    def truth(events: list[dict]) -> dict:
        return ground_truth(events, rate_for=rates.get)

    # the month's usage, billed while its statement is not due (grace of a year)
    worker = stack.worker(STATEMENT_GRACE_DAYS="366").start()
    worker.wait_assigned()
    m2 = "anthropic/claude-3.5-sonnet"
    base = [
        event(f"a1-{i}", "org-a", d1, f"0.{i}23456789{i}1", second=i) for i in range(1, 4)
    ] + [
        event(f"b1-{i}", "org-b", d1, f"1.{i}00000000{i}5", model=m2, second=i) for i in range(2)
    ] + [
        event(f"a2-{i}", "org-a", d2, f"0.0{i}7777777{i}7", user="u2", second=i) for i in range(2)
    ] + [
        event(f"b2-{i}", "org-b", d2, f"0.3{i}1111111{i}9", model=m2, second=i) for i in range(3)
    ]  # fmt: skip
    publish(stack, base)
    settled(stack, len(base))
    assert stack.query("SELECT COUNT(*) FROM closed_months") == [(0,)]
    assert worker.stop() == 0

    # org-b's rows of d2 are lost before the month closes: the statement lacks them
    conn = sqlite3.connect(stack.db_path, timeout=30)
    conn.execute(
        "DELETE FROM usage_daily WHERE client_org_id = 'org-b' AND usage_date = ?",
        (d2.isoformat(),),
    )
    conn.commit()
    conn.close()
    lost = {k: v for k, v in truth(base).items() if k[0] == "org-b" and k[3] == str(d2)}
    issued = minus(per_client(truth(base)), per_client(lost))

    worker = stack.worker().start()  # STATEMENT_GRACE_DAYS 3: the month is due
    worker.wait_assigned()
    wait_for(lambda: statements(stack, month), 60, f"the statement of {month}")
    assert statements(stack, month) == issued
    first_open = first_of_month.strftime("%Y-%m")
    if today < first_of_month + timedelta(days=3):  # last month is not due yet
        first_open = (first_of_month - timedelta(days=1)).strftime("%Y-%m")
    wait_for(
        lambda: (
            stack.query("SELECT MAX(usage_month) FROM closed_months")
            == [((date.fromisoformat(first_open + "-01") - timedelta(days=1)).strftime("%Y-%m"),)]
        ),
        30,
        "the months up to the first open one closed",
    )
    snapshot = stack.query("SELECT * FROM statements ORDER BY 1, 2")
    assert stack.query("SELECT COUNT(*) FROM adjustments") == [(0,)]

    # late events for d1: an existing row of org-a, a new row of org-a, a new client
    late = [
        event("late-1", "org-a", d1, "0.444444444444", second=30),
        event("late-2", "org-a", d1, "0.05", user="u-new", second=31),
        event("late-3", "org-c", d1, "2.000000001", model=m2, second=32),
    ]
    publish(stack, late)
    settled(stack, len(base) + len(late) - sum(row.requests for row in lost.values()))
    expected_late = minus(per_client(truth(base + late)), per_client(truth(base)))
    assert set(expected_late) == {"org-a", "org-c"}
    # one row per client and date each time a merge corrects them (the late events may
    # be merged in one pass or several): their sums are the exact differences
    assert summed(adjustments(stack, "late_events")) == {
        (client, str(d1), first_open): expected_late[client] for client in ("org-a", "org-c")
    }
    assert stack.query("SELECT * FROM statements ORDER BY 1, 2") == snapshot

    # a replay of the damaged date restores org-b's rows: a replay adjustment
    result = stack.cli("replay", "--date", d2.isoformat())
    assert result.returncode == 0, result.stderr
    assert adjustments(stack, "replay") == [
        ("org-b", str(d2), first_open, *per_client(lost)["org-b"])
    ]
    assert stack.query("SELECT * FROM statements ORDER BY 1, 2") == snapshot

    # issued + adjustments = usage_daily now = the ground truth of every event
    everything = per_client(truth(base + late))
    assert usage_daily(stack, month) == everything
    corrected = dict(issued)
    for client, _, _, *deltas in adjustments(stack, "late_events") + adjustments(stack, "replay"):
        before = corrected.get(client, (0,) * len(SUMS))
        corrected[client] = tuple(x + y for x, y in zip(before, deltas, strict=True))
    assert corrected == everything

    # statements and adjustments are never changed, whoever writes to the file
    conn = sqlite3.connect(stack.db_path, timeout=30)
    for statement in (
        "UPDATE statements SET requests = requests + 1",
        "DELETE FROM statements",
        "UPDATE adjustments SET requests = 0",
        "DELETE FROM closed_months",
    ):
        with pytest.raises(sqlite3.IntegrityError, match="never"):
            conn.execute(statement)
    conn.close()

    # the report of the closed month: as issued, then the adjustments recorded since
    closed = orjson.loads(ok(stack.cli("report", "--month", month, "--format", "json")))
    assert closed["closed_at"] and closed["final"] == 1
    assert {
        line["client_org_id"]: (line["requests"], line["markup_cost_usd"], line["markup_cost_pln"])
        for line in closed["clients"]
    } == {client: (values[0], usd(values[6]), usd(values[7])) for client, values in issued.items()}
    recorded = [(a[0], "late_events") for a in adjustments(stack, "late_events")]
    recorded.append(("org-b", "replay"))
    listed = [(a["client_org_id"], a["reason"]) for a in closed["adjustments"]]
    assert listed == recorded
    assert {a["statement_month"] for a in closed["adjustments"]} == {first_open}
    # the open month they are billed on lists them as lines of their own; a CSV column
    # sum of the closed month is its corrected total
    text = ok(stack.cli("report", "--month", first_open, "--format", "csv")).decode()
    lines = list(csv.DictReader(io.StringIO(text, newline="")))
    landing = [(line["client_org_id"], line["reason"]) for line in lines[-len(recorded) :]]
    assert landing == recorded
    assert {line["line"] for line in lines[-len(recorded) :]} == {"adjustment"}
    text = ok(stack.cli("report", "--month", month, "--format", "csv")).decode()
    lines = list(csv.DictReader(io.StringIO(text, newline="")))
    total = sum(Decimal(line["markup_cost_usd"]) for line in lines)
    assert total == Decimal(sum(values[6] for values in everything.values())) / 10**9
    # the table format (the default) shows them as lines of their own too: the closed
    # month as issued, then its adjustments; the open month the ones billed on it
    recorded_lines = [
        [str(id_), client, day, reason, billed_on, str(requests), usd(markup)]
        for id_, client, day, reason, billed_on, requests, markup in stack.query(
            "SELECT id, client_org_id, usage_date, reason, statement_month, requests,"
            " markup_cost_nano FROM adjustments ORDER BY id"
        )
    ]
    assert len(recorded_lines) == len(recorded)
    for shown, title in (
        (month, f"recorded after {month} closed (billed on statement_month)"),
        (first_open, f"billed on {first_open}"),
    ):
        # COLUMNS: one table, not blocks, whatever terminal the tests run under
        table = ok(stack.cli("report", "--month", shown, COLUMNS="250")).decode()
        assert f"adjustments: corrections of a closed month {title}" in table, table
        assert ("as issued" in table) == (shown == month), table
        # id, client_org_id, usage_date, reason, statement_month, recorded_at, requests,
        # estimated_requests, input/output/total_tokens, raw_cost_usd, markup_cost_usd, PLN
        shown_lines = [cells for cells in table_rows(table) if cells[0].isdigit()]
        assert [[*cells[:5], cells[6], cells[12]] for cells in shown_lines] == recorded_lines, table
    assert worker.stop() == 0


def table_rows(text: str) -> list[list[str]]:
    """The cells of every row of the rich tables in ``text``."""
    rows = []
    for line in text.splitlines():
        if "│" in line:
            rows.append([cell.strip() for cell in line.strip().strip("│┃").split("│")])
    return rows


def usd(nano: int | None) -> str | None:
    return None if nano is None else f"{Decimal(nano) / 10**9:.9f}"


def ok(result) -> bytes:
    assert result.returncode == 0, result.stderr
    assert b"Traceback" not in result.stderr
    return result.stdout
