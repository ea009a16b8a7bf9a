"""A fingerprint of a usage event's billing fields: what tells a retry from a conflict.

docs/contract.md §1: a later copy of a ``request_id`` whose billing fields (``client_org_id``,
``user_id``, ``model``, the token counts, ``cost_usd``, the event time) differ from the
first copy's is a ``conflicting_duplicate``, not a retry. The dedupe state keeps 8 bytes
per tracked id for this (:mod:`tables.dedupe.seen_requests`), and a snapshot keeps the same 8
bytes on disk, so the fingerprint must say both *that* two copies differ and *which*
fields do, in 64 bits, the same on every host and in every process.

Layout (bit 63 first)::

    | 22 bits: hash of all seven fields | 7 x 6 bits: hash of each field alone |

* **That they differ**: two copies that differ in any field get equal fingerprints only
  when the 22-bit whole hash *and* the 6-bit hash of every differing field collide: at
  most 2^-28 (~4e-9) for one differing field, 2^-34 for two. A missed conflict is
  dropped as a plain duplicate, which is what happened to *every* conflict before; it is
  not billed either way, so money never depends on this.
* **Which fields**: a field whose 6-bit hashes differ certainly differs; a differing
  field whose 6-bit hashes collide (1 in 64) is not named. :func:`differing_fields`
  says so when the whole hash differs and no field can be named.

Each field's 64-bit hash: strings by BLAKE2b-64 (personalised per field, cached: client,
user and model strings repeat), integers by the SplitMix64 finaliser of value + a
per-field constant (a missing ``cost_usd`` is 2^64-1, never a valid nano amount), so a
batch is fingerprinted with numpy in a few dozen vector operations
(:func:`billing_fingerprints`); :func:`billing_fingerprint` is the scalar reference the
tests hold it to. Both are stable across processes (no ``hash()``, which is salted).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from operator import attrgetter

import numpy as np

from streams.model.event import CONFLICT, InvalidEvent, UsageEvent

__all__ = [
    "BILLING_FIELDS",
    "billing_fingerprint",
    "billing_fingerprints",
    "conflict",
    "differing_fields",
]

#: The contract's billing fields, in fingerprint order (field i has bits 6i..6i+5).
BILLING_FIELDS = (
    "client_org_id",
    "user_id",
    "model",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "timestamp",
)
_STRING_FIELDS = 3  # the first three are strings, the rest integers
_FIELD_BITS = 6
_WHOLE_SHIFT = _FIELD_BITS * len(BILLING_FIELDS)  # 42: the whole hash's 22 bits above
_MASK64 = (1 << 64) - 1
_NO_COST = _MASK64  # cost_usd absent (valid costs are at most 10**15 nano)
_GOLDEN = 0x9E3779B97F4A7C15
_SEEDS = tuple((_GOLDEN * (i + 1)) & _MASK64 for i in range(len(BILLING_FIELDS)))
_PERSONS = tuple(f"usfp{i}".encode() for i in range(_STRING_FIELDS))
_CACHE_LIMIT = 1 << 16

_ATTRIBUTES = (
    "client_org_id",
    "user_id",
    "model",
    "input_tokens",
    "output_tokens",
    "cost_nano",
    "event_ms",
)
_GET_FIELDS = attrgetter(*_ATTRIBUTES)
#: one getter per field: ``map`` of each is ~3x faster than transposing whole tuples
_GETTERS = tuple(attrgetter(name) for name in _ATTRIBUTES)


def _mix(z: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit integers that spreads every bit."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


_U30, _U27, _U31 = np.uint64(30), np.uint64(27), np.uint64(31)
_C1, _C2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mix_array(z: np.ndarray) -> np.ndarray:
    """:func:`_mix` of each element of a uint64 array (numpy wraps the products)."""
    z = (z ^ (z >> _U30)) * _C1
    z = (z ^ (z >> _U27)) * _C2
    mixed: np.ndarray = z ^ (z >> _U31)
    return mixed


_string_hashes: list[dict[str, int]] = [{} for _ in range(_STRING_FIELDS)]


def _string_hash(field: int, value: str) -> int:
    cache = _string_hashes[field]
    found = cache.get(value)
    if found is None:
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        digest = hashlib.blake2b(
            value.encode("utf-8", "surrogatepass"), digest_size=8, person=_PERSONS[field]
        ).digest()
        found = cache[value] = int.from_bytes(digest, "little")
    return found


def _compose(hashes: Sequence[int]) -> int:
    whole = 0
    fields = 0
    for i, h in enumerate(hashes):
        whole = _mix(whole ^ h)
        fields |= (h >> (64 - _FIELD_BITS)) << (_FIELD_BITS * i)
    return (whole >> _WHOLE_SHIFT << _WHOLE_SHIFT) | fields


def billing_fingerprint(event: UsageEvent) -> int:
    """The 64-bit fingerprint of one event's billing fields (module docstring)."""
    values = _GET_FIELDS(event)
    hashes = [_string_hash(i, values[i]) for i in range(_STRING_FIELDS)]
    for i in range(_STRING_FIELDS, len(BILLING_FIELDS)):
        value = values[i]
        hashes.append(_mix(((_NO_COST if value is None else value) + _SEEDS[i]) & _MASK64))
    return _compose(hashes)


