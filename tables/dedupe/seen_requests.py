"""The request ids one home partition has seen, each with the fingerprint of its first
copy's billing fields: the worker's dedupe state (issues 9, 20 and 23).

**What it holds** is *defined* by the partition's chain head (:mod:`streams.kafka.batch_log`):
every id of a valid home event below the head's positions, with the fingerprint
(:mod:`streams.model.fingerprint`) of the copy that was billed. So it is rebuilt exactly by
reading those events again in the order the chain consumed them
(:mod:`agents.hot_path.home_state`), or loaded from a snapshot taken at a chain head
(:mod:`tables.dedupe.seen_snapshots`) and caught up from there.

**Expiry.** Ids are kept per time bucket (an eighth of ``ttl_ms``); an id is forgotten
no earlier than ``ttl_ms`` after it was recorded (at most one bucket later), the
contract's "at least ``DEDUP_TTL_DAYS``". Expiry drops whole buckets.

**24 bytes per id**, in three ``uint64`` numpy arrays:

* the id's 16-byte key (:func:`compact`): a canonical UUID (lowercase hex, dashes at
  8/13/18/23: what gateways generate) is its own 16 bytes, exactly; any other id is its
  keyed BLAKE2b-128. Two distinct ids share a key only by a 128-bit collision: among the
  80M ids of a partition at 10M events a day kept 7 days, with probability
  ~n^2/2^129 < 10^-23. A producer who wants a collision can write the hash of another
  id as a UUID, but one who knows another request's id can as well send that id itself:
  a collision gives nobody anything a reused id does not;
* kept as ``(a, b)``: ``b`` the key's low 8 bytes, ``a`` its high 8 bytes XOR a mix of
  ``b`` (a bijection, so still exact). Runs are sorted and searched on ``a`` alone, which
  is then evenly spread whatever the id's UUID version (a v7's high half is mostly its
  millisecond, a v1's low half its host): two keys share an ``a`` with probability
  2^-64, and when they do, ``b`` tells them apart (:meth:`Keys.probe`'s slow path);
* ``fp``: the billing fingerprint of the first copy.

**Runs.** Each bucket is a list of *runs*, each sorted by ``a``, plus a sorted *delta*
that a committed batch's ids are inserted into (O(delta) copying); a delta past
:data:`DELTA_MAX` becomes a run, and runs merge as a binary counter (a run is merged into
the one before it while that one is not larger), so a bucket has O(log n) runs and an id
is copied O(log n) times. Only the newest bucket takes ids; the bucket before it is
merged into one run when a newer one starts. A lookup of N keys (:meth:`lookup`) sorts
them once and does one ``np.searchsorted`` per run: no Python call per key. Runs are
never changed in place (a merge makes new arrays), so a snapshot takes the current runs
and writes them from another thread while the hot path goes on.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence

import numpy as np

from streams.model.fingerprint import mix_array

__all__ = ["DELTA_MAX", "Keys", "SeenRequests", "compact", "compact_all"]

#: A request id in the canonical UUID form: lowercase ASCII hex, dashes at 8/13/18/23.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: The BLAKE2b key of non-UUID ids: fixed (every host, every snapshot must agree), so it
#: separates this use of the hash from any other rather than keeping a secret.
_HASH_KEY = b"usage-stream seen request id v1"
#: Ids inserted into a bucket's sorted delta before it becomes a run of its own.
DELTA_MAX = 1 << 16
#: Runs at least this long are probed through a bitmap first (:meth:`Keys.probe`).
FILTER_MIN = 1 << 12
_EMPTY = np.zeros(0, dtype=np.uint64)


def compact(request_id: str) -> bytes:
    """The 16-byte key an id is kept under (module docstring).

    One compiled match and one ``fromhex`` for a canonical UUID: this runs once per event
    on the hot path (slicing and re-joining the id's five groups cost about twice as
    much). A hashed id can equal a UUID's bytes only by a 128-bit collision."""
    if len(request_id) == 36 and _CANONICAL_UUID.fullmatch(request_id):
        return bytes.fromhex(request_id.replace("-", ""))
    return hashlib.blake2b(
        request_id.encode("utf-8", "surrogatepass"), digest_size=16, key=_HASH_KEY
    ).digest()


_DELETE_HEX = str.maketrans("", "", "0123456789abcdef")


