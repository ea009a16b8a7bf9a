"""The summary writer's transaction: batch-log records into ``daily_pending``, once each.

One ``BEGIN IMMEDIATE`` transaction per group of records read from the batch log
(:mod:`streams.kafka.batch_log`). Per home partition, ``batch_log_heads`` holds the next offset
to read and the chain head, and is updated in the same transaction as the sums, so:

* a record below ``next_offset`` was already judged: redelivered, skipped;
* a record the chain rule rejects (a zombie's, or one raced by another) moves
  ``next_offset`` and adds nothing;
* a valid :class:`~streams.kafka.batch_log.BatchEntry` folds its rows into ``daily_pending``
  (the same increments the single-process hot path folds: ``usage_daily`` receives them
  when the day closes, or at the next rollup pass for a day that closed already, so a
  late event re-opens its day) and becomes the head.

A crash anywhere rolls the transaction back; the records are read again from the stored
offsets. Two writers on one file would be safe too (the heads are read inside the
transaction), though one is the deployment.

Synchronous ``sqlite3`` on one connection, run in the writer's own thread; the rows are
summed by SQLite (tables/summary_db/summary_keys.py), which releases the GIL meanwhile.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

from streams.kafka.batch_log import (
    AnyLogRecord,
    BatchEntry,
    BatchPart,
    Chain,
    ChainHead,
    Fence,
    SumRow,
)
from tables.summary_db.schema import open_sync, utc_now_text
from tables.summary_db.summary_keys import SumsFolder

__all__ = ["ApplyResult", "BatchApplier", "StoredHead"]


@dataclass(frozen=True, slots=True)
class StoredHead:
    """A partition's row of ``batch_log_heads``."""

    partition: int
    next_offset: int
    head: ChainHead
    log_mark: str = ""  # record_mark of the batch-log record at next_offset - 1 ("" unknown)


@dataclass(slots=True)
class ApplyResult:
    applied: int = 0  # valid entries whose sums were added
    fences: int = 0  # valid fences
    redelivered: int = 0  # below next_offset: judged before
    not_in_chain: int = 0  # rejected by the chain rule
    not_a_record: int = 0  # bytes that are no batch-log record
    requests: int = 0  # requests added
    late: int = 0  # of which for dates already closed
    parts: int = 0  # BatchPart records kept for the entry that names them
    missing_parts: int = 0  # named by a valid entry but never read: those rows are lost


_SAVE_HEAD = """
    INSERT INTO batch_log_heads (partition, next_offset, head_offset, usage_next,
        rerouted_next, newest_event_ms, updated_at, log_mark, usage_mark, rerouted_mark)
    VALUES (?,?,?,?,?,?,?,?,?,?)
    ON CONFLICT (partition) DO UPDATE SET
        next_offset = excluded.next_offset, head_offset = excluded.head_offset,
        usage_next = excluded.usage_next, rerouted_next = excluded.rerouted_next,
        newest_event_ms = excluded.newest_event_ms, updated_at = excluded.updated_at,
        log_mark = excluded.log_mark, usage_mark = excluded.usage_mark,
        rerouted_mark = excluded.rerouted_mark
"""


