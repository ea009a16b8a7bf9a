"""Expected daily bills, computed from the test events independently of the pipeline.

Money with Decimal and half-even rounding (to the nano-USD on ingest, markup per row, PLN
per row), usage dates with zoneinfo in Europe/Warsaw, the first copy of a request_id
counting. Shared by the end-to-end tests that check ``usage_daily`` row by row
(tests/replay, tests/scale); none of it imports the pipeline's code.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import NamedTuple
from zoneinfo import ZoneInfo

from tests.harness import event_ms

WARSAW = ZoneInfo("Europe/Warsaw")
MARKUP = Decimal("1.3")
NANO = Decimal(1_000_000_000)

Key = tuple[str, str, str, str]  # client_org_id, user_id, model, usage_date
#: model -> (USD per prompt token, USD per completion token, USD per request)
Prices = Mapping[str, tuple[Decimal, Decimal, Decimal]]
#: usage date -> (NBP table number, USD mid) that applies to it, or None while unknown
RateFor = Callable[[date], tuple[str, Decimal] | None]


class Expected(NamedTuple):
    """One expected ``usage_daily`` row (every column but the key, revision, updated_at)."""

    input_tokens: int
    output_tokens: int
    total_tokens: int
    requests: int
    estimated_requests: int
    raw_cost_nano: int
    markup_cost_nano: int
    markup_cost_pln_nano: int | None
    raw_cost_usd: float
    markup_cost_usd: float
    markup_cost_pln: float | None
    usd_pln_rate: str | None
    nbp_table_no: str | None


def half_even(value: Decimal) -> int:
    return int(value.to_integral_value(rounding=ROUND_HALF_EVEN))


def local_midnight_ms(day: date) -> int:
    """Epoch ms of 00:00 local time (Europe/Warsaw) on ``day``."""
    return int(datetime(day.year, day.month, day.day, tzinfo=WARSAW).timestamp() * 1000)


def local_date(event: dict) -> str:
    """The event's usage date: its time's calendar date in Europe/Warsaw."""
    return datetime.fromtimestamp(event_ms(event) / 1000, UTC).astimezone(WARSAW).date().isoformat()


def cost_nano(event: dict, prices: Prices | None = None) -> tuple[int, bool]:
    """(raw cost in nano-USD, estimated?): ``cost_usd`` rounded half-even, else the
    model's price (0 for a model without one)."""
    if "cost_usd" in event:
        return half_even(Decimal(str(event["cost_usd"])) * NANO), False
    price = (prices or {}).get(event["model"])
    if price is None:
        return 0, True
    prompt, completion, request = price
    cost = event["input_tokens"] * prompt + event["output_tokens"] * completion + request
    return half_even(cost * NANO), True


def _to_float(nano: int | None) -> float | None:
    return None if nano is None else float(Decimal(nano) / NANO)


def ground_truth(
    events: Iterable[dict],
    prices: Prices | None = None,
    rate_for: RateFor | None = None,
    markup: Decimal | Callable[[Key], Decimal] = MARKUP,
) -> dict[Key, Expected]:
    """Expected rows of the unique events (the first copy of a request_id counts).

    ``rate_for`` gives the NBP rate that applies to a usage date (None: PLN unknown, as
    when NBP cannot be reached); ``markup`` the multiplier, or the multiplier of each row
    by its key (a price book)."""
    seen: set[str] = set()
    totals: dict[Key, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for event in events:
        if event["request_id"] in seen:
            continue
        seen.add(event["request_id"])
        key = (event["client_org_id"], event["user_id"], event["model"], local_date(event))
        row = totals[key]
        cost, estimated = cost_nano(event, prices)
        row[0] += event["input_tokens"]
        row[1] += event["output_tokens"]
        row[2] += 1
        row[3] += int(estimated)
        row[4] += cost
    expected = {}
    for key, (inp, out, requests, estimated, raw) in totals.items():
        rate = rate_for(date.fromisoformat(key[3])) if rate_for else None
        table_no, mid = rate if rate is not None else (None, None)
        factor = markup(key) if callable(markup) else markup
        marked_up = half_even(Decimal(raw) * factor)
        pln = half_even(Decimal(marked_up) * mid) if mid is not None else None
        expected[key] = Expected(
            inp,
            out,
            inp + out,
            requests,
            estimated,
            raw,
            marked_up,
            pln,
            _to_float(raw),
            _to_float(marked_up),
            _to_float(pln),
            str(mid) if mid is not None else None,
            table_no,
        )
    return expected


def on_day(rows: Mapping[Key, tuple], day: date | str) -> dict[Key, tuple]:
    """The rows of one usage date."""
    return {key: value for key, value in rows.items() if key[3] == str(day)}
