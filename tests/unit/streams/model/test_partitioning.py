"""Home partitions: the vectorised murmur2 against aiokafka's own partitioner."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given
from hypothesis import strategies as st

from streams.model.partitioning import home_partition, home_partitions, murmur2_partitions


def aiokafka_partition(key: bytes, partitions: int) -> int:
    every = list(range(partitions))
    return DefaultPartitioner()(key, every, every)


@given(st.lists(st.binary(max_size=80), max_size=60), st.integers(1, 64))
def test_vectorised_murmur2_is_aiokafkas_partitioner(keys: list[bytes], partitions: int) -> None:
    assert murmur2_partitions(keys, partitions) == [aiokafka_partition(k, partitions) for k in keys]


@given(st.lists(st.text(min_size=1, max_size=128), max_size=40), st.integers(1, 16))
def test_home_partition_of_request_ids(ids: list[str], partitions: int) -> None:
    homes = home_partitions(ids, partitions)
    assert homes == [home_partition(rid, partitions) for rid in ids]
    assert homes == [aiokafka_partition(rid.encode(), partitions) for rid in ids]
    assert all(0 <= home < partitions for home in homes)


def test_every_tail_length_and_non_ascii_keys() -> None:
    every = list(range(1000))
    for key in (b"", b"a", b"ab", b"abc", b"abcd", b"request-0001", "żółw".encode()):
        assert murmur2_partitions([key], 1000) == [DefaultPartitioner()(key, every, every)]