def compact_all(request_ids: Sequence[str]) -> bytes:
    """:func:`compact` of every id, joined (16 bytes each).

    A batch of canonical UUIDs only (the usual case) is checked and converted in a few
    calls over the joined text, ~7x faster than an id at a time: every id 36 characters,
    the 4 dashes of each at 8/13/18/23 and no other dash, lowercase hex elsewhere. Any
    other batch goes id by id."""
    count = len(request_ids)
    if count and set(map(len, request_ids)) == {36}:
        text = "".join(request_ids)
        if all(text[at::36].count("-") == count for at in (8, 13, 18, 23)):
            digits = text.replace("-", "")
            if len(digits) == 32 * count and not digits.translate(_DELETE_HEX):
                return bytes.fromhex(digits)
    return b"".join(map(compact, request_ids))


class Keys:
    """Keys ``(a, b)`` and fingerprints ``fp`` of some ids: three uint64 arrays of one
    length, never changed in place once made (module docstring)."""

    __slots__ = ("_filter", "a", "b", "fp", "ties")

    def __init__(self, a: np.ndarray, b: np.ndarray, fp: np.ndarray, ties: bool = True) -> None:
        self.a, self.b, self.fp = a, b, fp
        #: (sorted runs) whether two neighbours share an ``a``: the lookup's slow path
        self.ties = ties
        self._filter: tuple[np.ndarray, np.uint64] | None = None

    @classmethod
    def of(cls, request_ids: Sequence[str], fps: np.ndarray | None = None) -> Keys:
        """The keys of ``request_ids`` (in order), with their fingerprints (0 if None)."""
        return cls.from_bytes(compact_all(request_ids), fps)

    @classmethod
    def from_bytes(cls, joined: bytes, fps: np.ndarray | None = None) -> Keys:
        """Keys from :func:`compact_all`'s 16 bytes per id."""
        if not joined:
            return cls(_EMPTY, _EMPTY, _EMPTY, False)
        raw = np.frombuffer(joined, dtype=">u8").reshape(-1, 2).astype(np.uint64)
        b = np.ascontiguousarray(raw[:, 1])
        a = raw[:, 0] ^ mix_array(b)
        if fps is None:
            fps = np.zeros(len(b), dtype=np.uint64)
        return cls(a, b, np.asarray(fps, dtype=np.uint64))

    def __len__(self) -> int:
        return len(self.a)

    def take(self, index: np.ndarray) -> Keys:
        return Keys(self.a[index], self.b[index], self.fp[index])

    def key_bytes(self, i: int) -> bytes:
        """The 16-byte key of element ``i`` (:func:`compact`'s), for messages and tests."""
        b = int(self.b[i])
        a = int(self.a[i]) ^ int(mix_array(np.array([b], dtype=np.uint64))[0])
        return a.to_bytes(8, "big") + b.to_bytes(8, "big")

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays, and of the bitmap once made."""
        bitmap = self._filter[0].nbytes if self._filter is not None else 0
        return self.a.nbytes + self.b.nbytes + self.fp.nbytes + bitmap

    def sorted(self) -> Keys:
        """These keys as a run: sorted by ``a`` (the order of equal ``a`` is free)."""
        order = np.argsort(self.a, kind="stable")
        run = self.take(order)
        run.ties = _has_ties(run.a)
        return run

    def _bits(self) -> tuple[np.ndarray, np.uint64]:
        """(bitmap, shift): one bit per value of ``a``'s top bits, set where the run has
        a key; 16 to 32 bits per key (2-4 B), so a key the run lacks passes with
        probability 3-6 %. ``a`` is evenly spread, so its top bits are a fine hash. Made
        on the first lookup, never written to a snapshot."""
        if self._filter is None:
            n = len(self.a)
            bits = max(10, int(n).bit_length() + 4)
            shift = np.uint64(64 - bits)
            slots = np.unique(self.a >> shift)  # sorted slot numbers
            byte, bit = slots >> np.uint64(3), (slots & np.uint64(7)).astype(np.uint8)
            starts = np.flatnonzero(np.r_[True, byte[1:] != byte[:-1]])
            bitmap = np.zeros(1 << (bits - 3), dtype=np.uint8)
            # distinct bits of one byte: their sum is their OR
            bitmap[byte[starts]] = np.add.reduceat(np.left_shift(1, bit, dtype=np.uint8), starts)
            self._filter = (bitmap, shift)
        return self._filter

    def probe(self, qa: np.ndarray, qb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For a run: which of the keys ``(qa, qb)`` (``qa`` sorted) it holds, and the
        index of each one found. Vectorised: a large run first drops, with its bitmap
        (one memory access per key instead of a binary search's ~20), the keys it surely
        lacks; keys sharing an ``a`` go one by one."""
        if len(self.a) >= FILTER_MIN and len(qa):
            bitmap, shift = self._bits()
            slot = qa >> shift
            maybe = np.flatnonzero(
                (bitmap[slot >> np.uint64(3)] >> (slot & np.uint64(7)).astype(np.uint8)) & 1
            )
            hit = np.zeros(len(qa), dtype=bool)
            at = np.zeros(len(qa), dtype=np.intp)
            if len(maybe):
                hit[maybe], at[maybe] = self._search(qa[maybe], qb[maybe])
            return hit, at
        return self._search(qa, qb)

    def _search(self, qa: np.ndarray, qb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.a)
        if n == 0 or len(qa) == 0:
            return np.zeros(len(qa), dtype=bool), np.zeros(len(qa), dtype=np.intp)
        at = np.searchsorted(self.a, qa)
        np.minimum(at, n - 1, out=at)
        same_a = self.a[at] == qa
        hit = same_a & (self.b[at] == qb)
        if self.ties:
            for i in np.flatnonzero(same_a & ~hit):
                j = int(at[i]) + 1
                while j < n and self.a[j] == qa[i]:
                    if self.b[j] == qb[i]:
                        hit[i], at[i] = True, j
                        break
                    j += 1
        return hit, at


