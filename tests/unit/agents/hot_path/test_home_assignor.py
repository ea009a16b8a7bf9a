"""agents/hot_path/home_assignor.py: balanced, sticky assignment of whole home partitions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agents.hot_path.home_assignor import assign_home_partitions


def test_a_joining_member_takes_only_its_share() -> None:
    before = {"a": [0, 1, 2, 3]}
    after = assign_home_partitions(range(4), {**before, "b": []})
    assert after["a"] == [0, 1] and after["b"] == [2, 3]


def test_a_leaving_members_partitions_spread_over_the_rest_the_rest_keep_theirs() -> None:
    after = assign_home_partitions(range(6), {"a": [0, 1], "c": [4, 5]})  # b left with 2, 3
    assert set(after["a"]) >= {0, 1} and set(after["c"]) >= {4, 5}
    assert sorted(after["a"] + after["c"]) == list(range(6))


def test_a_restart_gets_its_own_partitions_back() -> None:
    owned = {"a": [0, 2], "b": [1, 3]}
    assert assign_home_partitions(range(4), owned) == owned


@given(
    st.integers(1, 24),
    st.lists(st.lists(st.integers(0, 30), max_size=10), min_size=1, max_size=8),
)
def test_every_partition_once_balanced_and_as_sticky_as_balance_allows(
    count: int, claims: list[list[int]]
) -> None:
    owned = {f"m{i}": claim for i, claim in enumerate(claims)}
    result = assign_home_partitions(range(count), owned)
    everything = sorted(p for parts in result.values() for p in parts)
    assert everything == list(range(count))
    sizes = [len(parts) for parts in result.values()]
    assert max(sizes) - min(sizes) <= 1
    # nobody loses a partition it owned unless it had more than its share
    for member, parts in result.items():
        mine = set(owned[member]) & set(range(count))
        if len(mine) <= min(sizes):
            first_claims = {
                p for p in mine if all(p not in owned[o] for o in sorted(owned) if o < member)
            }
            assert first_claims <= set(parts)
