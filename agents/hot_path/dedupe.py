"""One home partition's dedupe verdicts for a batch: new, duplicate, or conflicting.

The same rule for the hot path (:mod:`agents.hot_path.service`) and the rebuild
(:mod:`agents.hot_path.home_state`), so that both keep the same fingerprint for every id and a
later copy gets the same verdict whoever holds the partition:

* copies are ranked by the order the chain consumed them: batch by batch, and inside a
  batch by :func:`ranks` (below an open replay fence first, then the usage topic before
  the rerouted one, then by offset). The live read order inside a batch (which fetch
  came first) is not recorded anywhere, so the hot path does not use it: it bills the
  copy of lowest rank, and a rebuild, which knows each batch's positions from the chain,
  finds the same copy;
* the first copy of an id not tracked yet is **new** (billed; its fingerprint is kept);
* any other copy is a **duplicate** when its billing fingerprint equals the kept one
  (or, inside the batch, the new copy's), and a **conflict** otherwise (docs/contract.md §1,
  ``conflicting_duplicate``).

Vectorised over the batch (numpy): one lexsort to find each id's first copy, one lookup
of those in the state, and comparisons; no Python call per event but the key and
fingerprint gathering.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from streams.model.event import UsageEvent
from streams.model.fingerprint import billing_fingerprints
from tables.dedupe.seen_requests import Keys, SeenRequests

__all__ = ["NO_FENCE", "Verdicts", "judge", "ranks"]

#: The bound of a topic without an open replay fence: no offset reaches it.
NO_FENCE = 1 << 62


@dataclass(slots=True)
class Verdicts:
    new: np.ndarray  # indices of the new requests' first copies, ascending
    new_keys: Keys  # their keys and fingerprints, in the same order
    duplicates: int
    conflicts: np.ndarray  # indices of conflicting copies
    first_fps: np.ndarray  # for each conflict, the fingerprint of the copy that counts


def ranks(
    batch: np.ndarray, rerouted: np.ndarray, offsets: np.ndarray, bounds: tuple[int, int]
) -> np.ndarray:
    """Each copy's place in the chain's order (module docstring), as one sortable int64:
    its batch (counted from the first one read: fewer than 2^21), below/above the fence,
    topic, offset (from the lowest one: a read spans fewer than 2^40)."""
    if not len(offsets):
        return np.zeros(0, dtype=np.int64)
    offsets = offsets.astype(np.int64)
    bound = np.where(rerouted, bounds[1], bounds[0])
    above = (offsets >= bound).astype(np.int64)
    rank: np.ndarray = (
        (batch.astype(np.int64) << 42)
        | (above << 41)
        | (rerouted.astype(np.int64) << 40)
        | (offsets - offsets.min())
    )
    return rank


def judge(
    events: Sequence[UsageEvent],
    rank: np.ndarray,
    seen: SeenRequests,
    also: Sequence[Keys] = (),
) -> Verdicts:
    """The verdict on each of one home partition's ``events`` (``rank``: their places,
    :func:`ranks`), against ``seen`` and the runs ``also`` (the batch being committed)."""
    count = len(events)
    keys = Keys.of([event.request_id for event in events], billing_fingerprints(events))
    if not count:
        empty = np.zeros(0, dtype=np.intp)
        return Verdicts(empty, keys, 0, empty, np.zeros(0, dtype=np.uint64))
    # by key, copies of one id in rank order: two stable argsorts (lexsort of three
    # keys cost twice as much); keys sharing ``a`` alone (2^-64) need the lexsort
    by_rank = np.argsort(rank, kind="stable")
    order = by_rank[np.argsort(keys.a[by_rank], kind="stable")]
    sa, sb = keys.a[order], keys.b[order]
    if np.any((sa[1:] == sa[:-1]) & (sb[1:] != sb[:-1])):
        order = np.lexsort((rank, keys.b, keys.a))
        sa, sb = keys.a[order], keys.b[order]
    starts = np.ones(count, dtype=bool)
    starts[1:] = (sa[1:] != sa[:-1]) | (sb[1:] != sb[:-1])
    group = np.cumsum(starts) - 1  # per sorted element, its id's number
    firsts = order[starts]  # per id, the index of its first copy
    found, kept = seen.lookup(keys.take(firsts), also)
    reference = np.where(found, kept, keys.fp[firsts])  # the fingerprint that counts
    is_new = np.zeros(count, dtype=bool)
    is_new[firsts[~found]] = True
    ref_of = np.empty(count, dtype=np.uint64)
    ref_of[order] = reference[group]
    conflicting = ~is_new & (keys.fp != ref_of)
    new = np.flatnonzero(is_new)
    conflicts = np.flatnonzero(conflicting)
    duplicates = count - len(new) - len(conflicts)
    return Verdicts(new, keys.take(new), duplicates, conflicts, ref_of[conflicts])
