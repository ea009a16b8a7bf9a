"""``GET /usage`` on a real worker on the real broker, against ground truth computed here.

Events for two closed past days and today, for two clients, with duplicate copies on
other partitions; the expected rows are summed with Decimal arithmetic without any of the
pipeline's code. Closed days must come back final, today provisional, the other client's
rows never; a late event for a closed day must show within seconds; bad parameters are
400s with a one-line reason.
"""

from __future__ import annotations

import random
import time
import urllib.parse
from collections import defaultdict
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from tests.harness import Stack, Worker, http_get, wait_for

WARSAW = ZoneInfo("Europe/Warsaw")  # BUSINESS_TIMEZONE's default
MARKUP = Decimal("1.3")  # USAGE_MARKUP_MULTIPLIER's default
NANO = Decimal(1_000_000_000)
COLUMNS = {
    "client_org_id",
    "user_id",
    "model",
    "usage_date",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "requests",
    "estimated_requests",
    "raw_cost_nano",
    "markup_cost_nano",
    "markup_cost_pln_nano",
    "raw_cost_usd",
    "markup_cost_usd",
    "markup_cost_pln",
    "usd_pln_rate",
    "nbp_table_no",
    "markup_multiplier",
    "revision",
    "updated_at",
    "final",
    "raw_cost_usd_exact",
    "markup_cost_usd_exact",
    "markup_cost_pln_exact",
}


def half_even(value: Decimal) -> int:
    return int(value.to_integral_value(rounding=ROUND_HALF_EVEN))


def local_today() -> date:
    """Today in the business timezone, waiting out the last minutes before midnight so
    that today's events cannot land on a day that closes during the test."""
    now = datetime.now(WARSAW)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), WARSAW)
    if (left := (midnight - now).total_seconds()) < 300:
        time.sleep(left + 5)
    elif now.hour == 0 and now.minute == 0 and now.second < 5:
        time.sleep(5)
    return datetime.now(WARSAW).date()


def make_events(today: date, rng: random.Random) -> list[dict[str, Any]]:
    """Events over today-3, today-2 and today (local dates) for org-a and org-b."""
    now = datetime.now(WARSAW)
    since_midnight = (now - datetime.combine(today, datetime.min.time(), WARSAW)).total_seconds()
    events = []
    for i in range(120):
        day = (today - timedelta(days=3), today - timedelta(days=2), today)[i % 3]
        if day == today:  # between local midnight (or an hour ago) and now, never ahead
            moment = now - timedelta(seconds=rng.uniform(0, min(since_midnight - 1, 3600)))
        else:
            start = datetime.combine(day, datetime.min.time(), WARSAW)
            moment = start + timedelta(seconds=rng.randrange(60, 86_340))
        event: dict[str, Any] = {
            "request_id": f"usage-{i}",
            "client_org_id": "org-a" if i % 2 else "org-b",
            "user_id": f"user-{rng.randrange(3)}",
            "model": rng.choice(["openai/gpt-4o-mini", "anthropic/claude-3.5-sonnet"]),
            "input_tokens": rng.randrange(0, 5000),
            "output_tokens": rng.randrange(0, 2000),
            "timestamp": int(moment.timestamp() * 1000)
            if i % 4
            else moment.isoformat(timespec="milliseconds"),
        }
        if i % 5 == 0:  # 12 decimals: rounded half-even to nano on ingest
            event["cost_usd"] = f"0.{rng.randrange(0, 10**12):012d}"
        elif i % 5 == 1:
            event["cost_usd"] = rng.randrange(0, 10**9) / 10**11  # a JSON number
        elif i % 5 == 2:
            event["cost_usd"] = str(rng.randrange(0, 40))  # whole dollars
        # else: no cost, estimated from a price the worker does not have (0, counted)
        events.append(event)
    return events


def local_date(event: dict[str, Any]) -> str:
    stamp = event["timestamp"]
    moment = (
        datetime.fromtimestamp(stamp / 1000, WARSAW)
        if isinstance(stamp, int)
        else datetime.fromisoformat(stamp).astimezone(WARSAW)
    )
    return moment.date().isoformat()


