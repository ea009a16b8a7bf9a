"""Validation of producer bytes against CONTRACT §1."""

from __future__ import annotations

import orjson
import pytest

from streams.event import (
    MAX_EVENT_BYTES,
    InvalidEvent,
    UsageEvent,
    decode_internal,
    encode_internal,
    parse_event,
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


def test_internal_codec_round_trips() -> None:
    parsed = parse_event(event(cost_usd=...), NOW)
    assert isinstance(parsed, UsageEvent)
    assert decode_internal(encode_internal(parsed, "usage-events/3/42")) == (
        parsed,
        "usage-events/3/42",
    )
