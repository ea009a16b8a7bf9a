"""The usage event (docs/contract.md §1): validation of producer bytes.

``parse_event`` never raises on bad input: it returns :class:`InvalidEvent` with a
metric-friendly ``reason`` (a small fixed set) and a one-line ``message`` for the
dead-letter ``error`` header.

Two validators, one answer. Validation is the hot path's first cost, so the common valid
event goes through a *fast path*: one msgspec decode into a typed, constrained struct
(lengths, token and epoch bounds checked in C) plus the few rules a type cannot say
(exact cost, RFC 3339, future bound, total). Anything the fast path does not accept, for
whatever reason, is handed to the *reference validator*: explicit checks over the orjson
object that decide the precise reason and message. The fast path only ever *accepts*
(it never produces an :class:`InvalidEvent`), and it shares the value conversions with
the reference (but for a cost written as a JSON number: see :func:`_float_nano`), so a
valid event gives the same :class:`UsageEvent` either way and every invalid one gets the
reference's reason. ``tests/unit/streams/model/test_event_properties.py`` checks with
hypothesis that the fast path never accepts what the reference rejects, nor accepts it
differently.

Why the fast decoder forbids unknown fields: msgspec *skips* an unknown field's value
without checking it as strictly as orjson does (invalid UTF-8, numbers beyond a double
are let through there). An event with extra fields is therefore first parsed by orjson
(the reference's parser, which rejects such bytes), and only then decoded by a second
msgspec decoder that ignores unknown fields.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import (
    MAX_EMAX,
    MIN_EMIN,
    ROUND_HALF_EVEN,
    Context,
    Decimal,
    InvalidOperation,
)
from math import copysign
from typing import Annotated, Protocol, final

import msgspec
import orjson
from msgspec import Meta

__all__ = [
    "CONFLICT",
    "MAX_EVENT_BYTES",
    "MAX_FUTURE_MS",
    "REASONS",
    "InvalidEvent",
    "UsageEvent",
    "event_time_hint",
    "KafkaRecord",
    "parse_event",
    "parse_records",
    "received_ms",
]

MAX_EVENT_BYTES = 64 * 1024
MAX_FUTURE_MS = 24 * 3600 * 1000
# Plausibility bounds that keep every stored integer (and day sums) inside SQLite's int64.
MAX_TOKENS = 10**12
MAX_COST_USD = Decimal(1_000_000)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_EPOCH_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z

#: The reason of a later copy of a request whose billing fields differ from the first's
#: (docs/contract.md §1): decided by the dedupe (agents/hot_path/dedupe.py), never by
#: :func:`parse_event`.
CONFLICT = "conflicting_duplicate"

#: Every value of the ``reason`` label of ``usage_stream_events_invalid_total``.
REASONS = (
    "too_large",
    "not_json",
    "not_object",
    "missing_field",
    "bad_type",
    "bad_value",
    "future_timestamp",
    CONFLICT,
)

# (field, min length, max length); lengths are characters (code points, Python ``len``).
_STRING_FIELDS = (
    ("request_id", 1, 128),
    ("client_org_id", 1, 128),
    ("user_id", 1, 256),
    ("model", 1, 256),
)
_FIELDS = frozenset(
    [name for name, _, _ in _STRING_FIELDS]
    + ["input_tokens", "output_tokens", "total_tokens", "cost_usd", "timestamp"]
)


class UsageEvent(msgspec.Struct, frozen=True, gc=False):
    """A valid usage event. Money is integer nano-USD; ``cost_nano`` is None when absent.

    A frozen msgspec struct rather than a frozen dataclass: it is built once per event on
    the hot path, and a frozen dataclass's ``__init__`` (one ``object.__setattr__`` per
    field) cost more than the whole msgspec decode. Still immutable, hashable and equal
    by value, with the same positional field order. ``gc=False``: it only ever holds
    strings and integers, so it cannot be part of a reference cycle.
    """

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


@final  # no subclasses: ``type(event) is InvalidEvent`` tells the two results apart
@dataclass(frozen=True, slots=True)
class InvalidEvent:
    reason: str
    message: str


class _Invalid(Exception):
    """A rejection by the reference validator: the ``InvalidEvent`` to return."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# Value conversions shared by both validators ----------------------------------------------

