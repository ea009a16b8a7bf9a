"""Cost estimation for events that arrive without ``cost_usd``.

cost = input_tokens × prompt price + output_tokens × completion price + request price,
from the model's latest stored OpenRouter price, exact in Decimal, then rounded half-even
to a nano-USD. With no known price the cost is 0: the event still counts its tokens and
its request, and is counted in ``estimated_requests`` so the gap is visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from streams.model.money import to_nano

__all__ = ["ModelPrice", "Price", "estimate_cost_nano"]


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
    prompt_usd_per_token: Decimal
    completion_usd_per_token: Decimal
    request_usd: Decimal


def estimate_cost_nano(input_tokens: int, output_tokens: int, price: Price | None) -> int:
    if price is None:
        return 0
    cost = (
        input_tokens * Decimal(price.prompt_usd_per_token)
        + output_tokens * Decimal(price.completion_usd_per_token)
        + Decimal(price.request_usd)
    )
    return max(to_nano(cost), 0)  # OpenRouter marks variable prices with -1
