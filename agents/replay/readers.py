"""The reading side of ``usage-stream replay``: reader processes, one per group of home
partitions, and the replay's handle on them (:class:`ReaderProcesses`).

Why processes: reading is CPU-bound Python (aiokafka builds an object per record, and
the date's records are validated and billed), so one process reads at about half the
rate of a bare aiokafka+orjson loop, and a second core would sit idle. Home partitions
deduplicate independently: every copy of a request is counted at its home partition,
read there from the usage topic or as a rerouted copy from the same partition of the
rerouted topic (streams/model/partitioning.py). So each group of partitions is read,
validated, deduplicated (its own :class:`tables.summary_db.replay_staging.ReplayStaging` file) and
folded into per-key sums by its own process, and the replay adds the groups' sums up:
exactly the sums one process would have found.

A reader process (``python -m agents.replay.readers``, started by :class:`ReaderProcesses`)
talks JSON lines: the replay writes to its stdin, it writes to its stdout; logs go to
stderr. In order:

1. replay → reader: the job: ``day``, ``partitions`` (the group), ``partition_count``,
   ``from_offsets``, ``prices`` (the replay's snapshot, so every group prices alike),
   ``losers`` (per partition of the group, the offsets and value digests of each topic's
   copies the workers dead-lettered as conflicting duplicates: left out,
   :mod:`agents.replay.worker_verdicts`).
2. reader → replay: ``ranges`` (its usage-topic slice, fixed), then ``progress`` per
   fetch, then ``totals`` lines (the usage slice's sums per key, in chunks: added up
   while the reader reads its rerouted slice and the other readers read), ``totals``
   lines of the rerouted slice, and ``read``: the ends of both slices and the counts so
   far.
3. replay → reader: ``extra``: per partition the stretch of each topic between the
   replay's end snapshot and its fence (empty for a dry run). The reader stages it like
   the rest (the first copy read still wins) and answers with ``totals`` lines (that
   stretch's sums) and ``done`` (final counts), then cleans up and exits while the
   replay goes on (the replay waits for that exit when it ends).

A reader that fails answers ``error`` (its exception's class and one line) and exits 1.
One whose replay died exits 1 when it next waits for the replay (its stdin is closed) or
writes to it (a broken pipe); SIGTERM from the replay unwinds it and removes its dedupe
file; one killed outright leaves that file to the next replay's sweep. A reader spawned
but not needed (fewer partitions than readers) finds its stdin closed before any job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import orjson

from agents.replay.topic_slice import PartitionRange, ReplayReader, ReplayReadError, TopicNotFound
from agents.replay.worker_verdicts import ConflictLosers, without_losers
from streams.kafka.broker import BrokerUnreachable, groupless_consumer
from streams.settings import Settings
from tables.summary_db.replay_staging import (
    MEMORY_IDS,
    DayTotals,
    ReplayStaging,
    sweep_abandoned,
)

if TYPE_CHECKING:
    from aiokafka import ConsumerRecord

    from streams.model.event import KafkaRecord, UsageEvent
    from streams.model.pricing import Price

__all__ = ["ReadCounts", "ReaderProcesses", "one_line", "reader_groups"]

log = logging.getLogger(__name__)

#: A line of the protocol between the replay and a reader (module docstring), as decoded
#: JSON: its fields are read by name where it is handled.
Message = dict[str, Any]


class ReadCountsJSON(TypedDict):
    """:class:`ReadCounts` as a reader sends it."""

    records_read: int
    invalid: dict[str, int]
    events_of_day: int
    unique: int


#: Seconds a reader gets to exit after ``done`` or after its stdin closed, before SIGKILL.
EXIT_SECONDS = 10.0
#: Errors a reader reports by class, raised again as such by the replay.
_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls for cls in (BrokerUnreachable, TopicNotFound, ReplayReadError)
}


def reader_groups(partitions: Sequence[int], readers: int) -> list[list[int]]:
    """``partitions`` dealt round-robin into at most ``readers`` non-empty groups."""
    count = max(1, min(readers, len(partitions)))
    return [list(partitions[i::count]) for i in range(count)]


@dataclass
class ReadCounts:
    """What a reader read: usage-topic records, invalid ones by reason (only records that
    could be of the date are validated), valid events of the date (copies included) and
    distinct request ids among them."""

    records_read: int = 0
    invalid: Counter[str] = field(default_factory=Counter)
    events_of_day: int = 0
    unique: int = 0

    def as_json(self) -> ReadCountsJSON:
        return {
            "records_read": self.records_read,
            "invalid": dict(self.invalid),
            "events_of_day": self.events_of_day,
            "unique": self.unique,
        }

    @classmethod
    def total(cls, parts: Iterable[ReadCountsJSON]) -> ReadCounts:
        counts = cls()
        for part in parts:
            counts.records_read += part["records_read"]
            counts.invalid.update(part["invalid"])
            counts.events_of_day += part["events_of_day"]
            counts.unique += part["unique"]
        return counts


# The reader process ----------------------------------------------------------------------


#: Above this share of a fetch's records being events of the date, the next fetch is
#: validated whole instead of glancing at each record's timestamp first (the glance costs
#: ~0.3 µs, validation ~2.3: it pays only while more than ~13 % of the records are of
#: other dates, e.g. bench/run.py's default workload, not its many-keys one).
_VALIDATE_ALL_ABOVE = 0.85


class _DayStager:
    """Validates fetched records and stages the events of the date, like the worker:
    from the usage topic only events at their home partition (a copy read elsewhere is
    counted through its rerouted copy, as the live pipeline counts it), from the rerouted
    topic every one, leaving out the copies the workers judged conflicting duplicates
    (``losers``: ``(rerouted, partition)`` -> offset -> value digest). Then deduplicates
    them (the first
    copy read wins, so in read order: the copies left of a request bill alike)
    and folds the first copies into ``totals``: in this thread while the ids fit in
    memory, on a thread of its own (one batch at a time, awaited before the next) once
    they spilled to the staging file, whose SQL releases the GIL.

    Which records are validated: those whose timestamp may be of the date at a glance
    (:func:`streams.model.event.event_time_hint`), or all of them while nearly every record is
    of the date (``_VALIDATE_ALL_ABOVE``). Both count the same records as invalid: an
    invalid record counts when the glance cannot rule the date out."""

    def __init__(
        self,
        staging: ReplayStaging,
        totals: DayTotals,
        counts: ReadCounts,
        day: date,
        prices: Mapping[str, Price],
        settings: Settings,
        partitions: int,
        losers: Mapping[tuple[bool, int], Mapping[int, str]],
    ) -> None:
        from streams.model.business_time import UsageDates, local_midnight_ms

        self.staging = staging
        self.losers = losers
        self.totals = totals
        self.counts = counts
        self.prices = prices
        self.partitions = partitions
        tz = settings.tz
        self.day_text = day.isoformat()
        self.dates = UsageDates(tz)
        # a cheap prefilter on event time; the usage date of streams.pricing.bill decides
        self.low = local_midnight_ms(day, tz) - 1_000
        self.high = local_midnight_ms(day + timedelta(days=1), tz) + 1_000
        self.validate_all = False
        self.loop = asyncio.get_running_loop()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="replay-staging")

    async def stage(self, rerouted: bool, batch: list[tuple[int, list[ConsumerRecord]]]) -> int:
        """One fetch: ``(partition, records)`` pairs; returns the records it held."""
        from streams.model.event import (
            MAX_FUTURE_MS,
            InvalidEvent,
            event_time_hint,
            parse_records,
        )
        from streams.model.partitioning import home_partitions
        from streams.model.pricing import bill

        low, high = self.low, self.high
        located: list[UsageEvent] = []  # valid events whose time is about the date
        read_at: list[int] = []  # the partition each was read from
        count = 0
        invalid = self.counts.invalid
        validate_all = self.validate_all

        def maybe_of_the_day(record: KafkaRecord) -> bool:
            # the future is bounded by each record's own timestamp, as the worker bounds it
            ms = event_time_hint(record.value)
            return ms is None or low <= ms < high or ms > record.timestamp + MAX_FUTURE_MS

        for partition, records in batch:
            count += len(records)
            losers = self.losers.get((rerouted, partition))
            if losers:
                records = without_losers(records, losers)
            if not validate_all:  # only what may be an event of the date
                records = [record for record in records if maybe_of_the_day(record)]
            for record, event in zip(records, parse_records(records), strict=True):
                if type(event) is InvalidEvent:
                    # a rerouted copy is a valid event's (never invalid)
                    if not rerouted and (not validate_all or maybe_of_the_day(record)):
                        invalid[event.reason] += 1
                elif low <= event.event_ms < high:
                    located.append(event)
                    read_at.append(partition)
        self.validate_all = bool(count) and len(located) > _VALIDATE_ALL_ABOVE * count
        if not rerouted and located:
            homes = home_partitions([event.request_id for event in located], self.partitions)
            located = [
                event
                for event, partition, home in zip(located, read_at, homes, strict=True)
                if home == partition
            ]
        of_day: list[UsageEvent] = []
        costs: list[int] = []
        estimated: list[int] = []
        prices, dates, day_text = self.prices, self.dates, self.day_text
        for event in located:
            day, _, cost, guess = bill(event, prices, dates)
            if day == day_text:
                of_day.append(event)
                costs.append(cost)
                estimated.append(guess)
        if of_day:
            if self.staging.spilled:
                await self.loop.run_in_executor(
                    self.executor, self._stage, of_day, costs, estimated
                )
            else:
                self._stage(of_day, costs, estimated)
        self.counts.events_of_day = self.staging.read
        self.counts.unique = self.staging.unique
        if not rerouted:
            self.counts.records_read += count
        return count

    def _stage(self, events: list[UsageEvent], costs: list[int], estimated: list[int]) -> None:
        fresh = self.staging.first_copies([event.request_id for event in events])
        self.totals.add_events(events, costs, estimated, fresh)

    async def close(self) -> None:
        self.executor.shutdown(wait=True)


async def _read_slice(
    reader: ReplayReader, stager: _DayStager, rerouted: bool, say: Callable[..., None]
) -> None:
    async for batch in reader.batches():
        count = await stager.stage(rerouted, batch)
        if not rerouted:
            say(progress=count)


async def _read_range(
    settings: Settings,
    stager: _DayStager,
    topic: str,
    rerouted: bool,
    ranges: Mapping[int, tuple[int, int]],
) -> None:
    """The records of ``[start, end)`` per partition (the stretch between the replay's end
    snapshot and its fence), staged like the rest."""
    from aiokafka import TopicPartition

    from agents.hot_path.home_state import read_range
    from streams.kafka.broker import BOUNDED_READ_WAIT_MS

    if not any(end > start for start, end in ranges.values()):
        return
    consumer = groupless_consumer(
        settings,
        fetch_max_wait_ms=BOUNDED_READ_WAIT_MS,
    )
    await consumer.start()
    try:
        for partition, (start, end) in sorted(ranges.items()):
            if end <= start:
                continue
            tp = TopicPartition(topic, partition)
            async for records in read_range(consumer, tp, start, end):
                await stager.stage(rerouted, [(partition, records)])
    finally:
        await consumer.stop()


_DUMPS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def _say(**message: object) -> None:
    sys.stdout.buffer.write(orjson.dumps(message, option=_DUMPS) + b"\n")
    sys.stdout.buffer.flush()


async def _next_line(stdin: asyncio.StreamReader) -> Message:
    line = await stdin.readline()
    if not line:
        raise SystemExit(1)  # the replay is gone: nothing to report to
    message: Message = orjson.loads(line)
    return message


@contextlib.contextmanager
def sigterm_cancels_this_task() -> Iterator[None]:
    """SIGTERM cancels the running task, so it unwinds (files removed, connections
    closed) as on Ctrl-C; the handler is removed when the block ends.

    Why removed here and not by the loop's ``close()``: that closes the loop's wakeup
    socket *before* it removes the handlers, and a SIGTERM in between (the replay ending
    its readers) made Python print "Exception ignored when trying to write to the
    signal wakeup fd" with a traceback on stderr."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    try:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    except (NotImplementedError, RuntimeError):  # not the main thread, or no signals
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def _read_group(settings: Settings) -> None:
    # the replay ends a reader it no longer needs with SIGTERM: unwind, so the dedupe
    # file is removed (SIGKILL leaves it to the next replay's sweep)
    with sigterm_cancels_this_task():
        await _read_group_until_done(settings)


