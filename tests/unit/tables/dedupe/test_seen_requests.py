"""The dedupe state of one home partition: exact keys and fingerprints in sorted numpy
runs, expiring by whole buckets; held to a plain Python dict as the reference."""

from __future__ import annotations

import hashlib
import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tables.dedupe import seen_requests
from tables.dedupe.seen_requests import Keys, SeenRequests, compact, compact_all

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


def test_a_positive_ttl_is_required() -> None:
    with pytest.raises(ValueError):
        SeenRequests(ttl_ms=0)


# The reference: a dict id -> (fingerprint, recorded_ms) of first copies ----------------

_ID = st.one_of(
    st.uuids().map(str),
    st.text(min_size=1, max_size=12),
    st.sampled_from(["a", "b", "c", "A", "a\x00", "\ud800"]),
)
_STEP = st.tuples(
    st.lists(st.tuples(_ID, st.integers(0, 3)), max_size=30),  # (id, fingerprint) copies
    st.integers(0, 30 * DAY),  # recorded
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_STEP, max_size=12), st.integers(0, 40 * DAY), st.integers(1, 40))
def test_membership_fingerprints_and_expiry_match_a_plain_dict(
    steps: list[tuple[list[tuple[str, int]], int]], now: int, delta_max: int
) -> None:
    """add_first keeps the first copy of each id not tracked yet and its fingerprint;
    lookup finds exactly those; prune never forgets an id younger than the TTL and never
    keeps one older than TTL + a bucket. A tiny DELTA_MAX makes every step merge runs."""
    ttl = 7 * DAY
    original = seen_requests.DELTA_MAX
    seen_requests.DELTA_MAX = delta_max
    try:
        seen = SeenRequests(ttl_ms=ttl)
        reference: dict[str, tuple[int, int]] = {}
        for copies, recorded in sorted(steps, key=lambda step: step[1]):
            ids = [rid for rid, _ in copies]
            fps = np.array([fp for _, fp in copies], dtype=np.uint64)
            added = seen.add_first(Keys.of(ids, fps), recorded)
            expected_added = []
            for rid, fp in copies:
                fresh = rid not in reference
                if fresh:
                    reference[rid] = (fp, recorded)
                expected_added.append(fresh)
            # (a later copy in the same call is never "added")
            assert added.tolist() == expected_added
        assert len(seen) == len(reference)
        probe = list(reference) + ["never-added-\x01", str(uuid.UUID(int=7))]
        found, fps = seen.lookup(Keys.of(probe))
        for rid, hit, fp in zip(probe, found.tolist(), fps.tolist(), strict=True):
            assert hit == (rid in reference)
            assert fp == (reference[rid][0] if hit else 0)
        seen.prune(now)
        for rid, (fp, recorded) in reference.items():
            if recorded > now - ttl:  # younger than the TTL: must be known
                assert seen.fingerprint(rid) == fp
            if recorded + seen.bucket_ms <= now - ttl:  # older than TTL + a bucket: gone
                assert rid not in seen
    finally:
        seen_requests.DELTA_MAX = original


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=40))
def test_keys_sharing_their_sort_column_are_still_told_apart(pairs: list) -> None:
    """Two keys with the same ``a`` (probability 2^-64 for real ids) are found by ``b``:
    built directly, with many ties, they go through the lookup's slow path."""
    unique = sorted(set(pairs))
    a = np.array([x for x, _ in unique], dtype=np.uint64)
    b = np.array([y for _, y in unique], dtype=np.uint64)
    fp = np.arange(len(unique), dtype=np.uint64) + 100
    seen = SeenRequests(ttl_ms=DAY)
    half = len(unique) // 2
    seen.add_keys(Keys(a[:half], b[:half], fp[:half]), 0)
    seen.add_keys(Keys(a[half:], b[half:], fp[half:]), 0)
    queries = Keys(
        np.array([x for x in range(5) for _ in range(5)], dtype=np.uint64),
        np.array([y for _ in range(5) for y in range(5)], dtype=np.uint64),
        np.zeros(25, dtype=np.uint64),
    )
    found, fps = seen.lookup(queries)
    index = {pair: i for i, pair in enumerate(unique)}
    for q in range(25):
        pair = (int(queries.a[q]), int(queries.b[q]))
        assert bool(found[q]) == (pair in index)
        assert int(fps[q]) == (100 + index[pair] if pair in index else 0)


