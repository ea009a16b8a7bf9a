"""The usage event (CONTRACT §1): validation of producer bytes and the internal codec.

``parse_event`` never raises on bad input: it returns :class:`InvalidEvent` with a
metric-friendly ``reason`` (a small fixed set) and a one-line ``message`` for the
dead-letter ``error`` header.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation

import orjson

from streams.money import to_nano

__all__ = [
    "MAX_EVENT_BYTES",
    "MAX_FUTURE_MS",
    "REASONS",
    "InvalidEvent",
    "UsageEvent",
    "decode_internal",
    "encode_internal",
    "parse_event",
]

MAX_EVENT_BYTES = 64 * 1024
MAX_FUTURE_MS = 24 * 3600 * 1000
# Plausibility bounds that keep every stored integer (and day sums) inside SQLite's int64.
MAX_TOKENS = 10**12
MAX_COST_USD = Decimal(1_000_000)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)
_MAX_EPOCH_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z

#: Every value of the ``reason`` label of ``usage_stream_events_invalid_total``.
REASONS = (
    "too_large",
    "not_json",
    "not_object",
    "missing_field",
    "bad_type",
    "bad_value",
    "future_timestamp",
)

# (field, min length, max length)
_STRING_FIELDS = (
    ("request_id", 1, 128),
    ("client_org_id", 1, 128),
    ("user_id", 1, 256),
    ("model", 1, 256),
)


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """A valid usage event. Money is integer nano-USD; ``cost_nano`` is None when absent."""

    request_id: str
    client_org_id: str
    user_id: str
    model: str
    input_tokens: int
    output_tokens: int
    cost_nano: int | None
    event_ms: int

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class InvalidEvent:
    reason: str
    message: str


class _Invalid(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def parse_event(raw: bytes | None, now_ms: int) -> UsageEvent | InvalidEvent:
    """Validate producer bytes against CONTRACT §1; ``now_ms`` bounds future timestamps."""
    try:
        return _parse(raw, now_ms)
    except _Invalid as invalid:
        return InvalidEvent(invalid.reason, invalid.message)


def _parse(raw: bytes | None, now_ms: int) -> UsageEvent:
    if raw is None:
        raise _Invalid("not_json", "empty message value")
    if len(raw) > MAX_EVENT_BYTES:
        raise _Invalid("too_large", f"value is {len(raw)} bytes, limit {MAX_EVENT_BYTES}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise _Invalid("not_json", f"not JSON: {_first_line(str(error))}") from None
    if not isinstance(obj, dict):
        raise _Invalid("not_object", f"JSON value is a {type(obj).__name__}, not an object")

    strings = [_string(obj, name, low, high) for name, low, high in _STRING_FIELDS]
    input_tokens = _count(obj, "input_tokens")
    output_tokens = _count(obj, "output_tokens")
    if "total_tokens" in obj and obj["total_tokens"] is not None:
        total = _count(obj, "total_tokens")
        if total != input_tokens + output_tokens:
            raise _Invalid(
                "bad_value",
                f"total_tokens {total} != input_tokens + output_tokens "
                f"{input_tokens + output_tokens}",
            )
    cost_nano = _cost_nano(obj, raw)
    event_ms = _timestamp_ms(obj)
    if event_ms > now_ms + MAX_FUTURE_MS:
        raise _Invalid("future_timestamp", "timestamp is more than 24 h in the future")
    request_id, client_org_id, user_id, model = strings
    return UsageEvent(
        request_id, client_org_id, user_id, model, input_tokens, output_tokens, cost_nano, event_ms
    )


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else text


def _require(obj: dict, name: str) -> object:
    if name not in obj or obj[name] is None:
        raise _Invalid("missing_field", f"missing required field {name!r}")
    return obj[name]


def _string(obj: dict, name: str, low: int, high: int) -> str:
    value = _require(obj, name)
    if not isinstance(value, str):
        raise _Invalid("bad_type", f"{name} must be a string, got {type(value).__name__}")
    if not low <= len(value) <= high:
        raise _Invalid("bad_value", f"{name} must be {low}-{high} characters, got {len(value)}")
    return value


def _count(obj: dict, name: str) -> int:
    value = _require(obj, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid("bad_type", f"{name} must be an integer, got {type(value).__name__}")
    if not 0 <= value <= MAX_TOKENS:
        raise _Invalid("bad_value", f"{name} must be between 0 and {MAX_TOKENS}, got {value}")
    return value


def _cost_nano(obj: dict, raw: bytes) -> int | None:
    value = obj.get("cost_usd")
    if value is None:
        return None
    if isinstance(value, bool):
        raise _Invalid("bad_type", "cost_usd must be a number or a decimal string, got bool")
    if isinstance(value, float):
        amount = _exact_json_number(value, raw)
    elif isinstance(value, int | str):
        try:
            amount = Decimal(value.strip() if isinstance(value, str) else value)
        except InvalidOperation:
            raise _Invalid("bad_value", f"cost_usd is not a decimal: {value!r:.40}") from None
    else:
        raise _Invalid(
            "bad_type", f"cost_usd must be a number or a decimal string, got {type(value).__name__}"
        )
    if not amount.is_finite():
        raise _Invalid("bad_value", "cost_usd must be finite")
    if not 0 <= amount <= MAX_COST_USD:
        raise _Invalid(
            "bad_value", f"cost_usd must be between 0 and {MAX_COST_USD}, got {amount:.40}"
        )
    return to_nano(amount)


def _exact_json_number(value: float, raw: bytes) -> Decimal:
    """The exact decimal written in the JSON text, although orjson parsed it as a float.

    A decimal of at most 15 significant digits survives the trip through a double, and
    ``repr`` gives it back. Longer texts (rare) are re-read with the stdlib parser.
    """
    text = repr(value)
    digits = text.split("e")[0].replace("-", "").replace(".", "").strip("0")
    if len(digits) <= 15:
        return Decimal(text)
    return Decimal(json.loads(raw, parse_float=Decimal)["cost_usd"])


def _timestamp_ms(obj: dict) -> int:
    value = _require(obj, "timestamp")
    if isinstance(value, bool):
        raise _Invalid("bad_type", "timestamp must be an RFC 3339 string or epoch milliseconds")
    if isinstance(value, int):
        if not 0 <= value <= _MAX_EPOCH_MS:
            raise _Invalid("bad_value", f"timestamp (epoch ms) out of range: {value}")
        return value
    if not isinstance(value, str):
        raise _Invalid("bad_type", "timestamp must be an RFC 3339 string or epoch milliseconds")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _Invalid("bad_value", f"timestamp is not RFC 3339: {value!r:.60}") from None
    if moment.tzinfo is None or "T" not in value.upper():
        raise _Invalid("bad_value", f"timestamp needs a date, a time and an offset: {value!r:.60}")
    # exact integer arithmetic (timedelta), floored to the millisecond
    return (moment - _EPOCH) // _MILLISECOND


# Internal codec: the compact form forwarded on the repartition topic ---------------------


def encode_internal(event: UsageEvent, source: str) -> bytes:
    """Serialize a validated event plus its ``topic/partition/offset`` origin."""
    return orjson.dumps(
        [
            event.request_id,
            event.client_org_id,
            event.user_id,
            event.model,
            event.input_tokens,
            event.output_tokens,
            event.cost_nano,
            event.event_ms,
            source,
        ]
    )


def decode_internal(raw: bytes) -> tuple[UsageEvent, str]:
    fields = orjson.loads(raw)
    return UsageEvent(*fields[:8]), fields[8]