_ZERO = Decimal(0)
_NANO_EXPONENT = Decimal("1e-9")
# Exact arithmetic whatever the thread's current decimal context says: a cost within the
# bounds has at most 7 + 9 digits once rounded to the nano, far below this precision.
_EXACT = Context(
    prec=40, rounding=ROUND_HALF_EVEN, Emax=MAX_EMAX, Emin=MIN_EMIN, traps=[InvalidOperation]
)
_NANO_PER_USD = 1_000_000_000
_MAX_COST_NANO = 1_000_000 * _NANO_PER_USD
_NANO_PADDING = tuple("0" * (9 - decimals) for decimals in range(10))
# Exponents this far out decide nothing more (see _json_number) but overflow Decimal.
_EXPONENT_CLAMP = 10**6


def _json_number(text: str) -> Decimal:
    """The exact value of a JSON number literal.

    ``Decimal`` reads every JSON number exactly but rejects exponents beyond its range
    (``1e-99999999999999999999``, which orjson reads as 0.0). Clamping such an exponent to
    ±10**6 changes no outcome: a literal has at most 64 KiB of digits, so the value stays
    above a million (rejected) or below a nano (rounds to 0, or is negative: rejected).
    """
    try:
        return Decimal(text)
    except InvalidOperation:
        mantissa, _, exponent = text.lower().partition("e")
        negative = exponent.startswith("-")
        digits = exponent.lstrip("+-").lstrip("0") or "0"
        # no int() of a long digit string: Python limits those to 4300 digits
        magnitude = min(_EXPONENT_CLAMP, int(digits)) if len(digits) <= 7 else _EXPONENT_CLAMP
        return Decimal(f"{mantissa}e{-magnitude if negative else magnitude}")


def _decimal_nano(amount: Decimal) -> int:
    """``amount`` USD as nano-USD, rounded half-even exactly once, within the bounds.

    ``quantize`` rounds the exact value, so a cost with more than 28 significant digits is
    not rounded twice (``streams.model.money.to_nano`` multiplies in the default 28-digit
    context first).
    """
    if not amount.is_finite():
        raise _Invalid("bad_value", "cost_usd must be finite")
    if not _ZERO <= amount <= MAX_COST_USD:
        raise _Invalid(
            "bad_value", f"cost_usd must be between 0 and {MAX_COST_USD}, got {amount:.40}"
        )
    return int(amount.quantize(_NANO_EXPONENT, ROUND_HALF_EVEN, _EXACT).scaleb(9, _EXACT))


def _string_nano(value: str) -> int:
    """A decimal-string cost (or a JSON number's literal text) as nano-USD.

    The common ``"0.000218700"`` (ASCII digits, at most 9 decimals, short) is converted by
    a single ``int`` of its digits padded to 9 decimals. Everything else, and every
    error, goes through ``Decimal``, which accepts what the reference always accepted for
    strings (surrounding whitespace, ``1e-3``, ``+1``, ``1_000``, non-ASCII digits) and
    nothing more.
    """
    whole, _, fraction = value.partition(".")
    digits = whole + fraction
    if len(value) <= 20 and len(fraction) <= 9 and digits.isdigit() and digits.isascii():
        nano = int(digits + _NANO_PADDING[len(fraction)])
        if nano <= _MAX_COST_NANO:
            return nano
    try:
        amount = Decimal(value.strip())
    except InvalidOperation:
        raise _Invalid("bad_value", f"cost_usd is not a decimal: {value!r:.40}") from None
    return _decimal_nano(amount)


def _int_nano(value: int) -> int:
    if 0 <= value <= 1_000_000:
        return value * _NANO_PER_USD
    return _decimal_nano(Decimal(value))  # raises, with the reference's message


