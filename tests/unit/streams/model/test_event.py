"""Validation of producer bytes against docs/contract.md §1."""

from __future__ import annotations

import time
from typing import NamedTuple

import orjson
import pytest

from streams.model.event import (
    MAX_EVENT_BYTES,
    InvalidEvent,
    UsageEvent,
    parse_event,
    parse_records,
    received_ms,
)

NOW = 1_795_169_472_123  # 2026-11-20T10:11:12.123Z


def event(**overrides: object) -> bytes:
    body: dict[str, object] = {
        "request_id": "gen-1",
        "client_org_id": "org-1",
        "user_id": "user-1",
        "model": "openai/gpt-4o-mini",
        "input_tokens": 1250,
        "output_tokens": 180,
        "cost_usd": 0.0002187,
        "timestamp": "2026-11-20T10:11:12.123Z",
    }
    body.update(overrides)
    return orjson.dumps({k: v for k, v in body.items() if v is not ...})


def test_valid_event_is_parsed_exactly() -> None:
    parsed = parse_event(event(extra_field={"ignored": True}), NOW)
    assert parsed == UsageEvent(
        "gen-1", "org-1", "user-1", "openai/gpt-4o-mini", 1250, 180, 218_700, NOW
    )
    assert parsed.total_tokens == 1430


@pytest.mark.parametrize(
    ("cost", "nano"),
    [
        ("0.0000000015", 2),  # half-even: 1.5 -> 2
        ("0.0000000025", 2),  # half-even: 2.5 -> 2
        ("1.000000001", 1_000_000_001),
        (0, 0),
        (3, 3_000_000_000),
        (0.1, 100_000_000),
        ("123456.123456789", 123_456_123_456_789),
        ("1000000", 1_000_000_000_000_000),  # the largest accepted cost
    ],
)
def test_cost_rounded_half_even_to_nano(cost: object, nano: int) -> None:
    parsed = parse_event(event(cost_usd=cost), NOW)
    assert isinstance(parsed, UsageEvent)
    assert parsed.cost_nano == nano


def test_long_json_number_is_read_exactly_not_through_float() -> None:
    raw = event().replace(b"0.0002187", b"234567.12345678951")
    parsed = parse_event(raw, NOW)
    assert isinstance(parsed, UsageEvent)
    assert parsed.cost_nano == 234_567_123_456_790  # ...789|51 rounds up


def test_absent_cost_is_none_and_total_tokens_checked() -> None:
    parsed = parse_event(event(cost_usd=..., total_tokens=1430), NOW)
    assert isinstance(parsed, UsageEvent) and parsed.cost_nano is None


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "not_json"),
        (b"[1, 2]", "not_object"),
        (b'"text"', "not_object"),
        (event(request_id=...), "missing_field"),
        (event(timestamp=None), "missing_field"),
        (event(input_tokens="12"), "bad_type"),
        (event(input_tokens=1.5), "bad_type"),
        (event(output_tokens=True), "bad_type"),
        (event(input_tokens=-1), "bad_value"),
        (event(output_tokens=10**12 + 1), "bad_value"),
        (event(cost_usd="1000000.000000001"), "bad_value"),
        (event(cost_usd=1e300), "bad_value"),
        (event(timestamp=10**16), "bad_value"),
        (event(total_tokens=1), "bad_value"),
        (event(request_id=""), "bad_value"),
        (event(request_id="x" * 129), "bad_value"),
        (event(user_id="u" * 257), "bad_value"),
        (event(cost_usd=-0.1), "bad_value"),
        (event(cost_usd="abc"), "bad_value"),
        (event(cost_usd=[1]), "bad_type"),
        (event(timestamp="2026-11-20 10:11"), "bad_value"),
        (event(timestamp="2026-11-20T10:11:12"), "bad_value"),  # no offset
        (event(timestamp=[1]), "bad_type"),
        (event(timestamp=NOW + 24 * 3600 * 1000 + 1), "future_timestamp"),
        (b"{" + b" " * MAX_EVENT_BYTES + b"}", "too_large"),
    ],
)
def test_invalid_events_have_a_reason(raw: bytes, reason: str) -> None:
    parsed = parse_event(raw, NOW)
    assert isinstance(parsed, InvalidEvent)
    assert parsed.reason == reason
    assert "\n" not in parsed.message and parsed.message


