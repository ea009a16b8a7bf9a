"""When a home partition's seen set is snapshotted, and how a snapshot is found again
(files: :mod:`tables.dedupe.seen_snapshots`).

**When** (:class:`SnapshotKeeper`, no settings):

* after a rebuild that read ids back from the topics (a new owner, a restart without a
  usable snapshot, a long tail): the next restart reads only what came after;
* every :data:`CHECK_SECONDS`, for each owned partition whose head moved since its last
  snapshot, once the records read since then reach a twentieth of its ids (at least
  :data:`MIN_TAIL_RECORDS`, at most :data:`MAX_TAIL_RECORDS`), or
  :data:`MAX_AGE_SECONDS` have passed: a restart then reads back at most about that
  (~14 s at ~140k records/s), while writing snapshots (24 B per id, ~85 ns per id)
  costs a fraction of the reading it saves (~7 µs per record);
* when the worker stops (SIGTERM), within :data:`STOP_SECONDS`.

A snapshot is taken on the event loop, between two appends, where a state's seen set and
chain head agree (the arrays are shared, not copied: they are never changed in place),
and written in a daemon thread: the hot path goes on, and a stop is never held up by a
write (an unfinished one leaves only a temporary file).

**Found again** (:func:`usable_snapshot`): the newest snapshot whose header reads, whose
chain head is a link of *this* batch log (the record at its offset, or the batch entry
it leads back to, has its positions and record marks), whose positions are positions in
*these* topics (``check_positions``), and whose arrays load with every check passing.
Anything else is skipped with a warning; with none left the state is rebuilt from the
topics as before.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar, cast

from aiokafka import AIOKafkaConsumer, TopicPartition

from agents.hot_path.home_partition import HomePartition
from streams.kafka.batch_log import BadChainRecord, BatchEntry, ChainHead, Fence, decode_rows_raw
from streams.kafka.log_reads import partition_bounds, record_at
from streams.metrics import SNAPSHOTS
from tables.dedupe import seen_snapshots
from tables.dedupe.seen_snapshots import Snapshot, SnapshotError

__all__ = [
    "CHECK_SECONDS",
    "MAX_AGE_SECONDS",
    "MIN_TAIL_RECORDS",
    "SnapshotKeeper",
    "usable_snapshot",
]

log = logging.getLogger(__name__)

CHECK_SECONDS = 30.0
MIN_TAIL_RECORDS = 100_000
MAX_TAIL_RECORDS = 2_000_000
MAX_AGE_SECONDS = 1800.0
STOP_SECONDS = 5.0
#: Links walked back from a snapshot's head (fences) to the batch entry that set its
#: positions.
_MAX_WALK = 64

T = TypeVar("T")


def in_daemon_thread(work: Callable[[], T]) -> asyncio.Future[T]:
    """``work()`` in a daemon thread: unlike ``asyncio.to_thread``'s pool, which the
    interpreter joins at exit, it never keeps a stopping worker alive."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = work()
        except BaseException as error:  # handed to the awaiting task
            loop.call_soon_threadsafe(_settle, future, None, error)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    threading.Thread(target=run, name="seen-snapshot", daemon=True).start()
    return future