def _rfc3339_ms(value: str) -> int:
    """Epoch milliseconds of an RFC 3339 string, floored to the millisecond, exactly."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _Invalid("bad_value", f"timestamp is not RFC 3339: {value!r:.60}") from None
    # ("T" in value: the common case, without upper()'s copy)
    if moment.tzinfo is None or ("T" not in value and "T" not in value.upper()):
        raise _Invalid("bad_value", f"timestamp needs a date, a time and an offset: {value!r:.60}")
    if "\x00" in value:  # Python 3.11's parser stops at a NUL: "...Z\x00junk" was accepted
        raise _Invalid("bad_value", f"timestamp is not RFC 3339: {value!r:.60}")
    # exact integer arithmetic; 0 <= seconds < 86400 and 0 <= microseconds < 10**6, so this
    # is (moment - epoch) // 1 ms, without the cost of timedelta division
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


# Fast path ---------------------------------------------------------------------------------

_Tokens = Annotated[int, Meta(ge=0, le=MAX_TOKENS)]
_EpochMs = Annotated[int, Meta(ge=0, le=_MAX_EPOCH_MS)]


class _Wire(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """The producer's JSON object as the fast path reads it (same bounds as the reference).

    msgspec in strict mode, as the reference: a bool is not an integer, ``1.0`` is not an
    integer, ``null`` is not a string. A ``cost_usd`` with a fraction or an exponent is a
    double here (see :func:`_float_nano` for why that is still exact).
    """

    request_id: Annotated[str, Meta(min_length=1, max_length=128)]
    client_org_id: Annotated[str, Meta(min_length=1, max_length=128)]
    user_id: Annotated[str, Meta(min_length=1, max_length=256)]
    model: Annotated[str, Meta(min_length=1, max_length=256)]
    input_tokens: _Tokens
    output_tokens: _Tokens
    timestamp: _EpochMs | str
    total_tokens: _Tokens | None = None
    cost_usd: int | float | str | None = None


class _WireWithExtras(_Wire, forbid_unknown_fields=False):
    """The same, ignoring unknown fields: only for bytes orjson has already accepted."""


_STRICT_DECODER = msgspec.json.Decoder(_Wire)
_EXTRAS_DECODER = msgspec.json.Decoder(_WireWithExtras)


class _Undecided(Exception):
    """The fast path gives up; the reference validator decides (and words the reason)."""


def _float_nano(value: float) -> int:
    """Nano-USD of a cost the fast path decoded as a double, when the double decides it.

    The reference reads the literal exactly; msgspec parses it to the nearest double
    (tests check this), within one ulp of it whatever the literal's length. Below a
    million USD one ulp is at most 2**-33 USD = 0.117 nano, and scaling by 1e9 adds at
    most 0.0625 nano of rounding: ``scaled`` is within 0.18 of the exact nano value. So
    when ``scaled`` is within 0.3 of an integer, the exact value is within 0.48 of that
    same integer and rounds to it under any tie rule: the reference's answer. Near a
    half-nano tie, at a bound, or for a negative value, raise :class:`_Undecided`: the
    reference decides from the literal. ``+0.0`` is a zero literal or a positive one
    below a double's range (rounds to 0); ``-0.0`` may be a negative one (rejected).
    """
    if 0.0 < value < 1e6:
        scaled = value * 1e9
        nano = round(scaled)
        if abs(scaled - nano) < 0.3:
            return nano
    elif value == 0.0 and copysign(1.0, value) == 1.0:
        return 0
    raise _Undecided


def _accept(wire: _Wire, now_ms: int) -> UsageEvent:
    """The rules a type cannot express. Raises (anything) rather than decide a rejection."""
    cost = wire.cost_usd
    cost_nano: int | None
    # isinstance narrows for mypy; strict msgspec yields exactly these types (never a bool)
    if isinstance(cost, float):
        cost_nano = _float_nano(cost)
    elif isinstance(cost, str):
        cost_nano = _string_nano(cost)
    elif isinstance(cost, int):
        cost_nano = _int_nano(cost)
    else:
        cost_nano = None  # the union leaves only None
    stamp = wire.timestamp
    event_ms = _rfc3339_ms(stamp) if isinstance(stamp, str) else stamp
    if event_ms > now_ms + MAX_FUTURE_MS:
        raise _Undecided
    input_tokens = wire.input_tokens
    output_tokens = wire.output_tokens
    if wire.total_tokens is not None and wire.total_tokens != input_tokens + output_tokens:
        raise _Undecided
    return UsageEvent(
        wire.request_id,
        wire.client_org_id,
        wire.user_id,
        wire.model,
        input_tokens,
        output_tokens,
        cost_nano,
        event_ms,
    )


def parse_event(raw: bytes | None, now_ms: int) -> UsageEvent | InvalidEvent:
    """Validate producer bytes against docs/contract.md §1; ``now_ms`` bounds future timestamps.

    Never raises: a bug in a rule becomes an ``InvalidEvent`` (``bad_value``) rather than a
    crashed worker.
    """
    if raw is not None and len(raw) <= MAX_EVENT_BYTES:
        try:
            return _accept(_STRICT_DECODER.decode(raw), now_ms)
        except Exception:
            pass  # whatever the doubt, the reference decides
    return _parse_slow_or_invalid(raw, now_ms)


class KafkaRecord(Protocol):
    """What :func:`parse_records` needs of a consumed record (aiokafka's ``ConsumerRecord``)."""

    value: bytes | None
    timestamp: int


def received_ms(record_timestamp: int) -> int:
    """The time a record's future bound counts from: its own Kafka timestamp.

    Why not the wall clock of whoever reads it: a record's verdict must be the same at
    every read. The hot path reads a record once, but a worker that rebuilds a home
    partition (another host, a restart hours later) and the replay read it again, and a
    ``future_timestamp`` dead letter that a later reader's clock found valid would be
    taken as a seen request id: the producer's corrected copy would then be dropped as a
    duplicate and never billed. The record's timestamp (the producer's ``CreateTime``, or
    the broker's ``LogAppendTime`` when the topic is set so) is stored with it, so every
    reader decides alike. Only a record without one (the pre-0.10 message format, -1) is
    bounded by the reader's clock.
    """
    return record_timestamp if record_timestamp >= 0 else time.time_ns() // 1_000_000


def parse_records(records: Sequence[KafkaRecord]) -> list[UsageEvent | InvalidEvent]:
    """The verdict on each consumed record, in order: :func:`parse_event` of its value,
    with the future bounded by the record's own timestamp (:func:`received_ms`). The one
    rule the hot path, the rebuild of a home partition and the replay share.

    A plain loop: hoisting lookups out of it or inlining the fast path measured no faster.
    """
    return [parse_event(record.value, received_ms(record.timestamp)) for record in records]


class _Stamp(msgspec.Struct, gc=False):
    """Only the ``timestamp`` of an object (every other field skipped)."""

    timestamp: _EpochMs | str


_STAMP_DECODER = msgspec.json.Decoder(_Stamp)


def event_time_hint(raw: bytes | None) -> int | None:
    """The event time (epoch ms) the bytes would have if they were a valid event, or None
    when that takes more than a glance (not JSON, no usable timestamp, too large).

    Not validation: the replay uses it to skip validating records that cannot be events
    of the date it replays (~8x cheaper than :func:`parse_event`). It agrees with
    :func:`parse_event` on every event that is valid: the same decoder rules for the
    field, the same RFC 3339 conversion, and the last of duplicate keys, like both of
    its parsers.
    """
    if raw is None or len(raw) > MAX_EVENT_BYTES:
        return None
    try:
        stamp = _STAMP_DECODER.decode(raw).timestamp
        return stamp if isinstance(stamp, int) else _rfc3339_ms(stamp)
    except Exception:
        return None


def _parse_slow_or_invalid(raw: bytes | None, now_ms: int) -> UsageEvent | InvalidEvent:
    try:
        return _parse_slow(raw, now_ms)
    except _Invalid as invalid:
        return InvalidEvent(invalid.reason, invalid.message)
    except Exception as error:  # a bug in a rule must not stop the worker
        return InvalidEvent("bad_value", f"unexpected validation error: {type(error).__name__}")


def _parse_slow(raw: bytes | None, now_ms: int, *, extras_fast: bool = True) -> UsageEvent:
    """After the fast path gave up: orjson, then extras-tolerant msgspec, then the reference.

    Once orjson has accepted the bytes, the decoder that skips unknown fields is as strict
    as the reference about everything it does not skip, so an event with extra fields
    stays fast; what it does not accept gets the reference's reason. Raises
    :class:`_Invalid`.
    """
    if raw is None:
        raise _Invalid("not_json", "empty message value")
    obj = _load_object(raw)
    if extras_fast and not obj.keys() <= _FIELDS:
        try:
            return _accept(_EXTRAS_DECODER.decode(raw), now_ms)
        except Exception:
            pass  # the reference decides
    return _check_object(obj, raw, now_ms)


# The reference validator ------------------------------------------------------------------


def _reference(raw: bytes | None, now_ms: int) -> UsageEvent:
    """The explicit validator alone (raises :class:`_Invalid`): the tests' yardstick."""
    return _parse_slow(raw, now_ms, extras_fast=False)


def _load_object(raw: bytes) -> dict[str, object]:
    if len(raw) > MAX_EVENT_BYTES:
        raise _Invalid("too_large", f"value is {len(raw)} bytes, limit {MAX_EVENT_BYTES}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise _Invalid("not_json", f"not JSON: {_first_line(str(error))}") from None
    if not isinstance(obj, dict):
        raise _Invalid("not_object", f"JSON value is a {type(obj).__name__}, not an object")
    return obj


def _check_object(obj: dict[str, object], raw: bytes, now_ms: int) -> UsageEvent:
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


def _require(obj: dict[str, object], name: str) -> object:
    if name not in obj or obj[name] is None:
        raise _Invalid("missing_field", f"missing required field {name!r}")
    return obj[name]


def _string(obj: dict[str, object], name: str, low: int, high: int) -> str:
    value = _require(obj, name)
    if not isinstance(value, str):
        raise _Invalid("bad_type", f"{name} must be a string, got {type(value).__name__}")
    if not low <= len(value) <= high:
        raise _Invalid("bad_value", f"{name} must be {low}-{high} characters, got {len(value)}")
    return value


def _count(obj: dict[str, object], name: str) -> int:
    value = _require(obj, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid("bad_type", f"{name} must be an integer, got {type(value).__name__}")
    if not 0 <= value <= MAX_TOKENS:
        raise _Invalid("bad_value", f"{name} must be between 0 and {MAX_TOKENS}, got {value}")
    return value


def _cost_nano(obj: dict[str, object], raw: bytes) -> int | None:
    value = obj.get("cost_usd")
    if value is None:
        return None
    if isinstance(value, bool):
        raise _Invalid("bad_type", "cost_usd must be a number or a decimal string, got bool")
    if isinstance(value, float):
        # orjson has rounded the literal to a double: read the literal itself instead
        return _decimal_nano(_json_number(_cost_literal(raw)))
    if isinstance(value, int):
        return _int_nano(value)
    if isinstance(value, str):
        return _string_nano(value)
    raise _Invalid(
        "bad_type", f"cost_usd must be a number or a decimal string, got {type(value).__name__}"
    )


class _CostLiteral(msgspec.Struct):
    """Only the text of ``cost_usd`` (the last one, as orjson reads duplicates)."""

    cost_usd: msgspec.Raw = msgspec.Raw()


_COST_LITERAL_DECODER = msgspec.json.Decoder(_CostLiteral)


def _cost_literal(raw: bytes) -> str:
    """The JSON text of the top-level ``cost_usd`` number, in bytes orjson has accepted.

    msgspec finds it in C; it refuses nesting deeper than about 1000 levels, which orjson
    accepts (up to 1024), and there a flat scan in Python finds it instead.
    """
    try:
        literal = bytes(_COST_LITERAL_DECODER.decode(raw).cost_usd).decode()
    except Exception:  # RecursionError: too deep for msgspec
        literal = ""
    return literal or _member_literal(raw, "cost_usd")


# A JSON text as tokens: strings (escapes included), brackets, and the runs in between
# (whitespace, ``:`` and ``,``, numbers, literals).
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]|[^\[\]{}"]+', re.DOTALL)


def _member_literal(raw: bytes, name: str) -> str:
    """The text of the number that is the value of top-level member ``name`` (the last
    one, as for orjson), in a JSON object orjson has already accepted.

    A flat scan rather than a second parse: a recursive parser (stdlib ``json``, msgspec)
    fails on nesting that orjson accepts (up to 1024 levels), and this must not fail. At
    worst (64 KiB of tiny tokens) it takes some milliseconds, for a rare, hostile value.
    """
    tokens: list[bytes] = _JSON_TOKEN.findall(raw)
    depth = 0
    literal: str | None = None
    for index, token in enumerate(tokens):
        first = token[0]
        if first in b"{[":
            depth += 1
        elif first in b"}]":
            depth -= 1
        elif depth == 1 and first == 0x22 and index + 1 < len(tokens):  # '"': a key?
            after = tokens[index + 1].lstrip()
            if after[:1] == b":" and orjson.loads(token) == name:
                literal = after[1:].split(b",")[0].strip().decode()
    if not literal:
        raise RuntimeError(f"no number literal for {name!r}")  # unreachable for valid JSON
    return literal


def _timestamp_ms(obj: dict[str, object]) -> int:
    value = _require(obj, "timestamp")
    if isinstance(value, bool):
        raise _Invalid("bad_type", "timestamp must be an RFC 3339 string or epoch milliseconds")
    if isinstance(value, int):
        if not 0 <= value <= _MAX_EPOCH_MS:
            raise _Invalid("bad_value", f"timestamp (epoch ms) out of range: {value}")
        return value
    if not isinstance(value, str):
        raise _Invalid("bad_type", "timestamp must be an RFC 3339 string or epoch milliseconds")
    return _rfc3339_ms(value)