def test_memory_is_24_bytes_per_id_and_at_most_4_more_for_the_bitmaps() -> None:
    seen = SeenRequests(ttl_ms=7 * DAY)
    ids = [str(uuid.uuid4()) for _ in range(200_000)]
    for start in range(0, len(ids), 5_000):
        part = ids[start : start + 5_000]
        seen.add_keys(Keys.of(part, np.ones(len(part), dtype=np.uint64)), start)
    assert len(seen) == 200_000
    assert seen.approx_bytes() == 24 * 200_000  # no lookup yet: no bitmap
    found, _ = seen.lookup(Keys.of(ids[:100] + ["x"]))
    assert found.sum() == 100
    assert 24 * 200_000 < seen.approx_bytes() <= 28 * 200_000


def test_the_batch_being_committed_counts_as_seen() -> None:
    seen = SeenRequests(ttl_ms=DAY)
    seen.add(["old"], 0, np.array([5], dtype=np.uint64))
    pending = Keys.of(["pending"], np.array([9], dtype=np.uint64)).sorted()
    found, fps = seen.lookup(Keys.of(["old", "pending", "new"]), also=[pending])
    assert found.tolist() == [True, True, False]
    assert fps.tolist() == [5, 9, 0]


# Keys ----------------------------------------------------------------------------------


def test_uuids_are_kept_as_their_bytes_and_other_ids_hashed() -> None:
    canonical = "123e4567-e89b-12d3-a456-426614174000"
    assert compact(canonical) == bytes.fromhex("123e4567e89b12d3a456426614174000")
    # not canonical: a keyed BLAKE2b-128 of the id, so they never meet the canonical one
    for other in (
        canonical.upper(),
        "123e4567-e89b-12d3-a456-42661417400g",
        "123e4567-e89b-12d3-a456 426614174000",
        "123e4567-e89b-12d3-a456-4266141 4000",
        "123e4567e89b12d3a456426614174000",
    ):
        assert (
            compact(other)
            == hashlib.blake2b(other.encode(), digest_size=16, key=seen_requests._HASH_KEY).digest()
        )
    seen = SeenRequests(ttl_ms=DAY)
    seen.add([canonical, canonical.upper()], recorded_ms=0)
    assert canonical in seen and canonical.upper() in seen and len(seen) == 2
    assert seen.known([canonical, "123e4567-e89b-12d3-a456-426614174001"]) == {canonical}


_NEAR_MISSES = st.sampled_from(list("0aAfFgG- \t\n\u0660\uff10\u00e9-_"))


@given(
    st.lists(
        st.tuples(st.uuids(), st.lists(st.tuples(st.integers(0, 35), _NEAR_MISSES), max_size=2)),
        max_size=8,
    ),
    st.lists(st.text(max_size=40), max_size=2),
)
def test_a_batch_of_keys_equals_the_keys_one_by_one(uuids: list, others: list[str]) -> None:
    """compact_all's fast path for batches of canonical UUIDs (and its fall-back for any
    other batch) gives each id the key compact() gives it: UUIDs one or two characters
    away from canonical (uppercase, a non-hex letter, whitespace that ``fromhex`` would
    skip, a dash moved), ids of other lengths, mixed batches."""
    ids = []
    for value, changes in uuids:
        text = list(str(value))
        for position, char in changes:
            text[position] = char
        ids.append("".join(text))
    for batch in (ids, ids + others, [str(value) for value, _ in uuids]):
        assert compact_all(batch) == b"".join(compact(rid) for rid in batch)


@given(st.lists(st.text(min_size=35, max_size=37), min_size=2, max_size=4))
def test_lengths_that_only_add_up_are_not_taken_for_uuids(ids: list[str]) -> None:
    assert compact_all(ids) == b"".join(compact(rid) for rid in ids)


@given(st.uuids())
def test_key_bytes_round_trips(value: uuid.UUID) -> None:
    keys = Keys.of([str(value), "other"])
    assert keys.key_bytes(0) == value.bytes
    assert keys.key_bytes(1) == compact("other")


def test_segments_rebuild_the_same_state() -> None:
    seen = SeenRequests(ttl_ms=8 * DAY)
    for day in range(5):
        ids = [f"d{day}-{i}" for i in range(1000)]
        seen.add(ids, day * DAY, np.full(1000, day, dtype=np.uint64))
    copy = SeenRequests.from_segments(8 * DAY, seen.segments())
    assert len(copy) == len(seen) == 5000
    assert copy.fingerprint("d3-17") == 3
    assert copy.prune(8 * DAY + DAY) == seen.prune(8 * DAY + DAY) > 0
    assert len(copy) == len(seen)