def _has_ties(a: np.ndarray) -> bool:
    return bool(len(a) > 1 and np.any(a[1:] == a[:-1]))


def _merge(first: Keys, second: Keys) -> Keys:
    """Two runs as one, in O(n) (positions by ``searchsorted``, no sort)."""
    if not len(first):
        return second
    if not len(second):
        return first
    total = len(first) + len(second)
    placed = np.searchsorted(first.a, second.a) + np.arange(len(second))
    rest = np.ones(total, dtype=bool)
    rest[placed] = False
    merged = []
    for ours, theirs in ((first.a, second.a), (first.b, second.b), (first.fp, second.fp)):
        out = np.empty(total, dtype=np.uint64)
        out[placed] = theirs
        out[rest] = ours
        merged.append(out)
    a, b, fp = merged
    return Keys(a, b, fp, first.ties or second.ties or _has_ties(a))


class _Bucket:
    """The ids recorded in one time bucket: runs (largest first) and a sorted delta."""

    __slots__ = ("delta", "runs")

    def __init__(self, runs: list[Keys] | None = None) -> None:
        self.runs: list[Keys] = runs or []
        self.delta: Keys | None = None

    def __len__(self) -> int:
        return sum(len(run) for run in self.all_runs())

    def all_runs(self) -> list[Keys]:
        return self.runs if self.delta is None else [*self.runs, self.delta]

    def add(self, run: Keys) -> None:
        if len(run) >= DELTA_MAX:
            self._push(run)
            return
        self.delta = run if self.delta is None else _merge(self.delta, run)
        if len(self.delta) >= DELTA_MAX:
            delta, self.delta = self.delta, None
            self._push(delta)

    def _push(self, run: Keys) -> None:
        runs = self.runs
        runs.append(run)
        while len(runs) > 1 and len(runs[-2]) <= len(runs[-1]):
            last = runs.pop()
            runs[-1] = _merge(runs[-1], last)

    def consolidate(self) -> None:
        """One run: for a bucket that takes no more ids."""
        runs = self.all_runs()
        if len(runs) <= 1:
            self.runs, self.delta = list(runs), None
            return
        merged = runs[0]
        for run in runs[1:]:
            merged = _merge(merged, run)
        self.runs, self.delta = [merged], None


