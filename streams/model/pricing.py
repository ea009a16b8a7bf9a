"""The billing rule: an event's usage date and cost (:func:`bill`), and the cost estimate
for events that arrive without ``cost_usd`` (:func:`estimate_cost_nano`).

cost = input_tokens × prompt price + output_tokens × completion price + request price,
from the model's latest stored OpenRouter price, exact in Decimal, then rounded half-even
to a nano-USD. With no known price the cost is 0: the event still counts its tokens and
its request, and is counted in ``estimated_requests`` so the gap is visible.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Protocol

from streams.model.money import to_nano

if TYPE_CHECKING:
    from streams.model.business_time import UsageDates
    from streams.model.event import UsageEvent

__all__ = ["ModelPrice", "Price", "bill", "estimate_cost_nano"]


@dataclass(frozen=True)
class ModelPrice:
    """A model's OpenRouter prices as we bill by them, exact; compare with ``==`` to
    detect a price change. Here, not beside the OpenRouter client, so what prices events
    (the replay's reader processes) needs no HTTP client."""

    model_id: str
    prompt_usd_per_token: Decimal
    completion_usd_per_token: Decimal
    request_usd: Decimal


class Price(Protocol):
    """A model's prices (read-only: a frozen ``ModelPrice`` is one)."""

    @property
    def prompt_usd_per_token(self) -> Decimal: ...
    @property
    def completion_usd_per_token(self) -> Decimal: ...
    @property
    def request_usd(self) -> Decimal: ...


def estimate_cost_nano(input_tokens: int, output_tokens: int, price: Price | None) -> int:
    if price is None:
        return 0
    cost = (
        input_tokens * Decimal(price.prompt_usd_per_token)
        + output_tokens * Decimal(price.completion_usd_per_token)
        + Decimal(price.request_usd)
    )
    return max(to_nano(cost), 0)  # OpenRouter marks variable prices with -1


def bill(
    event: UsageEvent, prices: Mapping[str, Price], dates: UsageDates
) -> tuple[str, int, int, int]:
    """``(usage_date, usage_day, cost_nano, estimated)`` of a valid event: the one place
    where an event gets its usage date (and its ordinal) and its cost (``cost_usd`` when
    present, else estimated from the model's latest stored price; no price → 0, still
    counted in ``estimated_requests``; ``estimated`` is 0/1). The hot path calls it per
    new request, the replay's readers per event of the date."""
    day, ordinal = dates(event.event_ms)
    cost = event.cost_nano
    if cost is not None:
        return day, ordinal, cost, 0
    price = prices.get(event.model)
    return day, ordinal, estimate_cost_nano(event.input_tokens, event.output_tokens, price), 1
