"""The request ids one home partition has seen: the worker's dedupe state (issue 9).

Exact and in memory: a set per time bucket, so expiry drops whole sets. An id is known
from the moment its batch is prepared; it is forgotten no earlier than ``ttl_ms`` after it
was recorded (at most one bucket later), which is the contract's "at least
``DEDUP_TTL_DAYS``". What the set holds is *defined* by the partition's chain head (see
:mod:`streams.batch_log`): every id of a valid home event below the head's positions. So a
worker that gets the partition rebuilds it exactly by reading those events again
(:meth:`add` with each event's record time); nothing here needs to be durable.

Memory: ~110 B per id (a 36-character id is an 85-byte ``str`` plus the set's slot), about
110 MB for a million ids.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["SeenRequests"]


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
        return any(request_id in ids for ids in self._buckets.values())

    def known(self, request_ids: Iterable[str]) -> set[str]:
        """The ids among ``request_ids`` seen before."""
        buckets = list(self._buckets.values())
        if len(buckets) == 1:
            (only,) = buckets
            return {rid for rid in request_ids if rid in only}
        return {rid for rid in request_ids if any(rid in ids for ids in buckets)}

    def add(self, request_ids: Iterable[str], recorded_ms: int) -> None:
        """Remember ids recorded at ``recorded_ms`` (epoch ms)."""
        bucket = recorded_ms - recorded_ms % self.bucket_ms + self.bucket_ms
        ids = self._buckets.get(bucket)
        if ids is None:
            ids = self._buckets[bucket] = set()
        ids.update(request_ids)

    def prune(self, now_ms: int) -> int:
        """Forget buckets whose every id was recorded at least ``ttl_ms`` ago; returns
        how many ids were forgotten."""
        cutoff = now_ms - self.ttl_ms
        expired = [bucket for bucket in self._buckets if bucket <= cutoff]
        return sum(len(self._buckets.pop(bucket)) for bucket in expired)
