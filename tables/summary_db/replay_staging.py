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
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import orjson

from tables.summary_db.schema import json_for_sqlite
from tables.summary_db.summary_store import SummaryRow

if TYPE_CHECKING:
    from streams.model.event import UsageEvent

__all__ = ["MEMORY_IDS", "BilledEvent", "DayTotals", "ReplayStaging", "sweep_abandoned"]

log = logging.getLogger(__name__)

Key = tuple[str, str, str]  # (client_org_id, user_id, model) within the date

#: Request ids a reader keeps in memory before it spills them to its file (see above).
MEMORY_IDS = 1_000_000


#: One key's sums as :meth:`DayTotals.sums` lists them (a JSON array between processes):
#: client, user, model, input_tokens, output_tokens, requests, estimated_requests, cost_nano
SumsRow = tuple[str, str, str, int, int, int, int, int]


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


class DayTotals:
    """The date's exact totals per (client, user, model), folded from first copies.

    In memory: a date has as many of these as summary keys (tens or hundreds of
    thousands), not events, and folding in Python costs less than grouping the events
    again in SQL. Columns, not a list per key: a key's index into five lists of ints.
    Why: a list per key is an object the garbage collector tracks for as long as the
    fold lives, and with ~290k keys per reader (``--workload many-keys``) its young
    collections took 1-2 s of a reader's ~8 s of CPU; ints and lists of them are one
    object per column (the index's key tuples hold only strings, which the collector
    stops tracking at its first look)."""

    def __init__(self) -> None:
        self._index: dict[Key, int] = {}
        # input_tokens, output_tokens, requests, estimated_requests, cost_nano per key
        self._columns: tuple[list[int], ...] = ([], [], [], [], [])

    def __len__(self) -> int:
        return len(self._index)

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
        index = self._index
        inputs, outputs, requests, guesses, nanos = self._columns
        for e, cost, guess, first in zip(events, costs, estimated, fresh, strict=True):
            if not first:
                continue
            key = (e.client_org_id, e.user_id, e.model)
            at = index.get(key)
            if at is None:
                index[key] = len(inputs)
                inputs.append(e.input_tokens)
                outputs.append(e.output_tokens)
                requests.append(1)
                guesses.append(guess)
                nanos.append(cost)
            else:
                inputs[at] += e.input_tokens
                outputs[at] += e.output_tokens
                requests[at] += 1
                guesses[at] += guess
                nanos[at] += cost

    def add_sums(self, rows: Iterable[SumsRow]) -> None:
        """Add another fold's :meth:`sums` (a group of partitions read elsewhere)."""
        index = self._index
        inputs, outputs, requests, guesses, nanos = self._columns
        for org, user, model, inp, out, count, guess, cost in rows:
            key = (org, user, model)
            at = index.get(key)
            if at is None:
                index[key] = len(inputs)
                inputs.append(inp)
                outputs.append(out)
                requests.append(count)
                guesses.append(guess)
                nanos.append(cost)
            else:
                inputs[at] += inp
                outputs[at] += out
                requests[at] += count
                guesses[at] += guess
                nanos[at] += cost

    def sums(self) -> list[list[str | int]]:
        """``[client, user, model, input_tokens, output_tokens, requests,
        estimated_requests, cost_nano]`` per key (JSON-friendly, for :meth:`add_sums`)."""
        inputs, outputs, requests, guesses, nanos = self._columns
        return [
            [*key, inputs[at], outputs[at], requests[at], guesses[at], nanos[at]]
            for key, at in self._index.items()
        ]

    def rows(self, day: str) -> list[SummaryRow]:
        inputs, outputs, requests, guesses, nanos = self._columns
        make = SummaryRow._make
        return [
            make((*key, day, inputs[at], outputs[at], requests[at], guesses[at], nanos[at]))
            for key, at in self._index.items()
        ]


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
