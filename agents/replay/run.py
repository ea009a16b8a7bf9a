"""Replay: re-aggregate one usage date from the topic and replace it atomically.

``usage-stream replay --date YYYY-MM-DD [--from-offsets P:O[,P:O...]] [--dry-run]``

1. Read every partition of ``USAGE_TOPIC`` from local midnight of the date minus
   ``REPLAY_MARGIN_HOURS`` (by Kafka timestamp) up to its end as of the start of the replay,
   with a group-less consumer: the live consumer group is never joined, rebalanced or
   committed to (agents/replay/topic_slice.py). ``--from-offsets`` overrides the start of the
   partitions it names; the others keep the default. The rerouted topic (copies the
   workers moved to their home partition) is read the same way.
2. Validate each record like the worker (``parse_records`` per fetch and partition: the
   future is bounded by each record's own timestamp, so every reader gives a record the
   same verdict). Invalid ones are counted and reported, **not** re-sent to the
   dead-letter topic (the worker did that when it first saw them). A record whose
   timestamp alone shows it is of another date is not validated (a glance at the
   timestamp costs an eighth of validating): the invalid count covers the records that
   could have been events of the date (malformed, without a usable timestamp, too far in
   the future, or of the date). Event time decides
   membership of the date. Like the live pipeline, a usage event counts where it is at
   home (streams/model/partitioning.py); a copy read elsewhere counts through its rerouted copy.
3. Deduplicate by ``request_id`` in a temporary SQLite file (first copy read wins; memory
   stays bounded), price events without ``cost_usd`` like the worker
   (:func:`streams.pricing.bill`) and fold the first copies into the date's sums
   per summary key, in memory.
4. Take the date over from the live pipeline (agents/replay/fences.py): a fence in every
   home partition's batch log, the records the workers read past the replay's end
   snapshot, every batch-log record up to the fences applied.
5. Replace the date in one transaction (tables/summary_db/replay_store.py): every ``usage_daily``
   row of the date becomes the replay's totals, the date's pending sums are dropped (they
   came from before the fences), a ``batch_runs`` row (kind ``replay``) records it, and
   the summary writer may go on past the fences. ``--dry-run`` reads and compares, appends
   no fence, prints the differences and rolls back: nothing is written, not even
   ``batch_runs``.

A date without any valid event in the replayed range is an error (one line, exit 1) and
nothing is written: most likely a wrong date or a topic whose retention already dropped it,
and replacing the date with "nothing" would silently delete a bill. The same goes for a bad
date, an unknown topic, an unreachable broker and an unwritable summary DB. Events of the
date are counted only if they are read: a range narrowed with ``--from-offsets`` leaves
out what lies before it.

Why the live workers and a replay cannot fight
----------------------------------------------
The fences split every home partition's stream of the date in two, at positions everyone
agrees on (the batch log's chain rule): below them the replay counts, above them the
workers do, and a worker reads every copy below a fence before any copy above it, so no
request counts on both sides or on neither. The summary writer stops at the fences until
the replace has committed, so the date's sums from above the fences are added after the
replace, never wiped by it. The date is marked closed by a replay, so later events of it
count as late and are rolled up at once. A replay that fails after fencing leaves the
writer waiting (``/ready`` says so): run the replay of that date again.

Test broker (Tansu) caveats
---------------------------
Its ListOffsets *latest* answer is wrong, so the end of each partition is the high
watermark of the first Fetch response, never ``end_offsets()``. Its ListOffsets *by
timestamp* answers by arrival order (and offset 0 for a time after the newest record), so
on Tansu a replay usually reads every partition from offset 0: slower, equally correct.
Cost estimates use the model prices stored now, which may differ from the prices the
worker used when it first recorded an event without ``cost_usd``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, NoReturn, TextIO

import click

from agents.replay.readers import ReadCounts, one_line, sigterm_cancels_this_task
from streams.cli import fail
from streams.settings import Settings, get_settings

if TYPE_CHECKING:
    import aiosqlite

    from agents.replay.topic_slice import PartitionRange
    from tables.summary_db.replay_store import ReplayOutcome, RowChange
    from tables.summary_db.summary_store import SummaryRow

log = logging.getLogger(__name__)

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
#: In a real (not dry) run, at most this many changed rows are listed; a dry run lists all.
LIST_CHANGES = 20


class PartialRange(RuntimeError):
    """Retention deleted part of the range of the date; nothing was written."""


class NoEventsForDate(RuntimeError):
    """The replayed range holds no valid event of the date; nothing was written."""


def parse_date(text: str | None) -> date:
    """The ``--date`` value; ValueError with a one-line reason."""
    if not text:
        raise ValueError("--date YYYY-MM-DD is required")
    if not _DATE.match(text.strip()):
        raise ValueError(f"--date: {text!r} is not a date in the form YYYY-MM-DD")
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--date: {text!r} is not a valid calendar date") from None


class Progress:
    """A tqdm bar on a terminal; otherwise a plain line every ~10 % or 5 s."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total = total
        self.label = label
        self.done = 0
        self.started = time.monotonic()
        self._last_line = self.started
        self._printed = 0  # records done at the last plain line
        self._next_tenth = 1  # print when done reaches this many tenths of the total
        self._bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=label,
                unit="rec",
                unit_scale=True,
                file=self.stream,
                dynamic_ncols=True,
            )

    def update(self, count: int) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
            return
        now = time.monotonic()
        tenths = self.done * 10 // self.total if self.total else 10
        if tenths >= self._next_tenth or now - self._last_line >= 5.0:
            self._line(now)
            self._next_tenth = tenths + 1

    def _line(self, now: float) -> None:
        self._last_line = now
        self._printed = self.done
        elapsed = max(now - self.started, 1e-9)
        percent = 100.0 * self.done / self.total if self.total else 100.0
        print(
            f"{self.label}: {self.done}/{self.total} records ({percent:.0f}%),"
            f" {self.done / elapsed:,.0f} rec/s",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.done != self._printed:
            self._line(time.monotonic())


@dataclass
class ReplayReport:
    """What a replay read and did; ``outcome`` is None until the replace ran."""

    day: date
    topic: str
    dry_run: bool
    ranges: list[PartitionRange] = field(default_factory=list)
    #: what the readers read, added up (records, invalid by reason, events, unique ids)
    counts: ReadCounts = field(default_factory=ReadCounts)
    outcome: ReplayOutcome | None = None
    seconds: float = 0.0
    #: the read's steps: readers started, slices read, fenced (not in a dry run), finished
    read_timings: dict[str, float] = field(default_factory=dict)

    @property
    def records_read(self) -> int:
        return self.counts.records_read

    @property
    def invalid(self) -> Counter[str]:
        return self.counts.invalid

    @property
    def unique(self) -> int:
        return self.counts.unique

    @property
    def duplicates(self) -> int:
        return self.counts.events_of_day - self.counts.unique

    @property
    def read_seconds(self) -> float:
        """Opening the slices, reading, validating, deduplicating, fencing."""
        return sum(self.read_timings.values())

    def plan_line(self) -> str:
        parts = ", ".join(
            f"p{r.partition} {r.start}..{r.end}"
            + ("" if r.origin == "timestamp" else f" ({r.origin})")
            for r in self.ranges
        )
        return f"replay {self.day} from {self.topic}: {parts}"

    def summary_line(self) -> str:
        outcome = self.outcome
        assert outcome is not None, "the replace has not run"
        counts = (
            f"{outcome.count('added')} added, {outcome.count('removed')} removed,"
            f" {outcome.count('changed')} changed"
        )
        reads = (
            f"{self.records_read} records read, {self.unique} unique events of {self.day},"
            f" {self.duplicates} duplicates, {sum(self.invalid.values())} invalid"
        )
        if self.dry_run:
            return (
                f"dry run {self.day}: would change {outcome.corrections} usage_daily rows"
                f" ({counts}); {reads}; nothing written"
            )
        return (
            f"replay {self.day}: {outcome.summaries_written} usage_daily rows written"
            f" ({counts}, {outcome.rows} rows now); {reads}; {self.seconds:.1f} s"
        )

    def timing_line(self) -> str:
        """Where the time went (stderr): the read, then each step of the replace."""
        assert self.outcome is not None, "the replace has not run"
        steps = ", ".join(f"{step} {seconds:.2f}" for step, seconds in self.outcome.timings.items())
        replace = sum(self.outcome.timings.values())
        reads = ", ".join(f"{step} {seconds:.2f}" for step, seconds in self.read_timings.items())
        return (
            f"replay {self.day} timings: read {self.read_seconds:.2f} s ({reads}),"
            f" replace {replace:.2f} s ({steps})"
        )

    def change_lines(self, limit: int | None = None) -> list[str]:
        """The changes the outcome lists (the replace lists at most ``LIST_CHANGES`` in
        a real run), then how many more there are."""
        assert self.outcome is not None, "the replace has not run"
        changes = self.outcome.changes[:limit]
        lines = [_change_line(change) for change in changes]
        more = self.outcome.corrections - len(changes)
        if more > 0:
            lines.append(f"  ... and {more} more")
        return lines


_SHOWN = (
    ("requests", "requests"),
    ("tokens", "total_tokens"),
    ("raw_cost_nano", "raw_cost_nano"),
    ("markup_cost_nano", "markup_cost_nano"),
    ("markup_cost_pln_nano", "markup_cost_pln_nano"),
)
_OTHER = (
    "input_tokens",
    "output_tokens",
    "estimated_requests",
    "raw_cost_usd",
    "markup_cost_usd",
    "markup_cost_pln",
    "usd_pln_rate",
    "nbp_table_no",
)


def _change_line(change: RowChange) -> str:
    key = " / ".join(change.key)
    if change.kind == "changed":
        old, new = change.old, change.new
        values = ", ".join(
            f"{label} {getattr(old, name)} -> {getattr(new, name)}" for label, name in _SHOWN
        )
        also = [name for name in _OTHER if getattr(old, name) != getattr(new, name)]
        tail = f" (also {', '.join(also)})" if also else ""
        return f"  changed {key}: {values}{tail}"
    row = change.new if change.kind == "added" else change.old
    values = ", ".join(f"{label} {getattr(row, name)}" for label, name in _SHOWN)
    return f"  {change.kind} {key}: {values}"


async def run_replay(
    settings: Settings,
    day: date,
    from_offsets: Mapping[int, int] | None = None,
    dry_run: bool = False,
    stream: TextIO | None = None,
    allow_partial: bool = False,
) -> ReplayReport:
    """Read, deduplicate and replace ``day``. Raises the one-line errors the command maps:
    ``sqlite3.Error``/``OSError`` (summary DB), ``BrokerUnreachable``, ``ReplayReadError``,
    :class:`NoEventsForDate`. A failure after the DB opened is recorded in ``batch_runs``
    (``success`` 0) unless ``dry_run``."""
    import uuid

    from agents.replay.fences import append_fences, apply_up_to_fences
    from agents.replay.readers import ReaderProcesses, reader_groups
    from agents.replay.topic_slice import topic_partitions
    from agents.replay.worker_verdicts import conflict_losers
    from tables.summary_db.batch_apply import BatchApplier
    from tables.summary_db.reference import latest_model_prices, record_batch_run
    from tables.summary_db.replay_store import Lap, replace_day
    from tables.summary_db.schema import connect, utc_now_text

    started_at = utc_now_text()
    begin = time.monotonic()
    report = ReplayReport(day, settings.USAGE_TOPIC, dry_run)
    out = stream or sys.stderr
    # the readers start first: their start-up overlaps the checks and lookups below
    async with ReaderProcesses(settings.replay_readers, settings.summary_db_path.parent) as readers:
        conn = await connect(settings.summary_db_path)
        replay_id: str | None = None
        try:
            # fail before reading anything when the DB cannot take the write lock
            await conn.execute("BEGIN IMMEDIATE")
            await conn.execute("ROLLBACK")
            prices = await latest_model_prices(conn)
            try:
                lap = Lap(report.read_timings)
                # the partitions to deal out and, read meanwhile, the copies the workers
                # dead-lettered where copies of a request conflict
                partitions, losers = await asyncio.gather(
                    topic_partitions(settings, settings.USAGE_TOPIC),
                    conflict_losers(settings, day, from_offsets),
                )
                groups = reader_groups(partitions, readers.count)
                await readers.start(day, groups, len(partitions), from_offsets, prices, losers)
                report.ranges = list((await readers.ranges()).values())
                cut = [r.partition for r in report.ranges if r.cut]
                if cut and not allow_partial:
                    raise PartialRange(
                        f"replay of {day}: retention already deleted part of"
                        f" {settings.USAGE_TOPIC} partition"
                        f"{'s' if len(cut) > 1 else ''} {', '.join(map(str, cut))} where"
                        " the date's events may be: its bill would be partial; nothing"
                        " changed (--allow-partial replaces it with what remains)"
                    )
                if cut:
                    print(
                        f"replay {day}: partitions {', '.join(map(str, cut))} were cut by"
                        " retention: replacing the date with what remains (--allow-partial)",
                        file=out,
                    )
                lap("start")
                print(report.plan_line(), file=out, flush=True)
                progress = Progress(sum(r.size for r in report.ranges), f"replay {day}", stream)
                try:
                    read = await readers.read(progress.update)
                finally:
                    progress.close()
                lap("slices")
                report.counts = read.counts
                if read.counts.unique == 0:
                    invalid = sum(report.invalid.values())
                    raise NoEventsForDate(
                        f"no events of {day} in {settings.USAGE_TOPIC}"
                        f" ({report.records_read} records read, {invalid} invalid);"
                        " nothing changed"
                    )
                extra: dict[int, dict[str, tuple[int, int]]] = {}
                if not dry_run:
                    replay_id = f"{day}-{uuid.uuid4().hex[:12]}"
                    await _register(conn, replay_id, day.isoformat(), started_at)
                    applier = BatchApplier(settings.summary_db_path)
                    try:
                        heads = await asyncio.to_thread(applier.heads)
                        fences = await append_fences(
                            settings,
                            replay_id,
                            day.isoformat(),
                            heads,
                            read.usage_ends,
                            read.rerouted_ends,
                        )
                        await apply_up_to_fences(settings, applier, fences)
                    finally:
                        applier.close()
                    print(f"replay {day}: fenced and applied up to the fences", file=out)
                    lap("fences")
                    # what the workers had read past the replay's end snapshot
                    extra = {
                        p: {
                            settings.USAGE_TOPIC: (read.usage_ends[p], f.usage_end),
                            settings.rerouted_topic: (
                                read.rerouted_ends.get(p, 0),
                                f.rerouted_end,
                            ),
                        }
                        for p, f in fences.items()
                    }
                totals, counts = await readers.finish(extra)
                report.counts = counts
                lap("finish")
                rows = totals.rows(day.isoformat())
                del totals
                # the result goes to the replays topic while the replace works, and the
                # replace commits only once it is there (replace_day's before_commit)
                result = (
                    None
                    if replay_id is None
                    else publish_replay_result(
                        settings,
                        replay_id,
                        day.isoformat(),
                        {p: f.offset for p, f in fences.items()},
                        rows,
                        report.records_read,
                        started_at,
                    )
                )
                with collector_paused():
                    report.outcome = await replace_day(
                        conn,
                        rows,
                        day.isoformat(),
                        settings.USAGE_MARKUP_MULTIPLIER,
                        dry_run=dry_run,
                        started_at=started_at,
                        records_processed=report.records_read,
                        replay_id=replay_id,
                        list_changes=None if dry_run else LIST_CHANGES,
                        before_commit=result,
                    )
            except Exception as error:
                if not dry_run:
                    try:
                        await record_batch_run(
                            conn,
                            "replay",
                            day,
                            started_at,
                            utc_now_text(),
                            False,
                            error=one_line(error),
                            records_processed=report.records_read,
                        )
                        if replay_id is not None:
                            await conn.execute(
                                "UPDATE replay_runs SET status = 'failed', finished_at = ?,"
                                " error = ? WHERE replay_id = ?",
                                (utc_now_text(), one_line(error), replay_id),
                            )
                    except (sqlite3.Error, OSError) as also:
                        log.warning("could not record the failed replay: %s", also)
                raise
        finally:
            await conn.close()
    report.seconds = time.monotonic() - begin
    return report


async def publish_replay_result(
    settings: Settings,
    replay_id: str,
    day: str,
    fences: Mapping[int, int],
    rows: Sequence[SummaryRow],
    records_processed: int,
    started_at: str,
) -> None:
    """The replay's result to the replays topic before the replace (streams/
    replay_results.py): a summary DB restored from a backup, or rebuilt, completes the
    replay from it when it meets the fences."""
    from aiokafka import AIOKafkaProducer

    from agents.replay.results import publish_result
    from streams.kafka.batch_log import SumRow
    from streams.kafka.broker import kafka_client_kwargs

    producer = AIOKafkaProducer(acks="all", **kafka_client_kwargs(settings))
    await producer.start()
    try:
        await publish_result(
            producer,
            settings.replays_topic,
            replay_id,
            day,
            fences,
            [SumRow(r.usage_date, r.client_org_id, r.user_id, r.model, *r[4:]) for r in rows],
            records_processed,
            started_at,
        )
    finally:
        await producer.stop()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No automatic garbage collection inside the block (as it was before, after it).

    Why: the replace builds several objects per row of the date (the rows, their values,
    the diff) that all live until it ends, so the young collections it triggers move
    them along and traverse them again and again: with 289k rows (``bench/run.py
    --workload many-keys``) they took ~0.9 s of its ~8 s of CPU. It is one transaction of
    a short command; what cycles it leaves are collected after it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


async def _register(conn: aiosqlite.Connection, replay_id: str, day: str, started_at: str) -> None:
    """The replay's row, before any fence exists: the writer waits for it to complete."""
    await conn.execute(
        "INSERT INTO replay_runs (replay_id, usage_date, status, started_at)"
        " VALUES (?, ?, 'fencing', ?)",
        (replay_id, day, started_at),
    )


HELP = """Re-aggregate one date from the topic and replace its rows.

The usage date's rows are replaced atomically; the live consumer group is not
disturbed.

\b
Example:
  usage-stream replay --date 2026-11-20 --dry-run
  usage-stream replay --date 2026-11-20
"""

#: The command's options, shared by the standalone entry below and Faust's CLI
#: (agents/replay/command.py, so ``usage-stream --help`` lists the command).
OPTIONS = (
    click.option(
        "--date",
        "day",
        default=None,
        show_default=True,
        help="usage date YYYY-MM-DD (BUSINESS_TIMEZONE)",
    ),
    click.option(
        "--from-offsets",
        "from_offsets",
        default=None,
        show_default=True,
        help="start offsets P:O[,P:O...] for the named partitions (others: by timestamp)",
    ),
    click.option(
        "--dry-run/--no-dry-run",
        "dry_run",
        default=False,
        show_default=True,
        help="print what would change, write nothing",
    ),
    click.option(
        "--allow-partial",
        "allow_partial",
        is_flag=True,
        default=False,
        help="replace the date even when retention already deleted part of its range",
    ),
)


def run_direct(command: Callable[[], Awaitable[None]]) -> NoReturn:
    """Run the command's coroutine with ``asyncio.run``, not inside a mode Worker.

    Why: a replay is a short batch command timed as a whole, and the Worker's shutdown
    alone costs more than a second however little the command did (mode's
    ``Worker._shutdown_loop`` waits on a fixed one-second sentinel sleep, plus up to a
    second gathering tasks). The replay starts no Faust service, so nothing the Worker
    runs is needed. Ctrl-C cancels the command's task (``asyncio.run``) and SIGTERM is
    made to do the same, so the staging directory and connections are closed on either
    as they were under the Worker; ``fail()``'s ``SystemExit`` sets the exit status.
    """

    async def main() -> None:
        with sigterm_cancels_this_task():
            await command()

    try:
        asyncio.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        fail("interrupted; nothing changed unless the replace had committed", 130)
    raise SystemExit(0)


def _with_options(command: Callable[..., object]) -> Callable[..., object]:
    for decorate in reversed(OPTIONS):
        command = decorate(command)
    return command


@click.command(name="replay", help=HELP)
@_with_options
def standalone(
    day: str | None, from_offsets: str | None, dry_run: bool, allow_partial: bool
) -> NoReturn:
    """``usage-stream replay`` without Faust's CLI (agents/main.py runs it): importing
    Faust and its CLI took ~0.6 s of the command's ~10 s, for nothing the replay uses."""
    run_direct(lambda: command(day, from_offsets, dry_run, allow_partial))


async def command(
    day: str | None, from_offsets: str | None, dry_run: bool, allow_partial: bool = False
) -> None:
    """The command (:data:`HELP`): parse the options, run, print the report."""
    from agents.replay.topic_slice import ReplayReadError, parse_from_offsets
    from streams.gc_tuning import tune_for_batches
    from streams.kafka.broker import BrokerUnreachable

    try:
        usage_day = parse_date(day)
        starts = parse_from_offsets(from_offsets) if from_offsets is not None else None
    except ValueError as error:
        fail(str(error))
    # aiokafka logs every failed connection attempt; the one line below is the answer
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    tune_for_batches()
    settings = get_settings()
    try:
        report = await run_replay(settings, usage_day, starts, dry_run, allow_partial=allow_partial)
    except (BrokerUnreachable, ReplayReadError, NoEventsForDate, PartialRange) as error:
        fail(one_line(error))
    except (sqlite3.Error, OSError) as error:
        fail(f"summary DB {settings.summary_db_path}: {one_line(error)}")
    print(report.summary_line())
    print(report.timing_line(), file=sys.stderr)
    for line in report.change_lines(None if dry_run else LIST_CHANGES):
        print(line)
