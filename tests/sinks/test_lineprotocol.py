"""Line protocol builder: exact text, escaping, money formatting, timestamps."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.sinks.lineprotocol import (
    RawPoint,
    format_nano,
    line,
    sub_ms,
    timestamp_ns,
    to_line,
    to_lines,
)

MS = 1_795_169_472_123


def point(**overrides: object) -> RawPoint:
    values: dict[str, object] = {
        "request_id": "req-1",
        "client_org_id": "org-1",
        "user_id": "user-1",
        "model": "openai/gpt-4o-mini",
        "input_tokens": 120,
        "output_tokens": 45,
        "cost_nano": 218_700,
        "markup_cost_nano": 284_310,
        "event_ms": MS,
    }
    values.update(overrides)
    return RawPoint(**values)  # type: ignore[arg-type]


def test_exact_line() -> None:
    assert to_line(point()) == (
        "usage_tracking,client_org_id=org-1,model=openai/gpt-4o-mini,user_id=user-1 "
        "input_tokens=120i,output_tokens=45i,total_tokens=165i,"
        'cost_usd=0.000218700,markup_cost_usd=0.000284310,request_id="req-1" '
        f"{MS * 1_000_000 + sub_ms('req-1')}"
    )


@pytest.mark.parametrize(
    ("nano", "text"),
    [
        (0, "0.000000000"),
        (1, "0.000000001"),
        (218_700, "0.000218700"),
        (1_000_000_000, "1.000000000"),
        (12_345_678_901_234, "12345.678901234"),
        (-1_500_000_000, "-1.500000000"),
    ],
)
def test_format_nano_is_exact_decimal_text(nano: int, text: str) -> None:
    assert format_nano(nano) == text


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        ("a,b", "a\\,b"),
        ("a b", "a\\ b"),
        ("a=b", "a\\=b"),
        ("a\\b", "a\\\\b"),
        ("line\nbreak", "line\\nbreak"),
        ("cr\rhere", "cr\\rhere"),
        ("tab\tok", "tab\tok"),
        ("zażółć", "zażółć"),
        # a trailing backslash gets an escaped space so InfluxDB 1.x/2.x can parse it
        ("ends\\", "ends\\\\\\ "),
    ],
)
def test_tag_escaping(value: str, escaped: str) -> None:
    line = to_line(point(user_id=value))
    assert f",user_id={escaped} input_tokens=" in line
    assert "\n" not in line and "\r" not in line


def test_tags_are_sorted_and_empty_tag_omitted() -> None:
    line = to_line(point(client_org_id="o", model="m", user_id=""))
    assert line.startswith("usage_tracking,client_org_id=o,model=m input_tokens=")


@pytest.mark.parametrize(
    ("request_id", "escaped"),
    [
        ('say "hi"', 'say \\"hi\\"'),
        ("back\\slash", "back\\\\slash"),
        ("ends\\", "ends\\\\"),
        ("new\nline", "new\\nline"),
        ("comma, space=eq", "comma, space=eq"),
    ],
)
def test_request_id_string_field_escaping(request_id: str, escaped: str) -> None:
    assert f',request_id="{escaped}" ' in to_line(point(request_id=request_id))


def test_huge_integers_are_clamped_to_int64() -> None:
    line = to_line(point(input_tokens=2**70, output_tokens=1, cost_nano=2**64))
    big = 2**63 - 1
    assert f"input_tokens={big}i,output_tokens=1i,total_tokens={big}i" in line
    assert f"cost_usd={format_nano(big)}," in line


def test_timestamp_is_event_ms_plus_a_stable_sub_ms_offset() -> None:
    # Pinned value: the offset must not change between processes or releases,
    # or a redelivery after an upgrade would become a second point.
    assert sub_ms("req-1") == 143_243
    digest = hashlib.blake2b(b"req-1", digest_size=8).digest()
    assert sub_ms("req-1") == int.from_bytes(digest, "big") % 1_000_000
    assert timestamp_ns(point()) == MS * 1_000_000 + 143_243
    assert timestamp_ns(point()) // 1_000_000 == MS  # stays inside the event's millisecond


def test_duplicate_gives_identical_line() -> None:
    assert to_line(point()) == to_line(point())


def test_distinct_requests_in_one_millisecond_get_distinct_timestamps() -> None:
    ids = [f"req-{i}" for i in range(200)]
    stamps = {timestamp_ns(point(request_id=rid)) for rid in ids}
    assert len(stamps) == len(ids)
    assert all(s // 1_000_000 == MS for s in stamps)


def test_to_lines_keeps_order() -> None:
    points = [point(request_id=f"r{i}") for i in range(5)]
    assert to_lines(points) == [to_line(p) for p in points]


def test_times_outside_influxdb_range_are_clamped_not_rejected() -> None:
    """A valid event of year 1 (RFC 3339 allows it) must not give a line InfluxDB rejects
    (the whole batch would be refused): its millisecond is clamped into int64 ns, the
    sub-millisecond digits still differ per request."""
    year_1_ms = -62_135_596_800_000
    for event_ms in (year_1_ms, 2**62):
        times = {
            int(line(rid, "o", "u", "m", 1, 1, 0, 0, event_ms).rsplit(" ", 1)[1])
            for rid in ("a", "b")
        }
        assert len(times) == 2
        assert all(-(2**63) + 2 <= ns <= 2**63 - 2 for ns in times)
    assert line("a", "o", "u", "m", 1, 1, 0, 0, 5).endswith(f" {5_000_000 + sub_ms('a')}")


def _reference_line(
    request_id: str,
    client_org_id: str,
    user_id: str,
    model: str,
    input_tokens: int,
    output_tokens: int,
    cost_nano: int,
    markup_cost_nano: int,
    event_ms: int,
) -> str:
    """The line as the module docstring writes it, part by part (no caches, no inlining)."""
    top = 2**63 - 1
    inp, out = min(input_tokens, top), min(output_tokens, top)
    tags = ""
    for key, value in (("client_org_id", client_org_id), ("model", model), ("user_id", user_id)):
        if value:
            escaped = "".join(
                {"\\": "\\\\", ",": "\\,", " ": "\\ ", "=": "\\="}.get(c, c) for c in value
            )
            escaped = escaped.replace("\n", "\\n").replace("\r", "\\r")
            tags += f",{key}={escaped}" + ("\\ " if value.endswith("\\") else "")
    rid = "".join(
        {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r"}.get(c, c) for c in request_id
    )
    low, high = -(2**63 - 2) // 1_000_000 + 1, (2**63 - 2) // 1_000_000 - 1
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    ns = min(max(event_ms, low), high) * 1_000_000 + int.from_bytes(digest, "big") % 1_000_000
    return (
        f"usage_tracking{tags} input_tokens={inp}i,output_tokens={out}i,"
        f"total_tokens={min(inp + out, top)}i,cost_usd={format_nano(min(cost_nano, top))},"
        f"markup_cost_usd={format_nano(min(markup_cost_nano, top))},"
        f'request_id="{rid}" {ns}'
    )


_TEXT = st.text(alphabet=st.sampled_from(list('ab\\, ="\n\rż\x00')), max_size=6)
_COUNT = st.one_of(st.integers(0, 10**12), st.just(2**63 - 1), st.just(2**64))


@settings(max_examples=300, deadline=None)
@given(
    st.text(min_size=1, max_size=8),
    _TEXT,
    _TEXT,
    _TEXT,
    _COUNT,
    _COUNT,
    _COUNT,
    _COUNT,
    st.one_of(st.integers(-(2**64), 2**64), st.integers(0, 4 * 10**12)),
)
def test_line_is_the_documented_text_byte_for_byte(
    request_id: str,
    org: str,
    user: str,
    model: str,
    inp: int,
    out: int,
    cost: int,
    markup: int,
    ms: int,
) -> None:
    """The hot path's line (caches, inlined time) is the documented text exactly: a
    resent point must overwrite itself."""
    args = (request_id, org, user, model, inp, out, cost, markup, ms)
    assert line(*args) == _reference_line(*args)
    assert line(*args) == to_line(RawPoint(*args))