def ground_truth(events: list[dict[str, Any]], client: str) -> dict[tuple, dict[str, Any]]:
    """Expected rows of one client, keyed (usage_date, user_id, model)."""
    totals: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for event in events:
        if event["client_org_id"] != client:
            continue
        row = totals[(local_date(event), event["user_id"], event["model"])]
        row[0] += event["input_tokens"]
        row[1] += event["output_tokens"]
        row[2] += 1
        if "cost_usd" in event:
            row[4] += half_even(Decimal(str(event["cost_usd"])) * NANO)
        else:
            row[3] += 1
    expected = {}
    for key, (inp, out, requests, estimated, raw) in totals.items():
        markup = half_even(Decimal(raw) * MARKUP)
        expected[key] = {
            "client_org_id": client,
            "usage_date": key[0],
            "user_id": key[1],
            "model": key[2],
            "input_tokens": inp,
            "output_tokens": out,
            "total_tokens": inp + out,
            "requests": requests,
            "estimated_requests": estimated,
            "raw_cost_nano": raw,
            "markup_cost_nano": markup,
            "raw_cost_usd_exact": f"{Decimal(raw) / NANO:.9f}",
            "markup_cost_usd_exact": f"{Decimal(markup) / NANO:.9f}",
            # NBP is unreachable in the tests: no rate, no PLN yet
            "markup_cost_pln_nano": None,
            "markup_cost_pln_exact": None,
            "usd_pln_rate": None,
        }
    return expected


def get_usage(worker: Worker, **params: str) -> tuple[int, Any]:
    code, body = http_get(f"{worker.web}/usage?{urllib.parse.urlencode(params)}")
    return code, orjson.loads(body) if body else None


def matches(rows: list[dict[str, Any]], expected: dict[tuple, dict[str, Any]]) -> bool:
    """The rows carry exactly the expected keys and values (compared field by field)."""
    got = {(r["usage_date"], r["user_id"], r["model"]): r for r in rows}
    return got.keys() == expected.keys() and all(
        {name: got[key][name] for name in want} == want for key, want in expected.items()
    )