def test_old_timestamps_are_valid_and_both_formats_agree() -> None:
    iso = parse_event(event(timestamp="2020-01-01T01:00:00.250+01:00"), NOW)
    epoch = parse_event(event(timestamp=1_577_836_800_250), NOW)
    assert isinstance(iso, UsageEvent) and isinstance(epoch, UsageEvent)
    assert iso.event_ms == epoch.event_ms == 1_577_836_800_250


def test_exactly_24h_ahead_is_still_valid() -> None:
    assert isinstance(parse_event(event(timestamp=NOW + 24 * 3600 * 1000), NOW), UsageEvent)


def with_member(name: str, literal: bytes) -> bytes:
    """A valid event with member ``name`` set to the raw JSON text ``literal``."""
    return event(**{name: ...})[:-1] + b',"' + name.encode() + b'":' + literal + b"}"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "not_json"),
        (b"", "not_json"),
        (with_member("cost_usd", b"NaN"), "not_json"),  # JSON has no NaN/Infinity literals
        (with_member("cost_usd", b"Infinity"), "not_json"),
        (with_member("cost_usd", b"-Infinity"), "not_json"),
        (with_member("cost_usd", b'"NaN"'), "bad_value"),
        (with_member("cost_usd", b'"Infinity"'), "bad_value"),
        (with_member("cost_usd", b'"-Infinity"'), "bad_value"),
        (with_member("cost_usd", b"1e309"), "not_json"),  # beyond a double: orjson rejects
        (with_member("cost_usd", b"1e308"), "bad_value"),
        (with_member("cost_usd", b"1" + b"0" * 30), "bad_value"),  # past int64
        (with_member("cost_usd", b"true"), "bad_type"),
        (with_member("cost_usd", b"{}"), "bad_type"),
        (with_member("cost_usd", b"-1e-99999999999999999999"), "bad_value"),
        (with_member("input_tokens", b"18446744073709551616"), "bad_type"),  # orjson: a float
        (with_member("input_tokens", b"9223372036854775808"), "bad_value"),
        (with_member("input_tokens", b"1.0"), "bad_type"),
        (with_member("input_tokens", b"1e2"), "bad_type"),
        (with_member("total_tokens", b"true"), "bad_type"),
        (with_member("timestamp", b"true"), "bad_type"),
        (with_member("timestamp", b"1e12"), "bad_type"),
        (with_member("timestamp", b"-1"), "bad_value"),
        (with_member("timestamp", b'"2026-11-20 10:11:12+00:00"'), "bad_value"),  # no "T"
        (with_member("timestamp", b'"2026-11-20T10:11:12Z\\u0000junk"'), "bad_value"),
        (with_member("timestamp", b'"2026-11-21T10:11:12.124Z"'), "future_timestamp"),
        (with_member("request_id", b'"\xff"'), "not_json"),  # invalid UTF-8
        (with_member("request_id", b'"\xed\xa0\x80"'), "not_json"),  # an encoded surrogate
        (with_member("request_id", b'"\\ud800"'), "not_json"),  # a lone escaped surrogate
        (with_member("request_id", b'"' + "😀".encode() * 129 + b'"'), "bad_value"),
        (with_member("extra", b'"\xff"'), "not_json"),  # also where the field is unknown
        (with_member("extra", b'"\\udc00"'), "not_json"),
        (with_member("extra", b"1e400"), "not_json"),
        (with_member("extra", b"[" * 1100 + b"]" * 1100), "not_json"),  # orjson: depth 1024
        (event() + b" x", "not_json"),
        (b"\xef\xbb\xbf" + event(), "not_json"),  # a UTF-8 byte order mark
    ],
)
def test_hostile_values_have_a_reason(raw: bytes | None, reason: str) -> None:
    parsed = parse_event(raw, NOW)
    assert isinstance(parsed, InvalidEvent)
    assert parsed.reason == reason
    assert len(parsed.message.splitlines()) == 1 and len(parsed.message) <= 200


def test_hostile_values_are_not_echoed_at_length() -> None:
    for raw in (
        event(cost_usd="x" * 10_000),
        event(timestamp="2026-" + "9" * 10_000),
        with_member("cost_usd", b"1" * 5000 + b".5"),
    ):
        parsed = parse_event(raw, NOW)
        assert isinstance(parsed, InvalidEvent) and len(parsed.message) <= 200


