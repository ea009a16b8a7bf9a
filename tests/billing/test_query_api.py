"""``GET /v1/usage/query`` (docs/contract.md §6) on a real worker, against ground truth.

Events over three past days and today for three clients, several users and models, with
copies on other partitions, a price-book rule for one client from today, and NBP rates
known for the past days but not today. The expected rows are tests/ground_truth.py's
(Decimal, half-even, nothing of the pipeline's code) summed here per period and key.
"""

from __future__ import annotations

import asyncio
import csv
import io
import random
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from tests.billing.helpers import event, local_today, publish, seed_rates, settled
from tests.ground_truth import ground_truth
from tests.harness import Stack, Worker

MODELS = ("openai/gpt-4o-mini", "anthropic/claude-3.5-sonnet")
BOTH = ("user_id", "model")  # group_by's keys, in the rows' order
SUMMED = ("input_tokens", "output_tokens", "total_tokens", "requests", "estimated_requests")


def get(worker: Worker, params: list[tuple[str, str]], accept: str | None = None):
    url = f"{worker.web}/v1/usage/query?{urllib.parse.urlencode(params)}"
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers.get("Content-Type"), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type"), error.read()


def nano_text(nano: int) -> str:
    return f"{Decimal(nano) / 10**9:.9f}"


def expected_rows(
    truth: dict, first: str, last: str, clients: set[str] | None, granularity: str, group_by
) -> list[dict[str, Any]]:
    """The query's rows from ground-truth ``usage_daily`` rows, summed here."""
    sums: dict[tuple, dict[str, Any]] = {}
    for (client, user, model, day), row in truth.items():
        if not first <= day <= last or (clients is not None and client not in clients):
            continue
        period = {"day": (day,), "month": (day[:7],), "total": ()}[granularity]
        keys = (*period, client, *(user if k == "user_id" else model for k in group_by))
        total = sums.setdefault(
            keys,
            {name: 0 for name in SUMMED} | {"raw": 0, "markup": 0, "pln": 0, "final": 1},
        )
        for name in SUMMED:
            total[name] += getattr(row, name)
        total["raw"] += row.raw_cost_nano
        total["markup"] += row.markup_cost_nano
        pln = row.markup_cost_pln_nano
        total["pln"] = None if pln is None or total["pln"] is None else total["pln"] + pln
        total["final"] = min(total["final"], int(day < str(local_today())))
    period_key = {"day": ("usage_date",), "month": ("usage_month",), "total": ()}[granularity]
    names = (*period_key, "client_org_id", *group_by)
    rows = []
    for keys in sorted(sums):
        total = sums[keys]
        rows.append(
            dict(zip(names, keys, strict=True))
            | {name: total[name] for name in SUMMED}
            | {
                "raw_cost_usd": nano_text(total["raw"]),
                "markup_cost_usd": nano_text(total["markup"]),
                "markup_cost_pln": None if total["pln"] is None else nano_text(total["pln"]),
                "final": total["final"],
            }
        )
    return rows