async def _read_group_until_done(settings: Settings) -> None:
    from streams.model.pricing import ModelPrice

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    job = await _next_line(stdin)
    day = date.fromisoformat(job["day"])
    group = job["partitions"]
    from_offsets = {int(p): offset for p, offset in job["from_offsets"].items()} or None
    prices = {
        model: ModelPrice(model, Decimal(prompt), Decimal(completion), Decimal(request))
        for model, prompt, completion, request in job["prices"]
    }
    losers = {
        (topic == settings.rerouted_topic, int(partition)): {
            offset: digest for offset, digest in copies
        }
        for partition, topics in job["losers"].items()
        for topic, copies in topics.items()
    }
    counts, totals = ReadCounts(), DayTotals()
    with ReplayStaging(settings.summary_db_path.parent, MEMORY_IDS) as staging:
        async with ReplayReader(settings, day, from_offsets, partitions=group) as reader:
            _say(
                ranges=[
                    [r.partition, r.start, r.end, r.origin, r.cut] for r in reader.ranges.values()
                ]
            )
            stager = _DayStager(
                staging, totals, counts, day, prices, settings, job["partition_count"], losers
            )
            try:
                await _read_slice(reader, stager, False, _say)
                # the usage slice's sums now: the replay adds them up while this reader
                # reads its rerouted slice (~0.6 s of adding for 2 x 289k keys that came
                # after the last record, bench/run.py --workload many-keys)
                _say_totals(totals)
                totals = stager.totals = DayTotals()
                rerouted_ends: dict[int, int] = {}
                try:
                    async with ReplayReader(
                        settings, day, None, topic=settings.rerouted_topic, partitions=group
                    ) as again:
                        await _read_slice(again, stager, True, _say)
                        rerouted_ends = {p: r.end for p, r in again.ranges.items()}
                except TopicNotFound:
                    pass  # no worker of this version ran yet: nothing was rerouted
                usage_ends = {p: r.end for p, r in reader.ranges.items()}
                ends = {"usage_ends": usage_ends, "rerouted_ends": rerouted_ends}
                # the rerouted slice's sums now, while the replay waits for the other
                # readers and fences; the stretch up to the fences is summed apart
                _say_totals(totals)
                totals = stager.totals = DayTotals()
                _say(read=ends, counts=counts.as_json())
                extra = (await _next_line(stdin))["extra"]
                for topic, rerouted in (
                    (settings.USAGE_TOPIC, False),
                    (settings.rerouted_topic, True),
                ):
                    ranges = {int(p): tuple(stretch[topic]) for p, stretch in extra.items()}
                    await _read_range(settings, stager, topic, rerouted, ranges)
            finally:
                await stager.close()
            # the answer before the clean-up (the consumer's stop, the dedupe file's
            # removal), which the replay's replace need not wait for
            _say_totals(totals)
            _say(done=counts.as_json())


