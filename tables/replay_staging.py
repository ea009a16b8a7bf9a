"""The replay's deduplication and fold (``usage-stream replay``, one per reader process).

:class:`ReplayStaging` — the request ids of the date read so far, spilled to a temporary
SQLite file next to the summary DB (memory stays bounded for tens of millions of events;
PRIMARY KEY: the first copy read wins). The sums of the first copies are folded in
memory, per summary key (:class:`DayTotals`): a date has as many of those as summary
rows. A replay that was killed (SIGKILL, the OOM killer, a lost host) cannot remove its
files: the next replay on the same directory does (:func:`sweep_abandoned`).

A module of its own: the reader processes import it, and nothing that writes the summary
DB (tables/replay_store.py holds the replace).
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

import orjson

from tables.ledger import LedgerEvent
from tables.schema import json_for_sqlite
from tables.summary_store import SummaryRow

__all__ = ["DayTotals", "ReplayStaging", "sweep_abandoned"]

log = logging.getLogger(__name__)

Key = tuple[str, str, str]  # (client_org_id, user_id, model) within the date


# Staging --------------------------------------------------------------------------------

# A fetch's ids in two statements with the GIL released (the staging thread runs beside
# the thread that reads and validates; an executemany would take the GIL once per row,
# and against a busy thread 40k rows went 0.62 s -> 58 s here). A flat JSON array of
# strings costs json_each little; an array of rows read back with ``value->>N`` costs a
# re-parse of the row per column, which made staging whole rows ~4x dearer.
_KNOWN_JSON = "SELECT value FROM json_each(?) WHERE value IN (SELECT request_id FROM seen)"
_SEEN_JSON = "INSERT OR IGNORE INTO seen SELECT value FROM json_each(?)"


class ReplayStaging:
    """The replay's deduplication: the request ids of the date read so far, in a
    temporary SQLite file (memory stays bounded for tens of millions of events).

    :meth:`add` keeps the first copy of each request id and returns those first copies;
    their sums are folded in memory (:class:`DayTotals`), so the file holds ids only.
    Synchronous sqlite3 on purpose: the replay calls :meth:`add` on a thread of its own,
    one call at a time, in read order. The file lives in a private temporary directory
    under ``directory`` (the summary DB's, so it is on a disk sized for the data) and is
    removed by :meth:`close`.
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=directory))
        self.path = self._dir / "staging.db"
        self.read = 0  # events of the date offered to add()
        self.unique = 0  # of which distinct request ids
        self._owner = -1
        try:
            self._owner = _hold(self._dir)
            for gone in sweep_abandoned(directory):
                log.warning("removed %s, left by a replay that did not finish", gone)
            # used by one thread at a time: the replay's staging thread, then the closer
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

    def add(self, entries: Sequence[LedgerEvent]) -> list[LedgerEvent]:
        """The entries whose request id no earlier entry had (the first copy wins, also
        within ``entries``), in order; their ids are recorded as seen."""
        if not entries:
            return []
        first: dict[str, LedgerEvent] = {}
        for entry in entries:
            first.setdefault(entry.request_id, entry)
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
        new = (
            [entry for rid, entry in first.items() if rid not in known]
            if known
            else list(first.values())
        )
        self.read += len(entries)
        self.unique += len(new)
        return new

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

    In memory: a date has as many of these as summary keys (tens of thousands), not
    events, and folding in Python costs less than grouping the events again in SQL."""

    def __init__(self) -> None:
        # key -> [input_tokens, output_tokens, requests, estimated_requests, cost_nano]
        self._sums: dict[Key, list[int]] = {}

    def add(self, entries: Iterable[LedgerEvent]) -> None:
        sums = self._sums
        for e in entries:
            key = (e.client_org_id, e.user_id, e.model)
            row = sums.get(key)
            if row is None:
                sums[key] = [e.input_tokens, e.output_tokens, 1, e.cost_estimated, e.cost_nano]
            else:
                row[0] += e.input_tokens
                row[1] += e.output_tokens
                row[2] += 1
                row[3] += e.cost_estimated
                row[4] += e.cost_nano

    def add_sums(self, rows: Iterable[Sequence]) -> None:
        """Add another fold's :meth:`sums` (a group of partitions read elsewhere)."""
        sums = self._sums
        for org, user, model, inp, out, requests, estimated, cost in rows:
            key = (org, user, model)
            row = sums.get(key)
            if row is None:
                sums[key] = [inp, out, requests, estimated, cost]
            else:
                row[0] += inp
                row[1] += out
                row[2] += requests
                row[3] += estimated
                row[4] += cost

    def sums(self) -> list[list]:
        """``[client, user, model, input_tokens, output_tokens, requests,
        estimated_requests, cost_nano]`` per key (JSON-friendly, for :meth:`add_sums`)."""
        return [[*key, *sums] for key, sums in self._sums.items()]

    def rows(self, day: str) -> list[SummaryRow]:
        return [SummaryRow(*key, day, *sums) for key, sums in self._sums.items()]


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