def test_query_answers_exactly_what_the_ground_truth_sums_to(stack: Stack) -> None:
    today = local_today()
    days = [today - timedelta(days=k) for k in (3, 2, 1, 0)]
    rates = seed_rates(stack, days[0], days[-2] - timedelta(days=1))  # today: PLN pending
    assert stack.cli("markup", "set", "--client", "org-b", "--multiplier", "1.75",
                     "--from", today.isoformat()).returncode == 0  # fmt: skip
    rng = random.Random(23)
    events = []
    for n in range(240):
        day = days[n % 4]
        events.append(
            event(
                f"q-{n}",
                f"org-{'abc'[rng.randrange(3)]}",
                day,
                f"0.{rng.randrange(10**12):012d}",
                user=f"user-{rng.randrange(3)}",
                model=rng.choice(MODELS),
                tokens=(rng.randrange(5000), rng.randrange(2000)),
                second=n,
            )
        )
    copies = rng.sample(events, 30)
    worker = stack.worker().start()
    worker.wait_assigned()
    values = [orjson.dumps(e) for e in events + copies]
    stack.publish(values, partitions=[rng.randrange(4) for _ in values])
    settled(stack, len(events))

    def markup(key: tuple) -> Decimal:
        return Decimal("1.75") if key[0] == "org-b" and key[3] == str(today) else Decimal("1.3")

    truth = {
        (c, u, m, d): row
        for (c, u, m, d), row in ground_truth(events, rate_for=rates.get, markup=markup).items()
    }
    first, last = str(days[0]), str(today)
    cases: list[tuple[list[tuple[str, str]], set[str] | None, str, tuple[str, ...]]] = [
        ([], None, "day", ()),
        (
            [("client_org_id", "org-a"), ("client_org_id", "org-c"), ("granularity", "month")],
            {"org-a", "org-c"},
            "month",
            (),
        ),
        ([("granularity", "total"), ("group_by", "user_id,model")], None, "total", BOTH),
        (
            [("granularity", "day"), ("group_by", "model"), ("client_org_id", "org-b")],
            {"org-b"},
            "day",
            ("model",),
        ),
        ([("group_by", "model,user_id"), ("granularity", "month")], None, "month", BOTH),
    ]  # fmt: skip
    before = time.time()
    for extra, clients, granularity, group_by in cases:
        code, kind, body = get(worker, [("from", first), ("to", last), *extra])
        assert code == 200 and kind.startswith("application/json"), body
        answer = orjson.loads(body)
        assert set(answer) == {"time_zone", "as_of", "granularity", "group_by", "rows"}
        assert answer["time_zone"] == "Europe/Warsaw"
        assert answer["granularity"] == granularity and answer["group_by"] == list(group_by)
        as_of = datetime.fromisoformat(answer["as_of"].replace("Z", "+00:00")).timestamp()
        assert before - 1 <= as_of <= time.time() + 1
        want = expected_rows(truth, first, last, clients, granularity, group_by)
        assert answer["rows"] == want, extra
        # the same rows as RFC 4180 CSV
        code, kind, body = get(worker, [("from", first), ("to", last), *extra], "text/csv")
        assert code == 200 and kind.startswith("text/csv"), body
        text = body.decode()
        assert text.endswith("\r\n")
        parsed = list(csv.DictReader(io.StringIO(text, newline="")))
        assert parsed == [{k: "" if v is None else str(v) for k, v in row.items()} for row in want]
    # one day, one client: inclusive bounds; a client without usage: no rows
    one = str(days[1])
    code, _, body = get(worker, [("from", one), ("to", one), ("client_org_id", "org-a")])
    assert orjson.loads(body)["rows"] == expected_rows(truth, one, one, {"org-a"}, "day", ())
    code, _, body = get(worker, [("from", first), ("to", last), ("client_org_id", "nobody")])
    assert code == 200 and orjson.loads(body)["rows"] == []
    # today is provisional, the closed days final; today's PLN waits for its rate
    code, _, body = get(worker, [("from", first), ("to", last), ("granularity", "total")])
    for row in orjson.loads(body)["rows"]:
        assert row["final"] == 0 and row["markup_cost_pln"] is None
    assert worker.stop() == 0


def test_every_bad_parameter_is_a_400_with_one_line(stack: Stack) -> None:
    worker = stack.worker().start()
    worker.wait_assigned()
    ok = [("from", "2026-11-01"), ("to", "2026-11-30")]
    bad: list[tuple[list[tuple[str, str]], str]] = [
        ([], "missing parameter from"),
        ([("from", "2026-11-01")], "missing parameter to"),
        ([("from", "2026-11-31"), ("to", "2026-12-01")], "from must be a date YYYY-MM-DD"),
        ([("from", "2026-11-01"), ("to", "yesterday")], "to must be a date YYYY-MM-DD"),
        ([*ok, ("from", "2026-11-02")], "parameter from given 2 times"),
        ([("from", "2026-12-01"), ("to", "2026-11-30")], "from 2026-12-01 is after to 2026-11-30"),
        ([("from", "2000-01-01"), ("to", "2026-11-30")], "range over 3660 days"),
        ([*ok, ("granularity", "week")], "granularity must be one of day, month, total"),
        ([*ok, ("granularity", "day"), ("granularity", "month")], "parameter granularity given"),
        ([*ok, ("group_by", "client_org_id")], "group_by takes user_id and model"),
        ([*ok, ("group_by", "user_id,user_id")], "group_by names a key twice"),
        ([*ok, ("group_by", "model"), ("group_by", "user_id")], "parameter group_by given 2"),
        ([*ok, ("client_org_id", "")], "client_org_id must be 1-128 characters"),
        ([*ok, ("client_org_id", "x" * 129)], "client_org_id must be 1-128 characters"),
        ([*ok, ("client", "org-a")], "unknown parameter 'client'"),
    ]
    for params, reason in bad:
        for accept in (None, "text/csv"):
            code, kind, body = get(worker, params, accept)
            assert code == 400 and kind.startswith("application/json"), (params, body)
            answer = orjson.loads(body)
            assert set(answer) == {"error"} and answer["error"].startswith(reason), (params, body)
            assert "\n" not in answer["error"]
    # an empty group_by is none; a leap year of nothing is an empty answer
    code, _, body = get(worker, [("from", "2024-01-01"), ("to", "2024-12-31"), ("group_by", "")])
    assert code == 200 and orjson.loads(body)["rows"] == []
    assert worker.stop() == 0


