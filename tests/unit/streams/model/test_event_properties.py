"""Property tests for ``streams.model.event``: the fast validator against the reference rules.

``parse_event`` accepts the common event on a msgspec fast path and hands everything else to
the explicit reference validator. These tests generate (1) valid events in every shape the
contract allows, whose expected ``UsageEvent`` is computed here independently (Fraction
arithmetic for money, ordinal arithmetic for time), and (2) hostile bytes, and check that
``parse_event`` never raises and always answers exactly what the reference answers: so the
fast path never accepts anything the reference rejects, nor accepts it differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date as Date
from fractions import Fraction
from typing import NamedTuple

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.model import event as event_module
from streams.model.event import (
    MAX_EVENT_BYTES,
    MAX_FUTURE_MS,
    REASONS,
    InvalidEvent,
    UsageEvent,
    event_time_hint,
    parse_event,
    parse_records,
)


class Rec(NamedTuple):
    """A consumed record as parse_records sees it: its value and Kafka timestamp."""

    value: bytes | None
    timestamp: int


NOW = 1_795_169_472_123  # 2026-11-20T10:11:12.123Z
KNOWN = (
    "request_id",
    "client_org_id",
    "user_id",
    "model",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cost_usd",
    "timestamp",
)
PROPERTIES = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def reference(raw: bytes | None, now_ms: int = NOW) -> UsageEvent | InvalidEvent:
    """The explicit validator alone; anything but its own rejection propagates (a bug)."""
    try:
        return event_module._reference(raw, now_ms)
    except event_module._Invalid as invalid:
        return InvalidEvent(invalid.reason, invalid.message)


def fast_only(raw: bytes, *, extras: bool) -> UsageEvent:
    """The fast path alone (raises when it gives up)."""
    decoder = event_module._EXTRAS_DECODER if extras else event_module._STRICT_DECODER
    return event_module._accept(decoder.decode(raw), NOW)


# JSON text builders: members are written by hand so that number literals, key escapes,
# duplicate keys, member order and whitespace are all under the test's control.

WHITESPACE = st.sampled_from([b"", b"", b" ", b"\n", b"\t", b"\r\n  "])
# Every code point but lone surrogates (not representable in UTF-8): NUL and other control
# characters, quotes, backslashes, non-BMP characters included.
CHARS = st.characters(exclude_categories=("Cs",))
AWKWARD = st.sampled_from(["\x00", "\n", '"', "\\", "/", "é", "\u2028", "😀", "\U0010ffff", "a"])


def dice(sides: int) -> st.SearchStrategy[bool]:
    """True one time in ``sides``."""
    return st.integers(1, sides).map(lambda face: face == 1)


def bounded_text(high: int) -> st.SearchStrategy[str]:
    """Valid lengths, with the upper bound itself (in code points, not bytes) well covered."""
    return st.one_of(
        st.text(CHARS, min_size=1, max_size=16),
        st.text(CHARS, min_size=1, max_size=16),
        st.text(AWKWARD, min_size=high - 2, max_size=high),
        st.text(CHARS, min_size=1, max_size=high),
    )


def json_key(name: str, escaped: bool) -> bytes:
    """``name`` as a JSON key, optionally with its first character as a \\u escape."""
    if escaped:
        return b'"\\u%04x' % ord(name[0]) + orjson.dumps(name[1:])[1:]
    return orjson.dumps(name)


def json_object(members: list[tuple[bytes, bytes]], spaces: list[bytes]) -> bytes:
    parts = []
    for index, (key, value) in enumerate(members):
        space = spaces[index % len(spaces)]
        parts.append(space + key + space + b":" + space + value + space)
    return b"{" + b",".join(parts) + b"}"


@st.composite
def json_values(draw: st.DrawFn, depth: int = 3) -> bytes:
    """Arbitrary valid JSON text for unknown extra fields: big integers, exponents, nesting."""
    leaves = st.one_of(
        st.sampled_from([b"null", b"true", b"false", b"-0", b"1e-400", b"1.5E+300", b"0.0"]),
        st.integers(-(10**40), 10**40).map(lambda n: str(n).encode()),
        st.floats(allow_nan=False, allow_infinity=False).map(lambda x: orjson.dumps(x)),
        st.text(CHARS, max_size=12).map(orjson.dumps),
    )
    if depth == 0:
        return draw(leaves)
    kind = draw(st.integers(0, 3))
    if kind == 0:
        items = draw(st.lists(json_values(depth - 1), max_size=3))
        return b"[" + b",".join(items) + b"]"
    if kind == 1:
        # nested objects may reuse the event's own names: only the top level counts
        keys = draw(
            st.lists(st.one_of(st.text(CHARS, max_size=6), st.sampled_from(KNOWN)), max_size=3)
        )
        items = [orjson.dumps(key) + b":" + draw(json_values(depth - 1)) for key in keys]
        return b"{" + b",".join(items) + b"}"
    return draw(leaves)


# Valid events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidCase:
    """A valid event, its expected parse, and which fast decoder must accept it by itself.

    ``plain``: no unknown fields, no duplicate keys, so the strict decoder must take it;
    ``extras``: unknown fields but no duplicates, so the extras decoder must. Both unless
    the cost is a JSON number a double cannot decide (near a half-nano tie, at a bound,
    a negative zero): that one may be left to the reference.
    """

    raw: bytes
    expected: UsageEvent
    plain: bool
    extras: bool


@st.composite
def cost_literals(draw: st.DrawFn) -> tuple[bytes | None, int | None, bool]:
    """(JSON text of ``cost_usd`` or None when absent, expected nano-USD, whether the fast
    path must decide it)."""
    kind = draw(st.sampled_from(["absent", "null", "int", "number", "number", "string"]))
    if kind == "absent":
        return None, None, True
    if kind == "null":
        return b"null", None, True
    if kind == "int":
        usd = draw(st.one_of(st.integers(0, 1_000_000), st.sampled_from([0, 1_000_000])))
        return str(usd).encode(), usd * 10**9, True
    # an exact decimal value c / 10**k within [0, 1e6], in several spellings
    decimals = draw(st.integers(0, 40))
    top = 10**6 * 10**decimals
    coefficient = draw(st.one_of(st.integers(0, top), st.sampled_from([0, 1, top])))
    if decimals >= 10 and draw(st.booleans()):  # exactly half a nano: the half-even cases
        coefficient = (2 * draw(st.integers(0, 10**15 - 1)) + 1) * 5 * 10 ** (decimals - 10)
        if decimals >= 20:  # or just off it, beyond a double's digits (a float would tie)
            coefficient += draw(st.sampled_from([-1, 1]))
    value = Fraction(coefficient, 10**decimals)
    digits = str(coefficient).rjust(decimals + 1, "0")
    whole, fraction = digits[: len(digits) - decimals], digits[len(digits) - decimals :]
    spelling = draw(st.sampled_from(["plain", "trailing", "exponent", "shifted", "zero"]))
    if spelling == "plain":
        text = f"{whole}.{fraction}" if fraction else whole
    elif spelling == "trailing":
        text = f"{whole}.{fraction}{'0' * draw(st.integers(1, 30))}"
    elif spelling == "exponent":
        text = f"{coefficient}e-{decimals}"
    elif spelling == "shifted" and value * 1000 <= 10**6:
        shift = draw(st.integers(0, 3))
        text = f"{coefficient}E{shift - decimals:+d}"
        value = Fraction(coefficient) * Fraction(10) ** (shift - decimals)
    else:
        text, value = draw(st.sampled_from(["-0", "-0.0", "-0e5", "0E-7", "0"])), Fraction(0)
    nano = round(value * 10**9)  # Fraction.__round__ rounds half to even
    if kind == "string":
        pad = draw(st.sampled_from(["", " ", "\t", " \n"]))
        return orjson.dumps(pad + text + pad), nano, True
    if "." not in text and "e" not in text.lower():  # a JSON integer
        return text.encode(), nano, True
    # a double decides values well away from a half-nano tie (see _float_nano)
    distance = abs(value * 10**9 - nano)  # to the nano it rounds to
    below_the_bound = value <= 10**6 - Fraction(1, 10**9)  # (the double may round up to 1e6)
    decidable = (0 < value and below_the_bound and distance <= Fraction(1, 10)) or (
        value == 0 and not text.startswith("-")
    )
    return text.encode(), nano, decidable


def civil_ms(year: int, month: int, day: int, hms: tuple[int, int, int], us: int, off: int) -> int:
    """Epoch ms of a local time with an offset in minutes, floored: no datetime involved."""
    # days from civil (proleptic Gregorian), Howard Hinnant's algorithm
    y = year - (month <= 2)
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    days = era * 146_097 + doe - 719_468
    hour, minute, second = hms
    micros = (((days * 24 + hour) * 60 + minute - off) * 60 + second) * 10**6 + us
    return micros // 1000


@st.composite
def timestamps(draw: st.DrawFn) -> tuple[bytes, int]:
    if draw(st.booleans()):
        ms = draw(st.one_of(st.integers(0, NOW + MAX_FUTURE_MS), st.sampled_from([0, NOW])))
        return str(ms).encode(), ms
    # one day inside both ends, so that any offset keeps the event valid
    date = draw(st.dates(min_value=Date(1, 1, 2), max_value=Date(2026, 11, 19)))
    hms = (draw(st.integers(0, 23)), draw(st.integers(0, 59)), draw(st.integers(0, 59)))
    places = draw(st.sampled_from([0, 0, 3, 6, 1, 2, 9]))  # beyond 6: truncated to the µs
    digits = draw(st.text("0123456789", min_size=places, max_size=places))
    us = int(digits[:6].ljust(6, "0")) if digits else 0
    offset = draw(st.one_of(st.just(0), st.integers(-(24 * 60 - 1), 24 * 60 - 1)))
    if offset == 0 and draw(st.booleans()):
        zone = "Z"
    else:
        zone = f"{'-' if offset < 0 else '+'}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"
    separator = draw(st.sampled_from(["T", "T", "t"]))
    text = (
        f"{date.year:04d}-{date.month:02d}-{date.day:02d}{separator}"
        f"{hms[0]:02d}:{hms[1]:02d}:{hms[2]:02d}{'.' + digits if digits else ''}{zone}"
    )
    return orjson.dumps(text), civil_ms(date.year, date.month, date.day, hms, us, offset)


@st.composite
def valid_events(draw: st.DrawFn) -> ValidCase:
    strings = {
        "request_id": draw(bounded_text(128)),
        "client_org_id": draw(bounded_text(128)),
        "user_id": draw(bounded_text(256)),
        "model": draw(bounded_text(256)),
    }
    tokens = st.one_of(st.integers(0, 10**6), st.sampled_from([0, 10**12]), st.integers(0, 10**12))
    input_tokens, output_tokens = draw(tokens), draw(tokens)
    cost_text, cost_nano, fast = draw(cost_literals())
    ts_text, event_ms = draw(timestamps())
    members = {name: orjson.dumps(value) for name, value in strings.items()}
    members["input_tokens"] = str(input_tokens).encode()
    members["output_tokens"] = str(output_tokens).encode()
    members["timestamp"] = ts_text
    if cost_text is not None:
        members["cost_usd"] = cost_text
    total = draw(st.sampled_from(["absent", "null", "equal"]))
    if total == "null":
        members["total_tokens"] = b"null"
    elif total == "equal" and input_tokens + output_tokens <= 10**12:
        # (the reference bounds total_tokens like any count, so a larger sum is invalid)
        members["total_tokens"] = str(input_tokens + output_tokens).encode()
    names = draw(st.permutations(list(members)))
    escaped = draw(st.sets(st.sampled_from(names), max_size=2))
    pairs = [(json_key(name, name in escaped), members[name]) for name in names]
    # an earlier copy of a member, even an invalid one, is overridden by the last (orjson)
    duplicates = draw(st.lists(st.sampled_from(names), max_size=2)) if draw(dice(4)) else []
    for name in duplicates:
        junk = draw(st.sampled_from([b"null", b'"junk"', b"-1", b"true", b"[1]", b"1.5"]))
        pairs.insert(0, (json_key(name, False), junk))
    extras = draw(
        st.lists(
            st.tuples(st.text(CHARS, max_size=10).filter(lambda k: k not in KNOWN), json_values()),
            min_size=1,
            max_size=3,
        )
        if draw(dice(3))
        else st.just([])
    )
    for key, value in extras:
        pairs.insert(draw(st.integers(0, len(pairs))), (orjson.dumps(key), value))
    raw = json_object(pairs, draw(st.lists(WHITESPACE, min_size=1, max_size=3)))
    expected = UsageEvent(
        strings["request_id"],
        strings["client_org_id"],
        strings["user_id"],
        strings["model"],
        input_tokens,
        output_tokens,
        cost_nano,
        event_ms,
    )
    plain = fast and not duplicates and not extras
    return ValidCase(raw, expected, plain, fast and bool(extras) and not duplicates)


@PROPERTIES
@given(valid_events())
def test_valid_events_fast_equals_reference_equals_expected(case: ValidCase) -> None:
    assert len(case.raw) <= MAX_EVENT_BYTES
    assert reference(case.raw) == case.expected
    parsed = parse_event(case.raw, NOW)
    assert parsed == case.expected
    # no hint (validate it) only for odd shapes, e.g. a duplicate key with a bad value first
    assert event_time_hint(case.raw) in (None, case.expected.event_ms)
    if case.plain:
        assert event_time_hint(case.raw) == case.expected.event_ms
    assert parsed.total_tokens == case.expected.input_tokens + case.expected.output_tokens
    assert parse_records([Rec(case.raw, NOW), Rec(None, NOW), Rec(case.raw, NOW)]) == [
        case.expected,
        InvalidEvent("not_json", "empty message value"),
        case.expected,
    ]
    check_literal_scan(case.raw)
    if case.plain:  # the common event really is taken by the fast path
        assert fast_only(case.raw, extras=False) == case.expected
    if case.extras:
        assert fast_only(case.raw, extras=True) == case.expected


# Hostile input ------------------------------------------------------------------------------

BASE = {
    "request_id": b'"gen-1"',
    "client_org_id": b'"org-1"',
    "user_id": b'"user-1"',
    "model": b'"openai/gpt-4o-mini"',
    "input_tokens": b"1250",
    "output_tokens": b"180",
    "cost_usd": b"0.0002187",
    "timestamp": b'"2026-11-20T10:11:12.123Z"',
}
HOSTILE_LITERALS = [
    b"true",
    b"false",
    b"null",
    b"NaN",
    b"-NaN",
    b"Infinity",
    b"-Infinity",
    b'"NaN"',
    b'"nan"',
    b'"sNaN"',
    b'"Infinity"',
    b'"-Infinity"',
    b'"inf"',
    b"1e309",
    b"-1e309",
    b"1e308",
    b"1E400",
    b"1e-400",
    b"-1e-400",
    b"-0e0",
    b"1e-99999999999999999999",
    b"-1e-99999999999999999999",
    b"0e99999999999999999999",
    b"1e-" + b"9" * 5000,
    b"18446744073709551615",
    b"18446744073709551616",
    b"9223372036854775808",
    b"-9223372036854775809",
    b"1" + b"0" * 400,
    b"1" + b"0" * 300,
    b"0." + b"1" * 400,
    b"1.0",
    b"1e2",
    b"-0",
    b"-0.0",
    b"-1",
    b"1000000.0000000005",
    b"1000000.000000000499999999999999999999999",
    b"01",
    b"1.",
    b".5",
    b"+1",
    b"[]",
    b"{}",
    b"[1]",
    b'{"a": 1}',
    b'{"cost_usd": 2.5, "timestamp": 1}',  # the event's names, nested: not the event's
    b'[{"cost_usd": 2.5}]',
    b'""',
    b'" "',
    b'"\\ud800"',
    b'"\\udc00"',
    b'"\\ud800\\u0041"',
    b'"\\udbff\\udfff"',
    b'"\xff"',
    b'"\xed\xa0\x80"',
    b'"\xc0\x80"',
    b'"\xf4\x90\x80\x80"',
    b'"\x00"',
    b'"\x1f"',
    b'"\\u0000"',
    b'"a\\"b"',
    b'"\\b\\f\\n\\r\\t\\"\\\\\\/\\u00e9\\uD83D\\uDE00"',  # every escape, both cases
    b'"\\\\"',
    b'"\\x"',
    b'" 1.5 "',
    b'"1_000"',
    b'"\xd9\xa1"',
    b'"+1"',
    b'"1e-3"',
    b'".5"',
    b'"5."',
    b'"-0.0000000001"',
    b'"1e6"',
    b'"1e-99999999999999999999"',
    b'"0x10"',
    b'"2026-11-20T10:11:12Z"',
    b'"2026-11-20t10:11:12.123z"',
    b'"2026-11-20 10:11:12Z"',
    b'"2026-11-20T10:11:12"',
    b'"2026-11-20T10:11Z"',
    b'"2026-11-20T10:11:12.9999999Z"',
    b'"2026-11-20T23:59:60Z"',
    b'"2026-11-20T24:00:00Z"',
    b'"2026-11-20T10:11:12+24:00"',
    b'"2026-11-20T10:11:12+00:60"',
    b'"2026-11-20T10:11:12+01:00:30.5"',
    b'"20261120T101112Z"',
    b'"2026-W47-5T10:11:12Z"',
    b'"2026-02-30T10:11:12Z"',
    b'"0001-01-01T00:00:00+23:59"',
    b'"9999-12-31T23:59:59.999-23:59"',
    b'"2026-11-20T10:11:12Z\\u0000junk"',
    b'"2026-11-20\\ufb0610:11:12Z"',
    b'"' + b"x" * 129 + b'"',
    b'"' + "😀".encode() * 129 + b'"',
    b'"' + "😀".encode() * 128 + b'"',
    b'"' + b"u" * 256 + b'"',
    b'"' + b"u" * 257 + b'"',
    b'"' + "😀".encode() * 256 + b'"',
    b'"' + "😀".encode() * 257 + b'"',
    b"[" * 1100 + b"]" * 1100,
    b"[" * 1000 + b"]" * 1000,
    b"[" * 1024 + b"]" * 1024,
    b'{"a":' * 600 + b"1" + b"}" * 600,
]
# Values at the edges of the bounds (tokens, cost, the inclusive future bound at NOW)
BOUNDARIES = [
    b"1000000000000",
    b"1000000000001",
    b"1000000",
    b"1000000.000000000",
    b"1000000.0000000005",
    b"1000000.00000000001",  # the double is 1e6 exactly, the value is not
    b"999999.99999999999999",
    b'"1000000.0000000004"',
    b"0.0000000005",
    b"0.0000000015",
    b"%d" % (NOW + MAX_FUTURE_MS),
    b"%d" % (NOW + MAX_FUTURE_MS + 1),
    b"253402300799999",
    b"253402300800000",
    b'"2026-11-21T10:11:12.123Z"',
    b'"2026-11-21T10:11:12.124Z"',
    b'"2026-11-21T11:11:12.1239+01:00"',
    b'"2026-11-21T11:11:12.124+01:00"',
]
HOSTILE_VALUES = st.one_of(
    st.sampled_from(HOSTILE_LITERALS),
    st.integers(-(2**70), 2**70).map(lambda n: str(n).encode()),
    st.floats(allow_nan=False, allow_infinity=False).map(orjson.dumps),
    st.text(CHARS, max_size=40).map(orjson.dumps),
    st.text(AWKWARD, min_size=120, max_size=260).map(orjson.dumps),
    st.sampled_from(BOUNDARIES),
    json_values(),
)


@st.composite
def hostile_events(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 8))  # 0-3: broken JSON, 4-8: hostile members in a JSON object
    if kind == 0:
        return draw(st.binary(max_size=300))
    members = dict(BASE)
    if draw(st.booleans()):
        members["total_tokens"] = draw(st.sampled_from([b"1430", b"1431", b"null"]))
    # kind 8: valid members, only the unknown extra fields are hostile
    for name in draw(st.lists(st.sampled_from(KNOWN), min_size=kind < 8, max_size=3)):
        if draw(st.integers(0, 4)) == 0:
            members.pop(name, None)
        else:
            members[name] = draw(HOSTILE_VALUES)
    pairs = [
        (json_key(name, draw(st.integers(0, 9)) == 0), value) for name, value in members.items()
    ]
    for _ in range(draw(st.integers(kind == 8, 2))):
        key = draw(
            st.one_of(
                st.sampled_from(KNOWN).map(orjson.dumps),  # a duplicate
                st.text(CHARS, max_size=8).map(orjson.dumps),
                st.sampled_from([b'"\xff"', b'"\\ud800"', b'"cost\\u005fusd"', b"1", b"''"]),
            )
        )
        pairs.insert(draw(st.integers(0, len(pairs))), (key, draw(HOSTILE_VALUES)))
    raw = json_object(pairs, draw(st.lists(WHITESPACE, min_size=1, max_size=2)))
    if kind == 1:  # truncated
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif kind == 2:  # random bytes spliced in
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=4)) + raw[at:]
    elif kind == 3:  # wrapped or trailed
        raw = draw(st.sampled_from([b"[", b"\xef\xbb\xbf", b" ", b'"'])) + raw
        raw += draw(st.sampled_from([b"", b"]", b" x", b"\x00", b"}"]))
    return raw


def check_literal_scan(raw: bytes) -> None:
    """The flat scan (for nesting msgspec refuses) finds the literal msgspec finds."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return
    if isinstance(obj, dict) and isinstance(obj.get("cost_usd"), float):
        try:
            found = event_module._COST_LITERAL_DECODER.decode(raw).cost_usd
        except RecursionError:  # the scan's own case: checked by exact values in test_event
            return
        assert event_module._member_literal(raw, "cost_usd") == bytes(found).decode()


