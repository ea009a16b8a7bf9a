"""The in-memory dedupe state of one home partition: exact, expiring by whole buckets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tables.seen_requests import SeenRequests, compact

DAY = 86_400_000


def test_known_add_and_expiry_no_earlier_than_the_ttl() -> None:
    seen = SeenRequests(ttl_ms=7 * DAY)
    seen.add(["a", "b"], recorded_ms=10 * DAY)
    seen.add(["c"], recorded_ms=12 * DAY)
    assert seen.known(["a", "c", "x"]) == {"a", "c"}
    assert "b" in seen and "x" not in seen and len(seen) == 3
    # not one millisecond before the TTL has passed for "a" and "b"
    assert seen.prune(now_ms=17 * DAY - 1) == 0
    assert seen.known(["a", "b"]) == {"a", "b"}
    # forgotten within one bucket (ttl / 8) after it
    assert seen.prune(now_ms=17 * DAY + 7 * DAY // 8) == 2
    assert seen.known(["a", "b", "c"]) == {"c"}


@given(
    st.lists(st.tuples(st.text(max_size=5), st.integers(0, 30 * DAY)), max_size=60),
    st.integers(0, 40 * DAY),
)
def test_never_forgets_early_and_never_invents(events: list[tuple[str, int]], now: int) -> None:
    ttl = 7 * DAY
    seen = SeenRequests(ttl_ms=ttl)
    for request_id, recorded in events:
        seen.add([request_id], recorded)
    seen.prune(now)
    for request_id, recorded in events:
        if recorded > now - ttl:  # younger than the TTL: must be known
            assert request_id in seen
    everything = {rid for rid, _ in events}
    assert seen.known(list(everything) + ["never-added-\x00"]) <= everything


def test_a_positive_ttl_is_required() -> None:
    with pytest.raises(ValueError):
        SeenRequests(ttl_ms=0)


def test_uuids_are_kept_compact_and_exactly() -> None:
    canonical = "123e4567-e89b-12d3-a456-426614174000"
    assert compact(canonical) == bytes.fromhex("123e4567e89b12d3a456426614174000")
    # not canonical: kept as they are, so they never meet the canonical one
    for other in (
        canonical.upper(),
        "123e4567-e89b-12d3-a456-42661417400g",
        "123e4567-e89b-12d3-a456 426614174000",
        "123e4567-e89b-12d3-a456-4266141 4000",
        "123e4567e89b12d3a456426614174000",
    ):
        assert compact(other) == other
    seen = SeenRequests(ttl_ms=DAY)
    seen.add([canonical, canonical.upper()], recorded_ms=0)
    assert canonical in seen and canonical.upper() in seen and len(seen) == 2
    assert seen.known([canonical, "123e4567-e89b-12d3-a456-426614174001"]) == {canonical}


@given(st.uuids(), st.booleans())
def test_any_uuid_round_trips_through_its_key(value: object, upper: bool) -> None:
    text = str(value).upper() if upper else str(value)
    seen = SeenRequests(ttl_ms=DAY)
    seen.add([text], recorded_ms=0)
    assert text in seen
    assert str(value).swapcase() not in seen or str(value).swapcase() == text


@given(st.lists(st.one_of(st.uuids().map(str), st.text(min_size=1, max_size=40)), max_size=20))
def test_keys_added_in_compact_form_are_the_same_ids(ids: list[str]) -> None:
    """The hot path compacts each id once and uses has()/add_keys() with the key."""
    by_id, by_key = SeenRequests(ttl_ms=DAY), SeenRequests(ttl_ms=DAY)
    half = ids[: len(ids) // 2]
    by_id.add(half, recorded_ms=0)
    by_key.add_keys([compact(rid) for rid in half], recorded_ms=0)
    for rid in ids:
        assert (rid in by_id) == (rid in by_key) == by_key.has(compact(rid)) == (rid in half)
    assert len(by_id) == len(by_key)


def _compact_by_slices(request_id: str) -> str | bytes:
    """The first implementation of compact(), kept as the oracle of the faster one."""
    if len(request_id) == 36 and (
        request_id[8] == request_id[13] == request_id[18] == request_id[23] == "-"
    ):
        digits = (
            request_id[:8]
            + request_id[9:13]
            + request_id[14:18]
            + request_id[19:23]
            + request_id[24:]
        )
        if digits == digits.lower():
            try:
                raw = bytes.fromhex(digits)
            except ValueError:
                return request_id
            if len(raw) == 16:
                return raw
    return request_id


_NEAR_MISSES = st.sampled_from(list("0aAfFgG- \t\n\u0660\uff10\u00e9-_"))


@given(st.uuids(), st.lists(st.tuples(st.integers(0, 35), _NEAR_MISSES), max_size=3))
def test_compact_agrees_with_the_slicing_oracle(value: object, changes: list) -> None:
    """Canonical UUIDs and ids one to three characters away from one (uppercase, a
    non-hex letter, whitespace that ``fromhex`` would skip, non-ASCII digits, a dash
    moved) get the same key from both implementations."""
    text = list(str(value))
    for position, char in changes:
        text[position] = char
    request_id = "".join(text)
    assert compact(request_id) == _compact_by_slices(request_id)
    assert compact(request_id + "0") == _compact_by_slices(request_id + "0")