def test_a_worker_without_the_summary_db_refuses_with_the_reason(stack: Stack) -> None:
    worker = stack.worker(SUMMARY_WRITER="false").start()
    worker.wait_assigned()
    code, _, body = get(worker, [("from", "2026-11-01"), ("to", "2026-11-30")])
    assert code == 404 and "summary writer" in orjson.loads(body)["error"]
    assert worker.stop() == 0


def seed_usage_daily(db: Path, keys: list[tuple[str, str, str]]) -> None:
    """A summary DB migrated by the worker's own code with one closed ``usage_daily`` row
    per (client, user, date) of ``keys`` (1 request, 0.1 USD raw, 0.13 marked up, PLN
    unknown), written before the worker starts."""
    from tables.summary_db.schema import connect

    async def migrate() -> None:
        await (await connect(db)).close()

    db.parent.mkdir(parents=True, exist_ok=True)
    asyncio.run(migrate())
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO usage_daily (client_org_id, user_id, model, usage_date, input_tokens,"
            " output_tokens, total_tokens, requests, estimated_requests, raw_cost_nano,"
            " markup_cost_nano, raw_cost_usd, markup_cost_usd, revision, updated_at,"
            " markup_multiplier)"
            " VALUES (?, ?, 'm', ?, 1, 1, 2, 1, 0, 100000000, 130000000, 0.1, 0.13, 1, 'x',"
            " '1.3')",
            keys,
        )
        conn.execute(
            "INSERT INTO closed_days SELECT DISTINCT usage_date, 'x', 'test' FROM usage_daily"
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_the_row_and_client_limits(stack: Stack) -> None:
    """More than 100,000 rows in an answer is a 400 (narrow it); exactly 100,000 answers.
    More than 1000 client ids cannot reach the parameter check over HTTP: the request line
    is over the server's 8190 bytes first, and aiohttp answers 400 itself."""
    users = 100_001
    keys = [
        ("org-x" if n == users - 1 else f"org-{n % 10}", f"user-{n}", "2025-06-0" + "12"[n % 2])
        for n in range(users)
    ]
    seed_usage_daily(stack.db_path, keys)
    worker = stack.worker().start()
    worker.wait_assigned()
    year = [("from", "2025-01-01"), ("to", "2025-12-31")]
    per_user = [*year, ("granularity", "total"), ("group_by", "user_id")]
    for accept in (None, "text/csv"):
        code, kind, body = get(worker, per_user, accept)  # 100,001 rows
        assert code == 400 and kind.startswith("application/json"), body[:300]
        assert orjson.loads(body) == {
            "error": "the query answers more than 100000 rows: narrow the dates, the clients,"
            " the granularity or group_by"
        }
    ten = [("client_org_id", f"org-{n}") for n in range(10)]  # all but org-x: 100,000 rows
    code, kind, body = get(worker, per_user + ten, "text/csv")
    assert code == 200 and kind.startswith("text/csv"), body[:300]
    lines = body.decode().split("\r\n")
    assert lines[0].startswith("client_org_id,user_id,") and lines[-1] == ""
    assert len(lines) == 1 + 100_000 + 1
    code, _, body = get(worker, [*year, ("client_org_id", "org-x"), ("group_by", "user_id")])
    assert code == 200 and [row["user_id"] for row in orjson.loads(body)["rows"]] == [
        f"user-{users - 1}"
    ]

    # clients: 1001 ids make a request line over 8190 bytes, refused by the HTTP server
    many = [("client_org_id", f"c{n}") for n in range(1001)]
    code, _, body = get(worker, [*year, *many])
    assert code == 400 and b"Got more than 8190 bytes" in body, body[:300]
    # ... while 400 short ones fit and answer (none of them has usage)
    code, _, body = get(worker, [*year, *many[:400]])
    assert code == 200 and orjson.loads(body)["rows"] == []
    assert worker.stop() == 0


def test_the_limits_of_the_parameter_check() -> None:
    """The checks themselves, without the HTTP server's request-line limit: 1000 clients
    pass, 1001 are refused with one line."""
    from multidict import MultiDict

    from agents.web.server import BadRequest
    from agents.web.usage_query import MAX_CLIENTS, parse_query

    class Request:
        def __init__(self, pairs: list[tuple[str, str]]) -> None:
            self.query = MultiDict(pairs)

    dates = [("from", "2026-11-01"), ("to", "2026-11-30")]
    clients = [("client_org_id", f"org-{n}") for n in range(MAX_CLIENTS + 1)]
    assert MAX_CLIENTS == 1000
    query = parse_query(Request(dates + clients[:MAX_CLIENTS]))
    assert len(query.clients) == 1000
    # a repeated id counts once
    query = parse_query(Request(dates + clients[:MAX_CLIENTS] + clients[:5]))
    assert len(query.clients) == 1000
    with pytest.raises(BadRequest, match=r"^more than 1000 client_org_id values \(1001\)$"):
        parse_query(Request(dates + clients))


def test_usage_dates_follow_a_non_default_business_timezone(stack: Stack) -> None:
    """With ``BUSINESS_TIMEZONE=America/New_York`` an event at 03:00 UTC belongs to the
    previous New York date (and month), where Europe/Warsaw would put it on the UTC one;
    the answer names the zone."""
    new_york = ZoneInfo("America/New_York")
    day = datetime.now(UTC).date() - timedelta(days=3)
    first = (day.replace(day=1) - timedelta(days=1)).replace(day=1)  # of the previous month
    moments = [
        datetime(first.year, first.month, first.day, 3, tzinfo=UTC),  # NY: the month before
        datetime(day.year, day.month, day.day, 3, tzinfo=UTC),  # NY: the day before
        datetime(day.year, day.month, day.day, 12, tzinfo=UTC),  # NY: that day
        datetime(day.year, day.month, day.day, 13, tzinfo=UTC),
    ]
    events = [
        {
            "request_id": f"tz-{n}",
            "client_org_id": "org-tz",
            "user_id": "u",
            "model": "openai/gpt-4o-mini",
            "input_tokens": 10,
            "output_tokens": 5,
            "cost_usd": "0.1",
            "timestamp": moment.isoformat(timespec="milliseconds"),
        }
        for n, moment in enumerate(moments)
    ]
    # New York is 4-5 h behind UTC: 03:00 UTC is the evening before there
    assert moments[1].astimezone(new_york).date() == day - timedelta(days=1)
    worker = stack.worker(BUSINESS_TIMEZONE="America/New_York").start()
    worker.wait_assigned()
    publish(stack, events)
    settled(stack, len(events))

    def expect(period: Callable[[datetime], str]) -> dict[str, tuple[int, str]]:
        counts: dict[str, int] = {}
        for moment in moments:
            key = period(moment.astimezone(new_york))
            counts[key] = counts.get(key, 0) + 1
        return {key: (n, f"{Decimal('0.13') * n:.9f}") for key, n in counts.items()}

    span = [("from", str(first - timedelta(days=40))), ("to", str(day))]
    for granularity, key, period in (
        ("day", "usage_date", lambda local: local.date().isoformat()),
        ("month", "usage_month", lambda local: local.strftime("%Y-%m")),
    ):
        wanted = expect(period)
        code, _, body = get(worker, [*span, ("granularity", granularity)])
        assert code == 200, body
        answer = orjson.loads(body)
        assert answer["time_zone"] == "America/New_York"
        got = {row[key]: (row["requests"], row["markup_cost_usd"]) for row in answer["rows"]}
        assert got == wanted, granularity
        assert all(row["final"] == 1 for row in answer["rows"])
    # the 03:00 UTC events are on the previous New York date, never on the UTC one
    code, _, body = get(worker, [("from", str(day)), ("to", str(day))])
    assert [(row["usage_date"], row["requests"]) for row in orjson.loads(body)["rows"]] == [
        (str(day), 2)
    ]
    assert worker.stop() == 0