def check_same_as_reference(raw: bytes | None, now_ms: int = NOW) -> None:
    parsed = parse_event(raw, now_ms)  # must not raise
    expected = reference(raw, now_ms)  # must not raise anything but its own rejection
    assert parsed == expected
    if now_ms >= 0:  # (a record without a timestamp, -1, is bounded by the clock)
        assert parse_records([Rec(raw, now_ms)]) == [expected]
    if raw is not None:
        check_literal_scan(raw)
    # the replay skips validating records whose hint lies outside the date: the hint of a
    # valid event is its event time, or no hint at all (then it is validated)
    if isinstance(parsed, UsageEvent):
        assert event_time_hint(raw) in (None, parsed.event_ms)
    if isinstance(parsed, InvalidEvent):
        assert parsed.reason in REASONS
        assert parsed.message and len(parsed.message.splitlines()) == 1
        assert len(parsed.message) <= 200, parsed.message
        assert not parsed.message.startswith("unexpected validation error")


@PROPERTIES
@given(hostile_events(), st.sampled_from([NOW, 0, -(10**20), 10**20]))
def test_hostile_input_never_raises_and_matches_the_reference(raw: bytes, now_ms: int) -> None:
    check_same_as_reference(raw, now_ms)


@settings(max_examples=150, deadline=None)
@given(valid_events(), st.data())
def test_mutated_valid_events_match_the_reference(case: ValidCase, data: st.DataObject) -> None:
    raw = case.raw
    at = data.draw(st.integers(0, len(raw)))
    cut = data.draw(st.integers(at, min(len(raw), at + 8)))
    raw = (
        raw[:at]
        + data.draw(st.sampled_from([b"", b'"', b"\\", b"\xff", b"1", b"e9", b","]))
        + raw[cut:]
    )
    check_same_as_reference(raw)


