"""OpenRouter model prices: ``GET {base}/models``.

Prices are decimal strings in USD per token (``prompt``, ``completion``) and per request
(``request``). Keys of inapplicable prices are omitted by newer responses (read as 0);
``"-1"`` means "varies by route" (e.g. ``openrouter/auto``), so such models are skipped
rather than stored with a meaningless price.
"""

from __future__ import annotations

import logging
from decimal import Decimal, InvalidOperation
from typing import Any

from streams.clients.http import ApiClient, MalformedResponse
from streams.model.pricing import ModelPrice

__all__ = ["ModelPrice", "OpenRouterClient", "parse_models"]

log = logging.getLogger(__name__)

_PRICE_KEYS = {
    "prompt_usd_per_token": "prompt",
    "completion_usd_per_token": "completion",
    "request_usd": "request",
}


class OpenRouterClient(ApiClient):
    """The public model catalogue (no API key needed)."""

    source = "openrouter"

    async def model_prices(self) -> list[ModelPrice]:
        response = await self.http.get_json("models")
        try:
            return parse_models(response.payload)
        except MalformedResponse as error:
            raise MalformedResponse(f"openrouter: GET {response.url}: {error}") from None


def parse_models(payload: Any) -> list[ModelPrice]:
    """Validate ``{"data": [Model, ...]}``; any malformed entry rejects the whole answer."""
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise MalformedResponse("expected an object with a 'data' list")
    prices = []
    skipped = []
    for index, model in enumerate(payload["data"]):
        price = _parse_model(model, index)
        if price is None:
            skipped.append(model["id"])
        else:
            prices.append(price)
    if skipped:
        log.info("openrouter: %d models with variable (-1) prices skipped", len(skipped))
    if not prices:
        raise MalformedResponse("no model with a usable price")
    return prices


def _parse_model(model: Any, index: int) -> ModelPrice | None:
    where = f"data[{index}]"
    if not isinstance(model, dict):
        raise MalformedResponse(f"{where} is not an object")
    model_id = model.get("id")
    if not isinstance(model_id, str) or not model_id:
        raise MalformedResponse(f"{where}.id is missing")
    pricing = model.get("pricing")
    if not isinstance(pricing, dict):
        raise MalformedResponse(f"{where} ({model_id}) has no 'pricing' object")
    values = {
        field: _parse_price(pricing.get(key, "0"), f"{where} ({model_id}).pricing.{key}")
        for field, key in _PRICE_KEYS.items()
    }
    if any(value < 0 for value in values.values()):
        return None
    return ModelPrice(model_id=model_id, **values)


def _parse_price(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise MalformedResponse(f"{where} is not a decimal: {value!r}")
    try:
        price = Decimal(value)
    except InvalidOperation:
        raise MalformedResponse(f"{where} is not a decimal: {value!r}") from None
    if not price.is_finite():
        raise MalformedResponse(f"{where} is not finite: {value!r}")
    return price