_FIELD_SHIFT = np.uint64(64 - _FIELD_BITS)
_WHOLE_MASK = np.uint64(_MASK64 >> _WHOLE_SHIFT << _WHOLE_SHIFT)
_NP_SEEDS = [np.uint64(seed) for seed in _SEEDS]


def _modulo_2_64(column: list[int]) -> np.ndarray:
    """``column``'s integers modulo 2**64 as uint64, as the scalar path's ``& _MASK64``:
    a timestamp before 1970 is negative, a cost in nano-units may pass 2**63."""
    try:
        return np.array(column, dtype=np.int64).view(np.uint64)  # two's complement
    except OverflowError:
        return np.array([value & _MASK64 for value in column], dtype=np.uint64)


def billing_fingerprints(events: Sequence[UsageEvent]) -> np.ndarray:
    """:func:`billing_fingerprint` of each event, as a uint64 array (vectorised)."""
    if not events:
        return np.zeros(0, dtype=np.uint64)
    count = len(events)
    hashes = []
    for i in range(_STRING_FIELDS):
        column = list(map(_GETTERS[i], events))
        found = _string_hashes[i].__getitem__  # one C call per value: strings repeat
        try:
            hashes.append(np.fromiter(map(found, column), np.uint64, count))
        except KeyError:  # new strings: hash each distinct one once
            local = {value: _string_hash(i, value) for value in set(column)}
            hashes.append(np.fromiter(map(local.__getitem__, column), np.uint64, count))
    for i in range(_STRING_FIELDS, len(BILLING_FIELDS)):
        column = list(map(_GETTERS[i], events))
        if i == 5 and None in column:
            column = [_NO_COST if v is None else v for v in column]
        # + seed wraps modulo 2**64 in uint64, as the scalar's & _MASK64
        hashes.append(mix_array(_modulo_2_64(column) + _NP_SEEDS[i]))
    whole = np.zeros(len(events), dtype=np.uint64)
    fields = np.zeros(len(events), dtype=np.uint64)
    for i, h in enumerate(hashes):
        whole = mix_array(whole ^ h)
        fields |= (h >> _FIELD_SHIFT) << np.uint64(_FIELD_BITS * i)
    return (whole & _WHOLE_MASK) | fields


def differing_fields(first: int, later: int) -> tuple[str, ...]:
    """The billing fields two fingerprints certainly differ in (module docstring): empty
    when the fingerprints are equal, or when only the whole hash tells them apart."""
    return tuple(
        name
        for i, name in enumerate(BILLING_FIELDS)
        if (first >> (_FIELD_BITS * i)) & 63 != (later >> (_FIELD_BITS * i)) & 63
    )


def conflict(event: UsageEvent, first_fp: int) -> InvalidEvent:
    """The dead-letter verdict on ``event``, a copy whose fingerprint differs from
    ``first_fp``, the fingerprint of the copy that was billed: its ``error`` header
    names the fields that differ, as far as the fingerprint tells them apart."""
    fields = differing_fields(first_fp, billing_fingerprint(event))
    named = (
        ", ".join(fields)
        if fields
        else "(which ones: not told apart by the fingerprint's per-field bits)"
    )
    return InvalidEvent(
        CONFLICT,
        f"request_id {event.request_id!r:.80} was first seen with other billing fields: {named}",
    )