@pytest.mark.parametrize("name", [*KNOWN, "extra"])
def test_every_hostile_literal_in_every_member(name: str) -> None:
    """Each hostile value alone in an otherwise valid event (all of them, not a sample)."""
    for literal in [*HOSTILE_LITERALS, *BOUNDARIES]:
        members = {**BASE, name: literal}
        check_same_as_reference(
            json_object([(orjson.dumps(k), v) for k, v in members.items()], [b""])
        )
        if name in ("extra", "cost_usd"):  # and beside a long float cost: the literal scan
            members["cost_usd" if name == "extra" else "extra"] = b"0.12345678901234567890123"
            raw = json_object([(orjson.dumps(k), v) for k, v in members.items()], [b" "])
            check_same_as_reference(raw)


@PROPERTIES
@given(
    st.text("0123456789", min_size=1, max_size=30),
    st.text("0123456789", min_size=1, max_size=400),
    st.integers(-350, 330),
)
def test_msgspec_reads_a_json_number_as_the_nearest_double(
    whole: str, fraction: str, exponent: int
) -> None:
    """What ``_float_nano``'s exactness argument assumes (within one ulp would do)."""
    literal = f"{whole.lstrip('0') or '0'}.{fraction}e{exponent}"
    nearest = float(literal)  # Python's conversion is correctly rounded
    if nearest != float("inf"):  # (msgspec rejects those: "Number out of range")
        assert msgspec.json.decode(literal.encode(), type=float) == nearest
