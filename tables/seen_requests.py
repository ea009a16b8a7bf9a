"""The request ids one home partition has seen: the worker's dedupe state (issue 9).

Exact and in memory: a set per time bucket, so expiry drops whole sets. An id is known
from the moment its batch is prepared; it is forgotten no earlier than ``ttl_ms`` after it
was recorded (at most one bucket later), which is the contract's "at least
``DEDUP_TTL_DAYS``". What the set holds is *defined* by the partition's chain head (see
:mod:`streams.batch_log`): every id of a valid home event below the head's positions. So a
worker that gets the partition rebuilds it exactly by reading those events again
(:meth:`add` with each event's record time); nothing here needs to be durable.

Memory: a request id in the canonical UUID form (36 characters, lowercase hex, dashes at
8/13/18/23: what gateways generate) is kept as its 16 bytes, ~82 B per id with the set's
slot (118 B as a ``str``); any other id is kept as it is. The mapping is exact: only a
canonical UUID maps to those 16 bytes, and bytes never equal a ``str``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from itertools import islice

__all__ = ["SeenRequests", "compact"]


#: A request id in the canonical UUID form: lowercase ASCII hex, dashes at 8/13/18/23.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def compact(request_id: str) -> str | bytes:
    """The key an id is kept under (module docstring): 16 bytes for a canonical UUID.

    One compiled match and one ``fromhex``: this runs once per event on the hot path
    (slicing and re-joining the id's five groups cost about twice as much)."""
    if len(request_id) == 36 and _CANONICAL_UUID.fullmatch(request_id):
        return bytes.fromhex(request_id.replace("-", ""))
    return request_id


class SeenRequests:
    """``known`` / ``add`` / ``prune`` over time-bucketed sets (module docstring)."""

    def __init__(self, ttl_ms: int, buckets_per_ttl: int = 8) -> None:
        if ttl_ms <= 0:
            raise ValueError("ttl_ms must be positive")
        self.ttl_ms = ttl_ms
        self.bucket_ms = max(1, ttl_ms // buckets_per_ttl)
        self._buckets: dict[int, set[str]] = {}

    def __len__(self) -> int:
        return sum(len(ids) for ids in self._buckets.values())

    def __contains__(self, request_id: object) -> bool:
        if not isinstance(request_id, str):
            return False
        return self.has(compact(request_id))

    def has(self, key: str | bytes) -> bool:
        """Whether the id kept under ``key`` (:func:`compact`) was seen."""
        for ids in self._buckets.values():
            if key in ids:
                return True
        return False

    def sets(self) -> list[set[str | bytes]]:
        """The sets :meth:`has` looks in (a caller checking many keys at once looks in
        them itself, without a call per key)."""
        return list(self._buckets.values())

    def approx_bytes(self, sample: int = 256) -> int:
        """Memory held: the sets' tables exactly, the ids from a sample of their sizes
        (cheap enough for a metric every few seconds)."""
        tables = sum(sys.getsizeof(ids) for ids in self._buckets.values())
        count = len(self)
        if not count:
            return tables
        picked = [rid for ids in self._buckets.values() for rid in islice(ids, sample)][:sample]
        per_id = sum(sys.getsizeof(rid) for rid in picked) / len(picked)
        return int(tables + per_id * count)

    def known(self, request_ids: Iterable[str]) -> set[str]:
        """The ids among ``request_ids`` seen before."""
        buckets = list(self._buckets.values())
        if len(buckets) == 1:
            (only,) = buckets
            return {rid for rid in request_ids if compact(rid) in only}
        return {rid for rid in request_ids if any(compact(rid) in ids for ids in buckets)}

    def add(self, request_ids: Iterable[str], recorded_ms: int) -> None:
        """Remember ids recorded at ``recorded_ms`` (epoch ms)."""
        bucket = recorded_ms - recorded_ms % self.bucket_ms + self.bucket_ms
        ids = self._buckets.get(bucket)
        if ids is None:
            ids = self._buckets[bucket] = set()
        ids.update(map(compact, request_ids))

    def add_keys(self, keys: Iterable[str | bytes], recorded_ms: int) -> None:
        """:meth:`add` for ids already in their :func:`compact` form."""
        bucket = recorded_ms - recorded_ms % self.bucket_ms + self.bucket_ms
        ids = self._buckets.get(bucket)
        if ids is None:
            ids = self._buckets[bucket] = set()
        ids.update(keys)

    def prune(self, now_ms: int) -> int:
        """Forget buckets whose every id was recorded at least ``ttl_ms`` ago; returns
        how many ids were forgotten."""
        cutoff = now_ms - self.ttl_ms
        expired = [bucket for bucket in self._buckets if bucket <= cutoff]
        return sum(len(self._buckets.pop(bucket)) for bucket in expired)
