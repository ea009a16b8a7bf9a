"""Home partitions: where every copy of a request is deduplicated.

A request's home partition is ``murmur2(request_id) & 0x7fffffff % N``: the partition
Kafka's default partitioner (Java client, aiokafka) gives a record keyed by the request id,
as producers are asked to key (docs/contract.md §1). The owner of partition p deduplicates the
requests homed at p; an event read anywhere else is moved there first (``<APP_ID>-rerouted``).

The hash is fixed here, not taken from whichever partitioner a producer used: librdkafka's
default (``consistent_random``, CRC32) puts the same key elsewhere, and two copies of one
request must meet on one partition whatever clients produced them.

Pure-Python murmur2 (``aiokafka.partitioner.murmur2``) costs ~34 µs a key, more than the
rest of an event's processing, so :func:`home_partitions` hashes a whole batch with numpy:
one vectorised pass per group of keys of equal length.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from aiokafka.partitioner import murmur2

__all__ = ["home_partition", "home_partitions", "murmur2_partitions"]

_M = np.uint32(0x5BD1E995)
_SEED = 0x9747B28C


def home_partition(request_id: str, partitions: int) -> int:
    """One request's home partition (the reference for :func:`home_partitions`)."""
    hashed: int = murmur2(request_id.encode())  # aiokafka is untyped
    return (hashed & 0x7FFFFFFF) % partitions


def home_partitions(request_ids: Sequence[str], partitions: int) -> list[int]:
    """The home partition of each request id, in order."""
    return murmur2_partitions([rid.encode() for rid in request_ids], partitions)


def murmur2_partitions(keys: Sequence[bytes], partitions: int) -> list[int]:
    """``murmur2(key) & 0x7fffffff % partitions`` for each key, as aiokafka's
    ``DefaultPartitioner`` computes it, vectorised with numpy (uint32 arithmetic wraps
    exactly as the Java client's int arithmetic does)."""
    result = [0] * len(keys)
    by_length: dict[int, list[int]] = {}
    for index, key in enumerate(keys):
        by_length.setdefault(len(key), []).append(index)
    with np.errstate(over="ignore"):
        for length, indices in by_length.items():
            if length == 0:
                data = np.zeros((len(indices), 0), dtype=np.uint8)
            else:
                data = np.frombuffer(b"".join(keys[i] for i in indices), dtype=np.uint8)
                data = data.reshape(len(indices), length)
            h = np.full(len(indices), (_SEED ^ length) & 0xFFFFFFFF, dtype=np.uint32)
            words = length // 4
            if words:
                blocks = np.ascontiguousarray(data[:, : words * 4]).view("<u4")
                for column in range(words):
                    k = blocks[:, column] * _M
                    k ^= k >> np.uint32(24)
                    k *= _M
                    h *= _M
                    h ^= k
            tail = words * 4
            extra = length % 4
            if extra >= 3:
                h ^= data[:, tail + 2].astype(np.uint32) << np.uint32(16)
            if extra >= 2:
                h ^= data[:, tail + 1].astype(np.uint32) << np.uint32(8)
            if extra >= 1:
                h ^= data[:, tail].astype(np.uint32)
                h *= _M
            h ^= h >> np.uint32(13)
            h *= _M
            h ^= h >> np.uint32(15)
            homes = ((h & np.uint32(0x7FFFFFFF)) % np.uint32(partitions)).tolist()
            for index, partition in zip(indices, homes, strict=True):
                result[index] = int(partition)
    return result