class SeenRequests:
    """The ids seen and their fingerprints, bucketed by the time they were recorded
    (module docstring)."""

    def __init__(self, ttl_ms: int, buckets_per_ttl: int = 8) -> None:
        if ttl_ms <= 0:
            raise ValueError("ttl_ms must be positive")
        self.ttl_ms = ttl_ms
        self.bucket_ms = max(1, ttl_ms // buckets_per_ttl)
        self._buckets: dict[int, _Bucket] = {}  # bucket end (epoch ms) -> its ids

    # Lookups -------------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._buckets.values())

    def runs(self) -> list[Keys]:
        return [run for bucket in self._buckets.values() for run in bucket.all_runs()]

    def lookup(self, keys: Keys, also: Sequence[Keys] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Which of ``keys`` are tracked here (or in the runs ``also``: the batch being
        committed), and the fingerprint kept for each one found (0 where not found).
        One ``searchsorted`` per run over the keys sorted once."""
        count = len(keys)
        found = np.zeros(count, dtype=bool)
        fps = np.zeros(count, dtype=np.uint64)
        if not count:
            return found, fps
        order = np.argsort(keys.a)
        qa, qb = keys.a[order], keys.b[order]
        found_sorted = np.zeros(count, dtype=bool)
        fps_sorted = np.zeros(count, dtype=np.uint64)
        for run in [*self.runs(), *also]:
            hit, at = run.probe(qa, qb)
            if hit.any():
                found_sorted |= hit
                fps_sorted[hit] = run.fp[at[hit]]
        found[order] = found_sorted
        fps[order] = fps_sorted
        return found, fps

    def __contains__(self, request_id: object) -> bool:
        if not isinstance(request_id, str):
            return False
        return bool(self.lookup(Keys.of([request_id]))[0][0])

    def known(self, request_ids: Iterable[str]) -> set[str]:
        """The ids among ``request_ids`` seen before."""
        ids = list(request_ids)
        found, _ = self.lookup(Keys.of(ids))
        return {rid for rid, hit in zip(ids, found.tolist(), strict=True) if hit}

    def fingerprint(self, request_id: str) -> int | None:
        """The fingerprint kept for ``request_id``, or None when it is not tracked."""
        found, fps = self.lookup(Keys.of([request_id]))
        return int(fps[0]) if found[0] else None

    # Adding ---------------------------------------------------------------------------

    def _bucket_for(self, recorded_ms: int) -> _Bucket:
        end = recorded_ms - recorded_ms % self.bucket_ms + self.bucket_ms
        bucket = self._buckets.get(end)
        if bucket is None:
            newest = max(self._buckets, default=None)
            if newest is not None and newest < end:
                self._buckets[newest].consolidate()
            bucket = self._buckets[end] = _Bucket()
        return bucket

    def add_keys(self, keys: Keys, recorded_ms: int) -> None:
        """Remember ``keys`` recorded at ``recorded_ms`` (epoch ms). They must be new:
        not tracked yet, and each once (the hot path's new requests)."""
        if len(keys):
            self._bucket_for(recorded_ms).add(keys.sorted())

    def add_first(self, keys: Keys, recorded_ms: int) -> np.ndarray:
        """Remember the first occurrence (in order) of each key not tracked yet, with its
        fingerprint; returns which elements were added. The rebuild's rule: the first
        copy read, in the chain's order, is the one that was billed."""
        count = len(keys)
        if not count:
            return np.zeros(0, dtype=bool)
        order = np.lexsort((np.arange(count), keys.b, keys.a))
        sa, sb = keys.a[order], keys.b[order]
        first_sorted = np.ones(count, dtype=bool)
        first_sorted[1:] = (sa[1:] != sa[:-1]) | (sb[1:] != sb[:-1])
        first = np.zeros(count, dtype=bool)
        first[order] = first_sorted
        candidates = np.flatnonzero(first)
        found, _ = self.lookup(keys.take(candidates))
        added = np.zeros(count, dtype=bool)
        added[candidates[~found]] = True
        self.add_keys(keys.take(np.flatnonzero(added)), recorded_ms)
        return added

    def add(
        self, request_ids: Iterable[str], recorded_ms: int, fps: np.ndarray | None = None
    ) -> None:
        """Remember ids (first occurrences of those not tracked) recorded at
        ``recorded_ms``, with their fingerprints (0 when None)."""
        self.add_first(Keys.of(list(request_ids), fps), recorded_ms)

    # Expiry, size, snapshots ----------------------------------------------------------

    def prune(self, now_ms: int) -> int:
        """Forget buckets whose every id was recorded at least ``ttl_ms`` ago; returns
        how many ids were forgotten."""
        cutoff = now_ms - self.ttl_ms
        expired = [end for end in self._buckets if end <= cutoff]
        return sum(len(self._buckets.pop(end)) for end in expired)

    def approx_bytes(self) -> int:
        """Memory held by the arrays and bitmaps (exact; the few Python objects around
        them aside): 24 B per id, plus 2-4 B per id in runs that were searched."""
        return sum(run.nbytes for run in self.runs())

    def segments(self) -> list[tuple[int, Keys]]:
        """``(bucket end, run)`` of every run, for a snapshot: the arrays themselves,
        which are never changed in place, so they can be written from another thread."""
        return [(end, run) for end, bucket in self._buckets.items() for run in bucket.all_runs()]

    @classmethod
    def from_segments(
        cls, ttl_ms: int, segments: Iterable[tuple[int, Keys]], buckets_per_ttl: int = 8
    ) -> SeenRequests:
        """The state :meth:`segments` described (each run sorted by ``a``, as written)."""
        seen = cls(ttl_ms, buckets_per_ttl)
        for end, run in segments:
            bucket = seen._buckets.get(end)
            if bucket is None:
                bucket = seen._buckets[end] = _Bucket()
            run.ties = _has_ties(run.a)
            bucket._push(run)
        return seen
