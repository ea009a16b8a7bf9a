"""The billing fingerprint and the dedupe verdicts built on it (agents/hot_path/dedupe.py)."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.hot_path.dedupe import NO_FENCE, judge, ranks
from streams.model.event import CONFLICT, REASONS, UsageEvent
from streams.model.fingerprint import (
    BILLING_FIELDS,
    billing_fingerprint,
    billing_fingerprints,
    conflict,
    differing_fields,
)
from tables.dedupe.seen_requests import Keys, SeenRequests

_TEXT = st.text(min_size=1, max_size=8)
_EVENT = st.builds(
    UsageEvent,
    st.sampled_from(["r1", "r2", "r3", "5f0e7a0c-9d7b-4b64-8e8e-2a8e0f0c1d2e"]),
    st.sampled_from(["org-1", "org-2", "\ud800"]),
    _TEXT,
    st.sampled_from(["openai/gpt-4o-mini", "m"]),
    st.integers(0, 10**12),
    st.integers(0, 10**12),
    st.one_of(st.none(), st.integers(0, 10**15)),
    st.integers(-62_135_596_800_000, 253_402_300_799_999),  # ISO dates before 1970 too
)
_FIELD_OF = {
    "client_org_id": "client_org_id",
    "user_id": "user_id",
    "model": "model",
    "input_tokens": "input_tokens",
    "output_tokens": "output_tokens",
    "cost_usd": "cost_nano",
    "timestamp": "event_ms",
}


@given(st.lists(_EVENT, max_size=30))
def test_the_vectorised_fingerprint_is_the_scalar_one(events: list[UsageEvent]) -> None:
    assert billing_fingerprints(events).tolist() == [billing_fingerprint(e) for e in events]


@given(_EVENT, _EVENT)
def test_named_fields_certainly_differ_and_equal_events_match(
    first: UsageEvent, later: UsageEvent
) -> None:
    a, b = billing_fingerprint(first), billing_fingerprint(later)
    named = differing_fields(a, b)
    for name in named:
        assert getattr(first, _FIELD_OF[name]) != getattr(later, _FIELD_OF[name])
    if all(getattr(first, f) == getattr(later, f) for f in _FIELD_OF.values()):
        assert a == b and not named  # the request_id is not a billing field


def test_each_field_alone_is_told_and_named() -> None:
    base = UsageEvent("r", "org", "user", "model", 100, 10, 123_456, 1_795_169_472_000)
    changes = {
        "client_org_id": "org2",
        "user_id": "user2",
        "model": "model2",
        "input_tokens": 101,
        "output_tokens": 11,
        "cost_nano": None,
        "event_ms": 1_795_169_472_001,
    }
    for name, value in zip(BILLING_FIELDS, changes.values(), strict=True):
        other = msgspec.structs.replace(base, **{_FIELD_OF[name]: value})
        assert billing_fingerprint(other) != billing_fingerprint(base)
        assert differing_fields(billing_fingerprint(base), billing_fingerprint(other)) == (name,)
    # a missing cost differs from a zero one
    zero = msgspec.structs.replace(base, cost_nano=0)
    free = msgspec.structs.replace(base, cost_nano=None)
    assert billing_fingerprint(zero) != billing_fingerprint(free)
    message = conflict(zero, billing_fingerprint(base)).message
    assert conflict(zero, billing_fingerprint(base)).reason == CONFLICT
    assert message.endswith("billing fields: cost_usd") and "'r'" in message


def test_the_fingerprint_is_the_same_in_another_process() -> None:
    """No salted hash(): a snapshot written by one host is read by another."""
    code = (
        "from streams.model.event import UsageEvent; from streams.model.fingerprint import"
        " billing_fingerprint as f; print(f(UsageEvent('r','o','u','m',1,2,None,3)))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert outputs == {str(billing_fingerprint(UsageEvent("r", "o", "u", "m", 1, 2, None, 3)))}


def test_the_conflict_reason_is_a_metric_label() -> None:
    assert CONFLICT in REASONS


# Verdicts ------------------------------------------------------------------------------


def _event(rid: str, tokens: int = 100, cost: int | None = 5) -> UsageEvent:
    return UsageEvent(rid, "org", "user", "m", tokens, 1, cost, 1_795_169_472_000)


def _reference(
    events: list[UsageEvent], order: list[int], kept: dict[str, int]
) -> tuple[set[int], int, dict[int, int]]:
    """The rule in plain Python: in rank order, the first copy of an id not kept is new;
    any other copy is a duplicate when its fingerprint equals the one that counts."""
    counts = dict(kept)
    new, duplicates, conflicts = set(), 0, {}
    for i in order:
        fp = billing_fingerprint(events[i])
        rid = events[i].request_id
        if rid not in counts:
            counts[rid] = fp
            new.add(i)
        elif counts[rid] == fp:
            duplicates += 1
        else:
            conflicts[i] = counts[rid]
    return new, duplicates, conflicts


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "d"]),
            st.integers(0, 2),  # tokens variant: 0 and 1 make conflicts
            st.booleans(),  # rerouted
        ),
        max_size=25,
    ),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 2), max_size=2),
    st.one_of(st.none(), st.tuples(st.integers(0, 30), st.integers(0, 30))),
)
def test_verdicts_match_the_plain_rule_in_rank_order(
    copies: list[tuple[str, int, bool]],
    kept_variants: dict[str, int],
    fence: tuple[int, int] | None,
) -> None:
    events = [_event(rid, 100 + variant) for rid, variant, _ in copies]
    rerouted = np.array([flag for _, _, flag in copies], dtype=bool)
    offsets = np.arange(len(copies), dtype=np.int64) * 2 + rerouted  # distinct per topic
    rank = ranks(np.zeros(len(copies), dtype=np.int64), rerouted, offsets, fence or (NO_FENCE,) * 2)
    seen = SeenRequests(ttl_ms=86_400_000)
    kept = {rid: billing_fingerprint(_event(rid, 100 + v)) for rid, v in kept_variants.items()}
    if kept:
        seen.add(list(kept), 0, np.array(list(kept.values()), dtype=np.uint64))
    verdicts = judge(events, rank, seen)
    new, duplicates, conflicts = _reference(events, np.argsort(rank, kind="stable").tolist(), kept)
    assert set(verdicts.new.tolist()) == new
    assert verdicts.duplicates == duplicates
    assert dict(zip(verdicts.conflicts.tolist(), verdicts.first_fps.tolist(), strict=True)) == (
        conflicts
    )
    assert Keys.of([events[i].request_id for i in sorted(new)]).a.tolist() == (
        verdicts.new_keys.a.tolist()
    )


def test_below_a_fence_comes_first_then_usage_before_rerouted() -> None:
    """Ranks: an open fence's below-bound copies first (either topic), then the usage
    topic before the rerouted one, then offsets."""
    rerouted = np.array([True, False, True, False])
    offsets = np.array([5, 50, 20, 10])
    order = np.argsort(ranks(np.zeros(4, dtype=np.int64), rerouted, offsets, (40, 30))).tolist()
    # below the fence: usage 10, rerouted 5, rerouted 20; above: usage 50
    assert order == [3, 0, 2, 1]
    order = np.argsort(ranks(np.zeros(4, dtype=np.int64), rerouted, offsets, (NO_FENCE,) * 2))
    assert order.tolist() == [3, 1, 0, 2]