def _say_totals(totals: DayTotals) -> None:
    for chunk in totals.sums():  # (each a line of at most SUMS_PER_CHUNK keys)
        _say(totals=chunk)


def main() -> None:
    """``python -m agents.replay.readers``: one reader process (module docstring)."""
    from streams.gc_tuning import tune_for_batches
    from streams.settings import get_settings

    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s"
    )
    # aiokafka logs every failed connection attempt; the one-line error is the answer
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    tune_for_batches()
    try:
        asyncio.run(_read_group(get_settings()))
    except tuple(_ERRORS.values()) as error:
        _say(error={"kind": type(error).__name__, "message": one_line(error)})
        raise SystemExit(1) from None
    except (KeyboardInterrupt, SystemExit, BrokenPipeError, asyncio.CancelledError):
        raise SystemExit(1) from None
    except Exception as error:
        log.exception("replay reader failed")
        with contextlib.suppress(OSError):
            _say(error={"kind": type(error).__name__, "message": one_line(error)})
        raise SystemExit(1) from None


def one_line(error: BaseException) -> str:
    """An error as the one line the operator sees (the replay's and its readers')."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# The replay's side -------------------------------------------------------------------------


@dataclass
class _Reader:
    group: list[int]
    process: asyncio.subprocess.Process
    done: bool = False  # said "done": it only has to exit

    def send(self, **message: object) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(orjson.dumps(message, option=orjson.OPT_NON_STR_KEYS) + b"\n")

    async def messages(self) -> AsyncIterator[Message]:
        assert self.process.stdout is not None
        while True:
            line = await self.process.stdout.readline()
            if not line:
                code = await self.process.wait()
                raise ReplayReadError(
                    f"the reader of partition(s) {', '.join(map(str, self.group))} exited"
                    f" with status {code} before it answered"
                )
            message = orjson.loads(line)
            error = message.get("error")
            if error is not None:
                kind = _ERRORS.get(error["kind"], ReplayReadError)
                raise kind(error["message"])
            yield message


def _child_env() -> dict[str, str]:
    """The replay's environment (its settings), with this package importable from any
    working directory."""
    env = os.environ.copy()
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
    return env


@dataclass
class GroupsRead:
    """The first pass of every reader: each topic's end per partition, and the counts."""

    usage_ends: dict[int, int]
    rerouted_ends: dict[int, int]
    counts: ReadCounts