@pytest.mark.parametrize(
    ("literal", "nano"),
    [
        # more digits than Decimal's default 28-digit context: rounded once, exactly
        (b"1.0000000005000000000000000000001", 1_000_000_001),
        (b'"1.0000000005000000000000000000001"', 1_000_000_001),
        # a long literal whose double has a short repr (5e-10): not read through the float
        (b"0.00000000050000000000000000001", 1),
        (b"0.00000000049999999999999999999", 0),
        (b"1e-99999999999999999999", 0),  # an exponent beyond Decimal's range; orjson: 0.0
        (b"0e99999999999999999999", 0),
        (b"-0.0", 0),
        (b"1E+2", 100_000_000_000),
        (b'" 1.5 "', 1_500_000_000),
    ],
)
def test_cost_literals_are_exact(literal: bytes, nano: int) -> None:
    parsed = parse_event(with_member("cost_usd", literal), NOW)
    assert isinstance(parsed, UsageEvent)
    assert parsed.cost_nano == nano


def test_deeply_nested_extra_field_and_long_float_cost() -> None:
    """Nesting orjson accepts but a recursive parser would not; the cost is still exact."""
    raw = with_member("extra", b"[" * 1000 + b"]" * 1000)
    raw = raw.replace(b"0.0002187", b"0.12345678951234567890123")
    parsed = parse_event(raw, NOW)
    assert isinstance(parsed, UsageEvent)
    assert parsed.cost_nano == 123_456_790


def test_duplicate_keys_the_last_one_counts() -> None:
    raw = b'{"input_tokens": "x", ' + event()[1:]
    assert parse_event(raw, NOW) == parse_event(event(), NOW)
    raw = event()[:-1] + b',"input_tokens": -1}'
    parsed = parse_event(raw, NOW)
    assert isinstance(parsed, InvalidEvent) and parsed.reason == "bad_value"


class Rec(NamedTuple):
    value: bytes | None
    timestamp: int


def test_parse_records_is_parse_event_in_order() -> None:
    values = [event(), None, b"[]", event(request_id="gen-2", extra={"a": [1, 2.5]})]
    records = [Rec(value, NOW) for value in values]
    assert parse_records(records) == [parse_event(value, NOW) for value in values]
    assert [type(result).__name__ for result in parse_records(records)] == [
        "UsageEvent",
        "InvalidEvent",
        "InvalidEvent",
        "UsageEvent",
    ]


def test_usage_event_is_immutable_hashable_and_compared_by_value() -> None:
    first = UsageEvent("gen-1", "org-1", "user-1", "m", 1, 2, None, 0)
    second = UsageEvent("gen-1", "org-1", "user-1", "m", 1, 2, None, 0)
    assert first == second and hash(first) == hash(second) and len({first, second}) == 1
    assert first != UsageEvent("gen-1", "org-1", "user-1", "m", 1, 2, 5, 0)
    assert first.total_tokens == 3
    with pytest.raises(AttributeError):
        first.input_tokens = 5  # type: ignore[misc]


def test_the_future_is_bounded_by_the_records_own_timestamp_not_the_readers_clock() -> None:
    """A record's verdict is the same at every read (a rebuild hours later, another host,
    the replay): an event a day and a minute ahead of its record stays invalid for ever,
    and the same bytes in a record written a minute later are valid."""
    ahead = NOW + 24 * 3600 * 1000 + 60_000
    raw = event(timestamp=ahead)
    (early,) = parse_records([Rec(raw, NOW)])
    assert isinstance(early, InvalidEvent) and early.reason == "future_timestamp"
    (later,) = parse_records([Rec(raw, NOW + 60_000)])
    assert isinstance(later, UsageEvent) and later.event_ms == ahead
    # whatever the reader's clock says now (years after NOW), the first record stays invalid
    assert parse_records([Rec(raw, NOW)]) == [early]


def test_a_record_without_a_timestamp_is_bounded_by_the_clock() -> None:
    assert received_ms(NOW) == NOW
    assert abs(received_ms(-1) - time.time() * 1000) < 60_000