class BatchApplier:
    """The writer's connection to the summary DB (module docstring)."""

    def __init__(self, path: Path, cache_mib: int = 64) -> None:
        self.path = path
        self.cache_mib = cache_mib
        self._conn: sqlite3.Connection | None = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = open_sync(self.path, cache_mib=self.cache_mib)
        return self._conn

    @property
    def opened(self) -> sqlite3.Connection | None:
        """The connection if it is open; never opens it (``/ready`` asks whether this
        connection holds the write lock, and must not open one for that)."""
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def heads(self) -> dict[int, StoredHead]:
        return _heads(self.conn)

    def forget_position(self, partition: int) -> None:
        """Drop a partition's stored position and chain head: the batch log there is a new
        one (agents/summary_writer/log_guard.py), to be followed from its start. The bills stay."""
        self.conn.execute("DELETE FROM batch_log_heads WHERE partition = ?", (partition,))

    def replay_done(self, fence: Fence) -> bool:
        """True once the fence's replay, or a later replay of the same date, completed."""
        found = self.conn.execute(
            _REPLAY_DONE, {"day": fence.usage_date, "replay": fence.replay_id}
        ).fetchone()
        return found is not None

    def apply(
        self,
        records: Sequence[tuple[int, int, AnyLogRecord | None]],
        marks: Mapping[int, tuple[int, str]] | None = None,
    ) -> tuple[ApplyResult, dict[int, StoredHead]]:
        """Apply ``(partition, offset, record)`` in log order per partition (``None``:
        bytes that are not a chain record). ``marks`` gives per partition the offset and
        :func:`~streams.kafka.batch_log.record_mark` of the last record read, stored with the
        position when it is the record just before it. Returns what happened and the new
        heads."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            result, heads = self._apply(conn, records, marks or {})
            conn.execute("COMMIT")
        except BaseException:
            # on SQLITE_FULL or an I/O error SQLite rolled back already: a ROLLBACK would
            # raise "no transaction is active" and hide the real error
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result, heads

    def _apply(
        self,
        conn: sqlite3.Connection,
        records: Sequence[tuple[int, int, AnyLogRecord | None]],
        marks: Mapping[int, tuple[int, str]],
    ) -> tuple[ApplyResult, dict[int, StoredHead]]:
        result = ApplyResult()
        orphans: list[tuple[int, int]] = []  # (partition, offset of a valid link)
        heads = _heads(conn)
        chains: dict[int, Chain] = {}
        next_offsets = {p: stored.next_offset for p, stored in heads.items()}
        entries: list[tuple[int, BatchEntry[list[SumRow]] | BatchEntry[msgspec.Raw]]] = []
        for partition, offset, record in records:
            if offset < next_offsets.get(partition, 0):
                result.redelivered += 1
                continue
            next_offsets[partition] = offset + 1
            chain = chains.get(partition)
            if chain is None:
                stored = heads.get(partition)
                chain = chains[partition] = Chain(stored.head if stored else None)
            if isinstance(record, BatchPart):
                # kept until the entry that names it is read (maybe in a later
                # transaction); a valid link drops the parts before it nobody named
                conn.execute(_STAGE_PART, (partition, offset, _rows_blob(record.rows)))
                result.parts += 1
            elif record is None:
                result.not_a_record += 1
            elif not chain.accept(offset, record):
                result.not_in_chain += 1
            else:
                if isinstance(record, BatchEntry):
                    result.applied += 1
                    entries.append((partition, record))
                else:
                    result.fences += 1
                orphans.append((partition, offset))
        if entries:
            requests, late = self._fold(conn, entries, result)
            result.requests += requests
            result.late += late
        conn.executemany(_DROP_PARTS_BEFORE, orphans)
        updated_at = utc_now_text()
        saved = []
        for partition, nxt in next_offsets.items():
            chain = chains.get(partition)
            if chain is None:
                continue
            head = chain.head
            stored = heads.get(partition)
            last = marks.get(partition)
            if last is not None and last[0] == nxt - 1:
                log_mark = last[1]
            else:
                log_mark = stored.log_mark if stored and stored.next_offset == nxt else ""
            saved.append(
                (
                    partition,
                    nxt,
                    head.offset,
                    head.usage_next,
                    head.rerouted_next,
                    head.newest_event_ms,
                    updated_at,
                    log_mark,
                    head.usage_mark,
                    head.rerouted_mark,
                )
            )
            heads[partition] = StoredHead(partition, nxt, head, log_mark)
        conn.executemany(_SAVE_HEAD, saved)
        return result, heads

    def _fold(
        self,
        conn: sqlite3.Connection,
        entries: Sequence[tuple[int, BatchEntry[list[SumRow]] | BatchEntry[msgspec.Raw]]],
        result: ApplyResult,
    ) -> tuple[int, int]:
        """The entries' rows, and their parts' rows, as increments of ``daily_pending``
        (tables/summary_db/summary_keys.py): rows still JSON text (the writer's
        :func:`~streams.kafka.batch_log.decode_rows_raw`) are staged by SQLite itself, decoded
        ones as values."""
        folder = SumsFolder(conn)
        for partition, entry in entries:
            _add_rows(folder, entry.rows)
            if not entry.parts:
                continue
            staged = dict(
                conn.execute(
                    "SELECT offset, rows FROM batch_log_parts WHERE partition = ?"
                    f" AND offset IN ({','.join('?' * len(entry.parts))})",
                    (partition, *entry.parts),
                ).fetchall()
            )
            missing = [offset for offset in entry.parts if offset not in staged]
            if missing:  # never written so by the pipeline: counted, logged by the writer
                result.missing_parts += len(missing)
            for offset in entry.parts:
                if offset in staged:
                    folder.add_json(staged[offset])
        folded = folder.fold()
        return folded.requests, folded.late


_STAGE_PART = "INSERT OR REPLACE INTO batch_log_parts VALUES (?, ?, ?)"
_DROP_PARTS_BEFORE = "DELETE FROM batch_log_parts WHERE partition = ? AND offset < ?"


def _rows_blob(rows: list[SumRow] | msgspec.Raw) -> bytes:
    """A part's rows as the JSON text the fold reads back."""
    if isinstance(rows, msgspec.Raw):
        return bytes(rows)
    return msgspec.json.encode(rows)


def _add_rows(folder: SumsFolder, rows: list[SumRow] | msgspec.Raw) -> None:
    if isinstance(rows, msgspec.Raw):
        folder.add_json(rows)
    else:
        folder.add(rows)


_REPLAY_DONE = """
    SELECT 1 FROM replay_runs r
    WHERE r.usage_date = :day AND r.status = 'complete' AND (
        r.replay_id = :replay
        OR r.started_at > COALESCE(
            (SELECT started_at FROM replay_runs WHERE replay_id = :replay), '9999'))
"""


def _heads(conn: sqlite3.Connection) -> dict[int, StoredHead]:
    return {
        partition: StoredHead(
            partition,
            nxt,
            ChainHead(head, usage_next, rerouted_next, newest, usage_mark, rerouted_mark),
            log_mark,
        )
        for (
            partition,
            nxt,
            head,
            usage_next,
            rerouted_next,
            newest,
            log_mark,
            usage_mark,
            rerouted_mark,
        ) in conn.execute(
            "SELECT partition, next_offset, head_offset, usage_next, rerouted_next,"
            " newest_event_ms, log_mark, usage_mark, rerouted_mark FROM batch_log_heads"
        )
    }