class ReaderProcesses:
    """``async with ReaderProcesses(count) as readers``: reader processes, started at once
    (their start-up overlaps the replay's own), then given their groups of partitions by
    :meth:`start` and driven through the protocol of the module docstring. Leaving the
    block ends the readers still running (an error, a cancellation)."""

    def __init__(self, count: int, staging_dir: Path | None = None) -> None:
        self.count = max(1, count)
        #: where the readers keep their dedupe files (the summary DB's directory): swept
        #: after a reader had to be killed, so no file outlives the replay
        self.staging_dir = staging_dir
        self.readers: list[_Reader] = []
        self.totals = DayTotals()  # the readers' sums, added up as they arrive
        self._streams: list[AsyncIterator[Message]] = []

    async def __aenter__(self) -> ReaderProcesses:
        try:
            for _ in range(self.count):
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "agents.replay.readers",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    env=_child_env(),
                    limit=64 * 1024 * 1024,  # a totals line: SUMS_PER_CHUNK keys
                )
                self.readers.append(_Reader([], process))
        except BaseException:
            await self.close()
            raise
        return self

    async def start(
        self,
        day: date,
        groups: list[list[int]],
        partition_count: int,
        from_offsets: Mapping[int, int] | None,
        prices: Mapping[str, Price],
        losers: ConflictLosers | None = None,
    ) -> None:
        """Give each of the first ``len(groups)`` readers its group (at most ``count``)
        and the conflict losers of its partitions;
        the others, not needed (fewer partitions than readers), find their stdin closed
        and exit."""
        job = {
            "day": day.isoformat(),
            "partition_count": partition_count,
            "from_offsets": dict(from_offsets or {}),
            "prices": [  # exact: Decimal's str() reads back as the same Decimal
                [model, *map(str, (p.prompt_usd_per_token, p.completion_usd_per_token))]
                + [str(p.request_usd)]
                for model, p in prices.items()
            ],
        }
        assert 0 < len(groups) <= len(self.readers), "reader_groups(partitions, count)"
        spare = self.readers[len(groups) :]
        self.readers = self.readers[: len(groups)]
        for reader, group in zip(self.readers, groups, strict=True):
            reader.group = group
            mine = {p: losers[p] for p in group if losers and p in losers}
            reader.send(**job, partitions=group, losers=mine)
            self._streams.append(reader.messages())
        for reader in spare:
            assert reader.process.stdin is not None
            reader.process.stdin.close()
            try:
                await asyncio.wait_for(reader.process.wait(), EXIT_SECONDS)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    reader.process.kill()
                await reader.process.wait()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """End the readers still running (SIGTERM: they remove their dedupe files; one
        that said "done" is exiting on its own), and SIGKILL those that do not end
        within ``EXIT_SECONDS``. Their stdin is closed too: a reader whose SIGTERM came
        while nothing could be cancelled (still starting, or in a call that swallowed
        the cancellation) then finds it closed when it next waits for the replay, and
        exits through the same clean-up instead of waiting for the SIGKILL, which would
        leave its dedupe file to the next replay's sweep."""
        running = [r.process for r in self.readers if r.process.returncode is None]
        for reader in self.readers:
            if reader.process.returncode is None and not reader.done:
                stdin = reader.process.stdin
                if stdin is not None and not stdin.is_closing():
                    stdin.close()
                with contextlib.suppress(ProcessLookupError):
                    reader.process.terminate()
        killed = False
        for process in running:
            try:
                await asyncio.wait_for(asyncio.shield(process.wait()), EXIT_SECONDS)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
                killed = True
        if killed and self.staging_dir is not None:
            for gone in sweep_abandoned(self.staging_dir):
                log.warning("removed %s, left by a replay reader that had to be killed", gone)

    async def _each(self, until: Callable[[int, Message], bool]) -> None:
        """Feed each reader's messages to ``until`` (reader index, message) until it
        returns True for that reader; all readers concurrently, the first error raised."""

        async def one(index: int) -> None:
            async for message in self._streams[index]:
                if until(index, message):
                    return

        await asyncio.gather(*(one(i) for i in range(len(self.readers))))

    async def ranges(self) -> dict[int, PartitionRange]:
        """Every partition's usage-topic slice, once every reader has fixed its own."""
        ranges: dict[int, PartitionRange] = {}

        def take(_: int, message: Message) -> bool:
            for partition, start, end, origin, cut in message.get("ranges", ()):
                ranges[partition] = PartitionRange(partition, start, end, origin, cut)
            return "ranges" in message

        await self._each(take)
        return dict(sorted(ranges.items()))

    async def read(self, progress: Callable[[int], None]) -> GroupsRead:
        """Until every reader has read both slices."""
        usage_ends: dict[int, int] = {}
        rerouted_ends: dict[int, int] = {}
        parts: list[ReadCountsJSON] = []

        def take(_: int, message: Message) -> bool:
            if "progress" in message:
                progress(message["progress"])
                return False
            if "totals" in message:
                self.totals.add_sums([message["totals"]])
                return False
            read = message.get("read")
            if read is None:
                return False
            usage_ends.update({int(p): end for p, end in read["usage_ends"].items()})
            rerouted_ends.update({int(p): end for p, end in read["rerouted_ends"].items()})
            parts.append(message["counts"])
            return True

        await self._each(take)
        return GroupsRead(usage_ends, rerouted_ends, ReadCounts.total(parts))

    async def finish(
        self, extra: Mapping[int, Mapping[str, tuple[int, int]]]
    ) -> tuple[DayTotals, ReadCounts]:
        """Hand each reader its partitions' stretches up to the fences (``{partition:
        {topic: (start, end)}}``, empty for none) and add up what they found."""
        totals, self.totals = self.totals, DayTotals()  # (the replay frees it once read)
        parts: list[ReadCountsJSON] = []
        for reader in self.readers:
            reader.send(extra={p: extra[p] for p in reader.group if p in extra})

        def take(index: int, message: Message) -> bool:
            if "totals" in message:
                totals.add_sums([message["totals"]])
                return False
            if "done" in message:
                parts.append(message["done"])
                self.readers[index].done = True
                return True
            return False

        await self._each(take)
        # (their exits are awaited in close(): the replace goes on meanwhile)
        return totals, ReadCounts.total(parts)


if __name__ == "__main__":
    main()
