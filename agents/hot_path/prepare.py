"""Stages 1-4 of the hot path: the records of one batch into a :class:`PreparedBatch`.

Pure: CPU only, no broker, no Faust app. What the stages decide to send (dead letters,
reroutes) is recorded in the batch; the service starts those sends
(:class:`agents.hot_path.committer.InFlight`) and the committer awaits them.

1. **validate** (:func:`validate`): every record's verdict (``parse_records``: the same
   at every read, the future bounded by the record's own timestamp); the positions read;
   invalid records counted by reason and kept for the dead-letter topic;
2. **route** (:func:`route`): valid events grouped by home partition
   (:mod:`streams.model.partitioning`); those read away from home are kept for the
   rerouted topic, partition home, and counted there, by the home's owner;
3. **dedupe** (:func:`dedupe`): per home partition, against its seen set and the batch
   still being committed (:mod:`agents.hot_path.dedupe`): duplicates counted, conflicting
   copies kept for the dead-letter topic, the new requests' keys kept for the append;
4. **aggregate** (:func:`aggregate`): the new requests' exact sums per (usage date, key),
   unless a replay's fence says the replay counted them, and their raw points' lines;
   then each home partition's positions and record marks (:func:`read_positions`).

:class:`Preparer` runs them in this order. Each stage takes ~0.1-0.4 s on a full batch,
and meanwhile the previous batch's commit, the fetcher and the producer move on only when
the event loop runs; so :meth:`Preparer.stages` pauses between stages (a generator the
service drives with ``await asyncio.sleep(0)``), and since a rebalance may come in a pause,
every stage asks again whether a partition is still owned as when the batch was read
(:func:`still_owned`): a batch never appends for a partition revoked or rebuilt meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from aiokafka import ConsumerRecord

from agents.hot_path.batch import PreparedBatch, Reroute, Topics
from agents.hot_path.dedupe import NO_FENCE, judge, ranks
from agents.hot_path.home_partition import HomePartition
from streams.kafka.batch_log import record_mark
from streams.model.business_time import UsageDates
from streams.model.event import CONFLICT, InvalidEvent, UsageEvent, parse_records
from streams.model.fingerprint import conflict
from streams.model.money import NanoScaler
from streams.model.partitioning import home_partitions
from streams.model.pricing import Price, bill
from streams.sinks.lineprotocol import line
from tables.dedupe.seen_requests import Keys

__all__ = [
    "HomeStates",
    "Preparer",
    "Valid",
    "aggregate",
    "dedupe",
    "in_flight_keys",
    "read_positions",
    "route",
    "still_owned",
    "validate",
]

#: a valid event with the record it was read from
Valid = tuple[ConsumerRecord, UsageEvent]


class HomeStates(Protocol):
    """What the stages read of this worker's home partitions
    (:class:`agents.hot_path.ownership.Ownership`), live: it may change between stages."""

    @property
    def partitions(self) -> int:
        """Of the usage topic (= of the rerouted topic and the batch log)."""
        ...

    @property
    def owned(self) -> Set[int]:
        """Home partitions rebuilt and read by this worker."""
        ...

    @property
    def states(self) -> Mapping[int, HomePartition]: ...

    @property
    def epochs(self) -> Mapping[int, int]:
        """Per home partition, bumped whenever its ownership or state is renewed."""
        ...


def still_owned(homes: HomeStates, batch: PreparedBatch, partition: int) -> bool:
    """Whether ``partition`` is owned, with its state, as when ``batch`` was read."""
    return (
        partition in homes.owned
        and partition in homes.states
        and batch.epochs.get(partition) == homes.epochs.get(partition)
    )


def validate(
    batch: PreparedBatch,
    records: Sequence[ConsumerRecord],
    parsed: Sequence[UsageEvent | InvalidEvent],
) -> list[Valid]:
    """Stage 1 (``parsed``: ``parse_records(records)``): the next offset read and its
    record per topic partition, the invalid records counted by reason and kept as dead
    letters; returns the valid events, in order."""
    valid: list[Valid] = []
    offsets, last, invalid, dead_letters = batch.offsets, batch.last, batch.invalid, []
    for record, event in zip(records, parsed, strict=True):
        key = (record.topic, record.partition)
        if record.offset + 1 > offsets.get(key, -1):
            offsets[key] = record.offset + 1
            last[key] = record
        if isinstance(event, InvalidEvent):
            invalid[event.reason] = invalid.get(event.reason, 0) + 1
            dead_letters.append((record, event))
        else:
            valid.append((record, event))
    batch.dead_letters += dead_letters
    return valid


def route(
    batch: PreparedBatch, valid: Sequence[Valid], rerouted_topic: str, partitions: int
) -> dict[int, list[Valid]]:
    """Stage 2: the valid events read at home, by home partition; the others kept as
    reroutes. A rerouted record is at home by construction (it was produced there)."""
    at_home = [record.topic == rerouted_topic for record, _ in valid]
    away = [i for i, home in enumerate(at_home) if not home]
    homes = home_partitions([valid[i][1].request_id for i in away], partitions)
    for i, home in zip(away, homes, strict=True):
        record, event = valid[i]
        at_home[i] = home == record.partition
        if not at_home[i]:
            batch.reroutes.append(Reroute(record, event.request_id, home))
    by_home: dict[int, list[Valid]] = {}
    for pair, here in zip(valid, at_home, strict=True):
        if here:
            partition = pair[0].partition
            pairs = by_home.get(partition)
            if pairs is None:
                pairs = by_home[partition] = []
            pairs.append(pair)
    return by_home


def in_flight_keys(
    in_flight: PreparedBatch | None, partition: int, epochs: Mapping[int, int]
) -> list[Keys]:
    """The new ids of the batch being committed, which count as seen (unless a catch-up
    voided that batch: it will not be appended, so its ids are not seen)."""
    if in_flight is not None:
        pending = in_flight.homes.get(partition)
        if (
            pending is not None
            and pending.new is not None
            and pending.epoch == epochs.get(partition)
        ):
            return [pending.new]
    return []


def dedupe(
    batch: PreparedBatch,
    pairs: Sequence[Valid],
    state: HomePartition,
    rerouted_topic: str,
    also: Sequence[Keys] = (),
) -> list[Valid]:
    """Stage 3 for one home partition (:func:`agents.hot_path.dedupe.judge`, ``also``: the
    keys of the batch being committed): count the duplicates, keep the conflicting copies
    as dead letters, and return the new requests' first copies. Their keys go with the
    batch, into the state only when its record is appended."""
    home = batch.home(state.partition)
    events = [event for _, event in pairs]
    newest = max(event.event_ms for event in events)
    if newest > home.newest_event_ms:
        home.newest_event_ms = newest
    rerouted = np.fromiter(
        (record.topic == rerouted_topic for record, _ in pairs), bool, len(pairs)
    )
    offsets = np.fromiter((record.offset for record, _ in pairs), np.int64, len(pairs))
    bounds = state.bounds() or (NO_FENCE, NO_FENCE)
    rank = ranks(np.zeros(len(pairs), dtype=np.int64), rerouted, offsets, bounds)
    verdicts = judge(events, rank, state.seen, also)
    batch.known += verdicts.duplicates
    if len(verdicts.conflicts):
        batch.invalid[CONFLICT] = batch.invalid.get(CONFLICT, 0) + len(verdicts.conflicts)
        for index, first_fp in zip(
            verdicts.conflicts.tolist(), verdicts.first_fps.tolist(), strict=True
        ):
            record, event = pairs[index]
            batch.dead_letters.append((record, conflict(event, first_fp)))
    home.new = verdicts.new_keys.sorted()  # a run: searched by the next batch
    return [pairs[i] for i in verdicts.new.tolist()]


def aggregate(
    batch: PreparedBatch,
    new: Sequence[Valid],
    states: Mapping[int, HomePartition],
    rerouted_topic: str,
    prices: Mapping[str, Price],
    dates: UsageDates,
    markup: NanoScaler,
) -> list[str]:
    """Stage 4: the new requests into their home partitions' sums (unless a replay's
    fence says the replay counted one); returns their raw points' lines. One loop, no
    object per event: this is most of the hot path's own time. The home partitions'
    parts were made by :func:`dedupe`."""
    lines = []
    for record, event in new:
        day, _, cost, estimated = bill(event, prices, dates)
        lines.append(
            line(
                event.request_id,
                event.client_org_id,
                event.user_id,
                event.model,
                event.input_tokens,
                event.output_tokens,
                cost,
                markup(cost),
                event.event_ms,
            )
        )
        home = batch.homes[record.partition]
        state = states[record.partition]
        if state.fences and state.fenced(day, record.topic == rerouted_topic, record.offset):
            continue
        sum_key = (day, event.client_org_id, event.user_id, event.model)
        total = home.sums.get(sum_key)
        if total is None:
            total = home.sums[sum_key] = [0, 0, 0, 0, 0]
        total[0] += event.input_tokens
        total[1] += event.output_tokens
        total[2] += 1
        total[3] += estimated
        total[4] += cost
    return lines


def read_positions(batch: PreparedBatch, homes: HomeStates, usage_topic: str) -> None:
    """Each still-owned home partition's positions read up to, with the mark of the
    record before each (what its batch-log record claims as read)."""
    for (topic, partition), next_offset in batch.offsets.items():
        if still_owned(homes, batch, partition):
            home = batch.home(partition)
            mark = record_mark(batch.last[(topic, partition)])
            if topic == usage_topic:
                home.usage_next, home.usage_mark = next_offset, mark
            else:
                home.rerouted_next, home.rerouted_mark = next_offset, mark


@dataclass(slots=True)
class Preparer:
    """Runs stages 1-4 (module docstring) over the partitions ``homes`` tells."""

    topics: Topics
    homes: HomeStates
    dates: UsageDates
    markup: NanoScaler
    #: the model prices estimated costs use, read once per batch
    #: (:class:`agents.prices_feed.PricesFeed`)
    prices: Callable[[], Mapping[str, Price]]

    def stages(
        self, records: Sequence[ConsumerRecord], in_flight: PreparedBatch | None = None
    ) -> Iterator[PreparedBatch]:
        """The stages over ``records``, yielding the batch at each pause (three: after
        decoding, after routing, after dedupe; the caller lets the event loop run and
        starts the sends found so far). ``in_flight``: the batch being committed."""
        topics, homes = self.topics, self.homes
        batch = PreparedBatch(sum(1 for record in records if record.topic == topics.usage))
        parsed = parse_records(records)
        yield batch
        batch.epochs = {p: homes.epochs.get(p, 0) for p in homes.owned}
        valid = validate(batch, records, parsed)
        by_home = route(batch, valid, topics.rerouted, homes.partitions)
        yield batch
        new: list[Valid] = []
        for partition, pairs in by_home.items():
            if still_owned(homes, batch, partition):  # (a rebalance may have come meanwhile)
                state = homes.states[partition]
                also = in_flight_keys(in_flight, partition, homes.epochs)
                new += dedupe(batch, pairs, state, topics.rerouted, also)
        yield batch
        new = [pair for pair in new if still_owned(homes, batch, pair[0].partition)]
        batch.lines = aggregate(
            batch, new, homes.states, topics.rerouted, self.prices(), self.dates, self.markup
        )
        read_positions(batch, homes, topics.usage)

    def prepare(
        self, records: Sequence[ConsumerRecord], in_flight: PreparedBatch | None = None
    ) -> PreparedBatch:
        """All the stages straight through, without pauses."""
        steps = self.stages(records, in_flight)
        batch = next(steps)  # the same batch at every pause
        for _ in steps:
            pass
        return batch
