"""The replay's deduplication and fold (``usage-stream replay``, one per reader process).

:class:`ReplayStaging` — the request ids of the date read so far: in a set in memory up
to ``memory_ids`` of them, then spilled to a temporary SQLite file next to the summary DB
(memory stays bounded for tens of millions of events; PRIMARY KEY: the first copy read
wins). The sums of the first copies are folded in memory, per summary key
(:class:`DayTotals`): a date has as many of those as summary rows. A replay that was
killed (SIGKILL, the OOM killer, a lost host) cannot remove its files: the next replay on
the same directory does (:func:`sweep_abandoned`).

Why a set first: on a date of 1M events (``bench/run.py --workload many-keys``) the two
SQLite statements per fetch cost a reader ~3 µs per id, ~1.7 s of CPU per reader, where
a set costs ~0.3 µs (``bench/replay_profile.py``, docs/performance.md). A reader's set of
``MEMORY_IDS`` ids is ~130 MB (a 36-character id ~93 B, its slot ~34 B); a larger date
spills to the file, which then does the deduplication alone.

A module of its own: the reader processes import it, and nothing that writes the summary
DB (tables/summary_db/replay_store.py holds the replace).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterable, Sequence
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypedDict

import numpy as np
import orjson

from tables.summary_db.schema import json_for_sqlite
from tables.summary_db.summary_store import SummaryRow

if TYPE_CHECKING:
    from streams.model.event import UsageEvent

__all__ = [
    "MEMORY_IDS",
    "BilledEvent",
    "DayTotals",
    "ReplayStaging",
    "SumsChunk",
    "sweep_abandoned",
]

log = logging.getLogger(__name__)

Key = tuple[str, str, str]  # (client_org_id, user_id, model) within the date

#: Request ids a reader keeps in memory before it spills them to its file (see above).
MEMORY_IDS = 1_000_000


class BilledEvent(NamedTuple):
    """A valid event with its usage date and its cost (resolved or estimated, by
    :func:`streams.pricing.bill`), read at ``(partition, offset)``: what :meth:`ReplayStaging.add`
    and :meth:`DayTotals.add` take. The readers' path folds events and costs side by side
    instead (:meth:`DayTotals.add_events`)."""

    request_id: str
    usage_date: str
    usage_day: int  # usage_date as date.toordinal()
    client_org_id: str
    user_id: str
    model: str
    input_tokens: int
    output_tokens: int
    cost_nano: int
    cost_estimated: int  # 0/1
    event_ms: int
    partition: int
    offset: int


# Staging --------------------------------------------------------------------------------

# A fetch's ids in two statements with the GIL released (the reader runs them on a thread
# of its own once spilled; an executemany would take the GIL once per row, and against a
# busy thread 40k rows went 0.62 s -> 58 s here). A flat JSON array of strings costs
# json_each little; an array of rows read back with ``value->>N`` costs a re-parse of the
# row per column, which made staging whole rows ~4x dearer.
_KNOWN_JSON = "SELECT value FROM json_each(?) WHERE value IN (SELECT request_id FROM seen)"
_SEEN_JSON = "INSERT OR IGNORE INTO seen SELECT value FROM json_each(?)"
#: Ids per statement when the set spills into the file.
_SPILL_CHUNK = 50_000


class ReplayStaging:
    """The replay's deduplication: the request ids of the date read so far, in memory up
    to ``memory_ids`` of them, then in a temporary SQLite file (memory stays bounded for
    tens of millions of events). ``memory_ids=0`` keeps them in the file from the start.

    :meth:`first_copies` tells which ids no earlier call (nor an earlier id of the same
    call) had: the first copy wins. :meth:`add` does the same for ledger entries. Their
    sums are folded by the caller (:class:`DayTotals`), so the file holds ids only.
    Synchronous on purpose: the reader calls it one batch at a time, in read order (on a
    thread of its own once :attr:`spilled`, since SQLite then releases the GIL). The file
    lives in a private temporary directory under ``directory`` (the summary DB's, so it
    is on a disk sized for the data) and is removed by :meth:`close`.
    """

    def __init__(self, directory: Path, memory_ids: int = 0) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=directory))
        self.path = self._dir / "staging.db"
        self.read = 0  # events of the date offered
        self.unique = 0  # of which distinct request ids
        self.memory_ids = memory_ids
        #: the ids seen while fewer than ``memory_ids``; None once they are in the file
        self._seen: set[str] | None = set() if memory_ids > 0 else None
        self._owner = -1
        try:
            self._owner = _hold(self._dir)
            for gone in sweep_abandoned(directory):
                log.warning("removed %s, left by a replay that did not finish", gone)
            # used by one thread at a time: the reader's, or its staging thread
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode = OFF")
            self._conn.execute("PRAGMA synchronous = OFF")
            self._conn.execute("PRAGMA cache_size = -65536")  # 64 MiB, then it spills
            self._conn.execute("CREATE TABLE seen (request_id TEXT PRIMARY KEY) WITHOUT ROWID")
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            if self._owner >= 0:
                os.close(self._owner)
            raise

    @property
    def duplicates(self) -> int:
        return self.read - self.unique

    @property
    def spilled(self) -> bool:
        """Whether the ids are in the file (a call then runs SQL with the GIL released)."""
        return self._seen is None

    def first_copies(self, request_ids: Sequence[str]) -> list[bool]:
        """Per id, in order: True when neither an earlier call nor an earlier id of this
        one had it (its first copy), and it is recorded as seen."""
        if not request_ids:
            return []
        seen = self._seen
        if seen is not None and len(seen) + len(request_ids) > self.memory_ids:
            self._spill(seen)
            seen = self._seen = None
        if seen is not None:
            add = seen.add
            # ``add`` returns None: falsy for a new id (now recorded), True for a known one
            fresh = [not (rid in seen or add(rid)) for rid in request_ids]
        else:
            fresh = self._first_in_file(request_ids)
        self.read += len(request_ids)
        self.unique += fresh.count(True)
        return fresh

    def add(self, entries: Sequence[BilledEvent]) -> list[BilledEvent]:
        """The entries whose request id no earlier entry had (the first copy wins, also
        within ``entries``), in order; their ids are recorded as seen."""
        fresh = self.first_copies([entry.request_id for entry in entries])
        return [entry for entry, first in zip(entries, fresh, strict=True) if first]

    def _first_in_file(self, request_ids: Sequence[str]) -> list[bool]:
        first = dict.fromkeys(request_ids)
        ids = list(first)
        text = json_for_sqlite(orjson.dumps(ids))
        self._conn.execute("BEGIN")
        try:
            if text is None:
                known = {
                    rid
                    for rid in ids
                    if self._conn.execute(
                        "SELECT 1 FROM seen WHERE request_id = ?", (rid,)
                    ).fetchone()
                }
                self._conn.executemany(
                    "INSERT OR IGNORE INTO seen VALUES (?)", [(rid,) for rid in ids]
                )
            else:
                known = {row[0] for row in self._conn.execute(_KNOWN_JSON, (text,))}
                self._conn.execute(_SEEN_JSON, (text,))
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        if len(ids) == len(request_ids) and not known:
            return [True] * len(ids)
        fresh = []
        for rid in request_ids:  # the first copy of a new id only: then it counts as seen
            fresh.append(rid not in known)
            known.add(rid)
        return fresh

    def _spill(self, seen: set[str]) -> None:
        """Every id of the set into the file (the set is then dropped)."""
        ids = list(seen)
        log.info("replay staging: %d request ids in memory, now spilled to %s", len(ids), self.path)
        self._conn.execute("BEGIN")
        try:
            for start in range(0, len(ids), _SPILL_CHUNK):
                chunk = ids[start : start + _SPILL_CHUNK]
                text = json_for_sqlite(orjson.dumps(chunk))
                if text is None:
                    self._conn.executemany(
                        "INSERT OR IGNORE INTO seen VALUES (?)", [(rid,) for rid in chunk]
                    )
                else:
                    self._conn.execute(_SEEN_JSON, (text,))
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        try:
            self._conn.close()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
            if self._owner >= 0:
                os.close(self._owner)  # after the removal: never swept while in use
                self._owner = -1

    def __enter__(self) -> ReplayStaging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SumsChunk(TypedDict):
    """Part of a :class:`DayTotals` fold as :meth:`DayTotals.sums` lists it (JSON between
    processes, self-contained): ``names`` per key column (client, user, model) and, per
    key, the index of its name in each (``keys``), then its five sums (``sums``: input
    tokens, output tokens, requests, estimated requests, cost in nano-USD)."""

    names: list[list[str]]
    keys: list[Any]  # three arrays of name indexes (numpy arrays, or lists once decoded)
    sums: list[Any]  # five arrays of sums, likewise


#: Keys per :class:`SumsChunk`: a chunk is one line of the reader protocol, read whole, and
#: its names are at most 3 x this many strings of up to 256 characters.
SUMS_PER_CHUNK = 10_000
#: Below this bound on a column's sum of absolute values, int64 sums are exact (a column
#: at or above it is summed as Python integers).
_INT64_SAFE = 2**62
_KEY_FIELDS = ("client_org_id", "user_id", "model")
_VALUE_FIELDS = ("input_tokens", "output_tokens")


class DayTotals:
    """The date's exact totals per (client, user, model), folded from first copies.

    Columnar: each key column's strings get a small integer code (a dict per column), a
    batch of events becomes arrays of codes and values, and the fold is a sort-based
    group-by in numpy (:meth:`_fold`), run when enough batches are pending and before
    the sums are read. Why: folding event by event into a dict keyed by the
    (client, user, model) tuple cost ~1.7 µs per event on the many-keys workload
    (``bench/run.py --workload many-keys``: ~290k keys per reader, so every lookup missed
    the caches several times: the tuple, its three strings), ~26 % of a reader. A
    lookup per column in a dict of that column's distinct values (40 clients, 5 models,
    60k users there) plus numpy's group-by cost a fraction of that, and the fold holds
    8 integers per key in arrays instead of a tuple, a dict entry and five ints.

    Exact: sums are int64 only while a column's sum of absolute values stays below
    ``_INT64_SAFE``; beyond it that column is summed as Python integers."""

    def __init__(self) -> None:
        self._codes: tuple[dict[str, int], ...] = ({}, {}, {})
        self._names: tuple[list[str], ...] = ([], [], [])
        # the folded part: codes per key column, then the five sums, one row per key
        self._keys: list[np.ndarray] = [np.zeros(0, np.int64) for _ in range(3)]
        self._sums: list[np.ndarray] = [np.zeros(0, np.int64) for _ in range(5)]
        self._pending: list[tuple[list[np.ndarray], list[np.ndarray]]] = []
        self._pending_rows = 0

    def __len__(self) -> int:
        self._fold()
        return len(self._keys[0])

    def add(self, entries: Iterable[BilledEvent]) -> None:
        entries = list(entries)
        self.add_events(
            entries,  # a BilledEvent has the fields add_events reads
            [e.cost_nano for e in entries],
            [e.cost_estimated for e in entries],
            [True] * len(entries),
        )

    def add_events(
        self,
        events: Sequence[UsageEvent | BilledEvent],
        costs: Sequence[int],
        estimated: Sequence[int],
        fresh: Sequence[bool],
    ) -> None:
        """Fold the events flagged in ``fresh``, each with its cost in nano-USD and 1 if
        that was estimated (:func:`streams.pricing.bill`): :meth:`add` without a
        :class:`BilledEvent` per event (the reader's path)."""
        count = len(events)
        if count != len(costs) or count != len(estimated) or count != len(fresh):
            raise ValueError("add_events: events, costs, estimated and fresh differ in length")
        if not count:
            return
        keep = np.fromiter(fresh, bool, count)
        if not keep.any():
            return
        keys = [
            self._encode(column, list(map(attrgetter(name), events)))
            for column, name in enumerate(_KEY_FIELDS)
        ]
        sums = [_integers(map(attrgetter(name), events), count) for name in _VALUE_FIELDS]
        sums += [np.ones(count, np.int64), _integers(estimated, count), _integers(costs, count)]
        if not keep.all():
            keys = [column[keep] for column in keys]
            sums = [column[keep] for column in sums]
        self._add(keys, sums)

    def add_sums(self, chunks: Iterable[SumsChunk]) -> None:
        """Add another fold's :meth:`sums` (a group of partitions read elsewhere)."""
        for chunk in chunks:
            count = len(chunk["sums"][0])
            if not count:
                continue
            keys = [
                self._encode(column, names)[np.asarray(codes, np.int64)]
                for column, (names, codes) in enumerate(
                    zip(chunk["names"], chunk["keys"], strict=True)
                )
            ]
            self._add(keys, [_integers(column, count) for column in chunk["sums"]])

    def sums(self) -> list[SumsChunk]:
        """The fold as self-contained chunks of at most ``SUMS_PER_CHUNK`` keys, for
        :meth:`add_sums` (JSON-friendly with ``orjson.OPT_SERIALIZE_NUMPY``)."""
        self._fold()
        chunks: list[SumsChunk] = []
        total = len(self._keys[0])
        for start in range(0, total, SUMS_PER_CHUNK):
            part = slice(start, start + SUMS_PER_CHUNK)
            names: list[list[str]] = []
            keys: list[Any] = []
            for column, codes in enumerate(self._keys):
                used, local = np.unique(codes[part], return_inverse=True)
                every = self._names[column]
                names.append([every[code] for code in used.tolist()])
                keys.append(local.astype(np.int64))
            sums = [_transportable(column[part]) for column in self._sums]
            chunks.append({"names": names, "keys": keys, "sums": sums})
        return chunks

    def rows(self, day: str) -> list[SummaryRow]:
        self._fold()
        clients, users, models = self._names
        make = SummaryRow._make
        return [
            make((clients[c], users[u], models[m], day, *values))
            for c, u, m, *values in zip(
                *(column.tolist() for column in self._keys),
                *(column.tolist() for column in self._sums),
                strict=True,
            )
        ]

    def _encode(self, column: int, values: list[str]) -> np.ndarray:
        """Each value's code in its column (new values get the next codes)."""
        codes = self._codes[column]
        try:
            return np.fromiter(map(codes.__getitem__, values), np.int64, len(values))
        except KeyError:
            # the new values found in C (a batch of many-keys meets a few new users
            # among thousands: a loop over every value cost more than the lookups)
            names = self._names[column]
            for value in sorted(set(values).difference(codes)):
                codes[value] = len(names)
                names.append(value)
            return np.fromiter(map(codes.__getitem__, values), np.int64, len(values))

    def _add(self, keys: list[np.ndarray], sums: list[np.ndarray]) -> None:
        self._pending.append((keys, sums))
        self._pending_rows += len(keys[0])
        # fold once the batches waiting outnumber the keys folded: memory stays ~2x the
        # fold's, and each row is sorted O(log) times at most
        if self._pending_rows > max(_FOLD_AT_LEAST, len(self._keys[0])):
            self._fold()

    def _fold(self) -> None:
        """The folded part and the pending batches grouped by key, sums added."""
        if not self._pending:
            return
        parts = [(self._keys, self._sums), *self._pending]
        self._pending, self._pending_rows = [], 0
        keys = [np.concatenate([part[0][i] for part in parts]) for i in range(3)]
        sums = [_concatenate([part[1][i] for part in parts]) for i in range(5)]
        parts.clear()
        sizes = [len(names) or 1 for names in self._names]
        if sizes[0] * sizes[1] * sizes[2] < 2**63:  # one integer per key, in key order
            packed = (keys[0] * sizes[1] + keys[1]) * sizes[2] + keys[2]
            order = np.argsort(packed, kind="stable")
            packed = packed[order]
            starts = np.flatnonzero(np.concatenate(([True], packed[1:] != packed[:-1])))
            first = order[starts]
        else:  # (not expected: over 2**63 combinations of the names)
            _, first_index, inverse = np.unique(
                np.stack(keys, axis=1), axis=0, return_index=True, return_inverse=True
            )
            order = np.argsort(inverse.ravel(), kind="stable")
            boundaries = inverse.ravel()[order]
            starts = np.flatnonzero(np.concatenate(([True], boundaries[1:] != boundaries[:-1])))
            first = first_index
        self._keys = [column[first] for column in keys]
        self._sums = [np.add.reduceat(_summable(column)[order], starts) for column in sums]


#: Pending rows below which :class:`DayTotals` does not fold yet.
_FOLD_AT_LEAST = 1 << 18


def _integers(values: Iterable[int | str], count: int) -> np.ndarray:
    """``values`` as int64, or as Python integers (object) when one does not fit (or came
    as decimal text: :func:`_transportable`)."""
    values = values if isinstance(values, (list, np.ndarray)) else list(values)
    try:
        return np.fromiter(values, np.int64, count)
    except (OverflowError, TypeError, ValueError):
        return np.array([int(value) for value in values], dtype=object)


def _concatenate(columns: list[np.ndarray]) -> np.ndarray:
    if all(column.dtype == np.int64 for column in columns):
        return np.concatenate(columns)
    return np.concatenate([column.astype(object) for column in columns])


def _summable(column: np.ndarray) -> np.ndarray:
    """``column`` itself when its int64 sums cannot overflow, else as Python integers."""
    if column.dtype == np.int64 and len(column):
        bound = float(np.abs(column.astype(np.float64)).sum())
        if bound < _INT64_SAFE:
            return column
        return column.astype(object)
    return column


def _transportable(column: np.ndarray) -> Any:
    """An int64 column as it is (orjson writes numpy arrays); Python integers as a list,
    those outside orjson's range (-2**63 .. 2**64 - 1) as decimal text, which
    :func:`_integers` reads back exactly."""
    if column.dtype == np.int64:
        return column
    return [
        value if _ORJSON_MIN <= value <= _ORJSON_MAX else str(value) for value in column.tolist()
    ]


_ORJSON_MIN, _ORJSON_MAX = -(2**63), 2**64 - 1


_PREFIX = ".replay-"
_OWNER = "owner.lock"


def _hold(staging_dir: Path) -> int:
    """An exclusive ``flock`` on ``staging_dir/owner.lock``, held until the descriptor is
    closed, which the kernel does when the process dies however it dies. The lock is
    taken on a file of another name, then renamed: a sweeper never finds ``owner.lock``
    unlocked while its replay lives."""
    pending = staging_dir / f"{_OWNER}.new"
    fd = os.open(pending, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(pending, staging_dir / _OWNER)
    except BaseException:
        os.close(fd)
        raise
    return fd


def sweep_abandoned(directory: Path) -> list[Path]:
    """Remove the staging directories under ``directory`` whose replay is gone (its
    ``owner.lock`` can be locked); leave those of running replays, and any without the
    lock file (one being created). Returns what was removed."""
    removed: list[Path] = []
    for candidate in sorted(directory.glob(f"{_PREFIX}*")):
        try:
            fd = os.open(candidate / _OWNER, os.O_RDWR | os.O_CLOEXEC)
        except OSError:  # no lock file: being created, or not a staging directory
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # its replay holds it: running
                continue
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
        finally:
            os.close(fd)
    return removed