def test_usage_serves_live_rows_exactly(stack: Stack) -> None:
    today = local_today()
    rng = random.Random(5)
    events = make_events(today, rng)
    copies = rng.sample(events, 20)
    worker = stack.worker().start()
    worker.wait_assigned()
    values = [orjson.dumps(event) for event in events + copies]
    stack.publish(values, partitions=[rng.randrange(4) for _ in values])
    wait_for(
        lambda: worker.metrics().get("usage_stream_events_consumed_total") == len(values),
        60,
        "every event consumed",
    )
    first, last = (today - timedelta(days=3)).isoformat(), today.isoformat()
    expected = ground_truth(events, "org-a")
    assert {key[0] for key in expected} == {first, (today - timedelta(days=2)).isoformat(), last}

    def served() -> list[dict[str, Any]] | None:
        code, rows = get_usage(worker, client_org_id="org-a", **{"from": first, "to": last})
        assert code == 200, rows
        finals = all(row["final"] == (row["usage_date"] != last) for row in rows)
        return rows if finals and matches(rows, expected) else None

    rows = wait_for(served, 60, "/usage to show org-a's closed and open days")
    assert all(set(row) == COLUMNS for row in rows)
    assert {row["client_org_id"] for row in rows} == {"org-a"}  # org-b's rows absent
    order = [(row["usage_date"], row["user_id"], row["model"]) for row in rows]
    assert order == sorted(order)
    for row in rows:
        for name in ("raw_cost_nano", "markup_cost_nano", "requests", "total_tokens"):
            assert type(row[name]) is int  # JSON integers, exact, not strings or floats
        assert row["raw_cost_usd"] == row["raw_cost_nano"] / 1e9  # REAL as stored
        assert row["markup_cost_usd"] == row["markup_cost_nano"] / 1e9
    # exactly what the business DB's view holds
    view = stack.query(
        "SELECT usage_date, user_id, model, requests, raw_cost_nano, markup_cost_nano, final,"
        " revision FROM usage_daily_live WHERE client_org_id = 'org-a'"
        " ORDER BY usage_date, user_id, model"
    )
    assert view == [
        tuple(row[name] for name in ("usage_date", "user_id", "model", "requests"))
        + (row["raw_cost_nano"], row["markup_cost_nano"], row["final"], row["revision"])
        for row in rows
    ]

    # the other client, and inclusive bounds on one closed day
    code, other = get_usage(worker, client_org_id="org-b", **{"from": first, "to": last})
    assert code == 200 and matches(other, ground_truth(events, "org-b"))
    day = (today - timedelta(days=2)).isoformat()
    code, one_day = get_usage(worker, client_org_id="org-a", **{"from": day, "to": day})
    assert code == 200
    assert matches(one_day, {k: v for k, v in expected.items() if k[0] == day})

    # a late event for a closed day (an existing row and a new one) shows within seconds
    old_key = next(key for key in expected if key[0] == first)
    old_row = next(r for r in rows if (r["usage_date"], r["user_id"], r["model"]) == old_key)
    template = next(e for e in events if e["client_org_id"] == "org-a" and local_date(e) == first)
    late = [
        {
            **template,
            "request_id": "late-1",
            "user_id": old_key[1],
            "model": old_key[2],
            "cost_usd": "0.333333333333",
        },
        {**template, "request_id": "late-2", "user_id": "user-late", "cost_usd": "1.5"},
    ]
    stack.publish([orjson.dumps(event) for event in late])
    published = time.monotonic()
    expected = ground_truth(events + late, "org-a")
    rows = wait_for(served, 10, "the late events in /usage", step=0.1)
    assert time.monotonic() - published < 10
    updated = next(r for r in rows if (r["usage_date"], r["user_id"], r["model"]) == old_key)
    assert updated["final"] == 1
    assert updated["revision"] == old_row["revision"] + 1
    assert updated["requests"] == old_row["requests"] + 1


def test_usage_parameters(stack: Stack) -> None:
    worker = stack.worker().start()
    worker.wait_assigned()
    ok = {"client_org_id": "org-a", "from": "2026-11-01", "to": "2026-11-30"}
    bad: list[tuple[dict[str, str], str]] = [
        ({}, "missing parameter client_org_id"),
        ({"client_org_id": "org-a", "to": "2026-11-30"}, "missing parameter from"),
        ({**ok, "from": "2026-02-30"}, "from must be a date YYYY-MM-DD"),
        ({**ok, "to": "20261130"}, "to must be a date YYYY-MM-DD"),
        ({**ok, "to": "2026-11-30T00:00"}, "to must be a date YYYY-MM-DD"),
        ({**ok, "from": "2026-12-01"}, "from 2026-12-01 is after to 2026-11-30"),
        ({**ok, "from": "2025-11-29"}, "range over 366 days"),
        ({**ok, "client_org_id": ""}, "client_org_id must be 1-128 characters"),
        ({**ok, "client_org_id": "x" * 129}, "client_org_id must be 1-128 characters"),
    ]
    for params, reason in bad:
        code, body = get_usage(worker, **params)
        assert code == 400, (params, body)
        assert set(body) == {"error"} and body["error"].startswith(reason), (params, body)
        assert "\n" not in body["error"]
    code, body = http_get(worker.web + "/usage?client_org_id=a&client_org_id=b&from=2026-11-01")
    assert code == 400
    assert orjson.loads(body) == {"error": "parameter client_org_id given 2 times"}
    # a client without rows (unknown or idle) is an empty bill, over a full leap year too
    leap_year = {"from": "2024-01-01", "to": "2024-12-31"}
    assert get_usage(worker, client_org_id="nobody", **leap_year) == (200, [])