def _settle(future: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(cast(T, result))  # no error: what the work returned


class SnapshotKeeper:
    """Takes and writes snapshots of home partitions (module docstring)."""

    def __init__(self, data_dir: Path, topic: str, ttl_ms: int) -> None:
        self.folder = seen_snapshots.directory(data_dir, topic)
        self.topic = topic
        self.ttl_ms = ttl_ms
        self._writing: dict[int, asyncio.Future[Path]] = {}
        #: partition -> (monotonic time, head offset, records read) at its last snapshot
        self._last: dict[int, tuple[float, int, int]] = {}

    @staticmethod
    def _records(head: ChainHead) -> int:
        return head.usage_next + head.rerouted_next

    def noted(self, state: HomePartition) -> None:
        """``state`` is (as good as) snapshotted at its head: loaded from one."""
        self._last[state.partition] = (
            time.monotonic(),
            state.head.offset,
            self._records(state.head),
        )

    def moved(self, state: HomePartition) -> bool:
        """Whether the head moved since the partition's last snapshot (or it has none)."""
        last = self._last.get(state.partition)
        return state.head.offset >= 0 and (last is None or last[1] != state.head.offset)

    def due(self, state: HomePartition) -> bool:
        if state.head.offset < 0 or state.partition in self._writing:
            return False
        last = self._last.get(state.partition)
        if last is None:
            return True
        when, offset, records = last
        if state.head.offset == offset:
            return False
        tail = self._records(state.head) - records
        return (
            tail >= max(MIN_TAIL_RECORDS, min(len(state.seen) // 20, MAX_TAIL_RECORDS))
            or time.monotonic() - when >= MAX_AGE_SECONDS
        )

    def capture(self, state: HomePartition) -> Snapshot:
        """The state as it is now (call between appends, on the event loop)."""
        return Snapshot(
            self.topic,
            state.partition,
            state.head,
            self.ttl_ms,
            state.seen.segments(),
            [
                {
                    "usage_date": f.usage_date,
                    "usage_end": f.usage_end,
                    "rerouted_end": f.rerouted_end,
                }
                for f in state.fences.values()
            ],
            time.time_ns() // 1_000_000,
        )

    def start(self, state: HomePartition) -> asyncio.Future[Path] | None:
        """Snapshot ``state`` now, written in the background (one write per partition
        at a time); returns the write, or None when one is already going on."""
        if state.head.offset < 0 or state.partition in self._writing:
            return None
        snapshot = self.capture(state)
        self._last[state.partition] = (
            time.monotonic(),
            state.head.offset,
            self._records(state.head),
        )
        started = time.monotonic()
        write = in_daemon_thread(lambda: seen_snapshots.write(self.folder, snapshot))
        self._writing[state.partition] = write

        def done(future: asyncio.Future[Path]) -> None:
            self._writing.pop(state.partition, None)
            if future.cancelled():
                return
            error = future.exception()
            if error is not None:
                SNAPSHOTS.labels(result="failed").inc()
                log.warning(
                    "home partition %d: seen-set snapshot failed (next try in %.0f s): %s",
                    state.partition,
                    CHECK_SECONDS,
                    error,
                )
                self._last.pop(state.partition, None)
                return
            SNAPSHOTS.labels(result="written").inc()
            log.info(
                "home partition %d: seen-set snapshot of %d ids at chain head %d written"
                " in %.1f s (%s)",
                state.partition,
                snapshot.ids,
                snapshot.head.offset,
                time.monotonic() - started,
                future.result().name,
            )

        write.add_done_callback(done)
        return write

    async def settle(self, timeout: float) -> None:
        """Wait (bounded) for the writes going on."""
        writes = list(self._writing.values())
        if writes:
            await asyncio.wait(writes, timeout=timeout)


async def _head_on_chain(
    consumer: AIOKafkaConsumer, topic: str, partition: int, head: ChainHead
) -> str | None:
    """Why ``head`` is not a link of this batch log (None when it is): the record at its
    offset is a chain record and, through fences' ``prev``, leads back to a batch entry
    with the head's positions and record marks (or to the chain's start with none)."""
    tp = TopicPartition(topic, partition)
    bounds = await partition_bounds(consumer, tp)
    offset = head.offset
    for _ in range(_MAX_WALK):
        record = await record_at(consumer, tp, offset, bounds)
        if record is None:
            return f"the batch log holds no record at offset {offset}"
        try:
            link = decode_rows_raw(record.value)
        except BadChainRecord:
            return f"batch-log offset {offset} is not a chain record"
        if isinstance(link, BatchEntry):
            same = (
                link.usage_next,
                link.rerouted_next,
                link.usage_mark,
                link.rerouted_mark,
            ) == (head.usage_next, head.rerouted_next, head.usage_mark, head.rerouted_mark)
            return None if same else f"batch-log offset {offset} is another batch"
        if not isinstance(link, Fence):
            return f"batch-log offset {offset} is not a link"
        if link.prev < 0:  # the chain starts with fences: no positions yet
            same = (head.usage_next, head.rerouted_next) == (0, 0)
            return None if same else "the chain starts with a fence at other positions"
        offset = link.prev
    return f"more than {_MAX_WALK} fences before a batch"


async def usable_snapshot(
    consumer: AIOKafkaConsumer,
    folder: Path,
    topic: str,
    partition: int,
    ttl_ms: int,
    check_positions: Callable[[ChainHead], Awaitable[str | None]],
) -> Snapshot | None:
    """The newest snapshot of ``partition`` that passes every check (module docstring),
    or None."""
    for path, header in seen_snapshots.usable(folder, partition):
        try:
            head = ChainHead(**header["head"])
            why = await _head_on_chain(consumer, topic, partition, head)
            if why is not None:
                raise SnapshotError(f"its chain head is not on this batch log: {why}")
            why = await check_positions(head)
            if why is not None:
                raise SnapshotError(f"its positions are not in these topics: {why}")
            return await in_daemon_thread(
                functools.partial(seen_snapshots.load, path, topic, partition, ttl_ms)
            )
        except (SnapshotError, TypeError, KeyError, ValueError) as error:
            log.warning("seen-set snapshot %s ignored: %s", path, error)
    return None
