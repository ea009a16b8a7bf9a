"""Reading a home partition's ids back into its seen set, in the order the chain
consumed them (the id-reading half of :class:`agents.hot_path.home_state.Rebuilder`).

Which copy of a request was billed, and so which fingerprint the seen set keeps, depends
on the order the hot path met the copies: batch by batch along the chain, and inside a
batch by :func:`agents.hot_path.dedupe.ranks`. The chain tells each batch's positions, so the
rebuild reads the usage and rerouted partitions in windows of whole batches, ranks every
home event by (its batch, the replay-fence bounds open when that batch was prepared,
topic, offset), and keeps each id's first copy: the same verdicts as the live path.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import numpy as np
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from agents.hot_path.dedupe import NO_FENCE, ranks
from streams.kafka.batch_log import BatchEntry, ChainRecord, Fence
from streams.kafka.log_reads import read_range
from streams.model.event import UsageEvent, parse_records
from streams.model.fingerprint import billing_fingerprints
from streams.model.partitioning import home_partitions
from tables.dedupe.seen_requests import Keys, SeenRequests

__all__ = ["WINDOW_RECORDS", "ChainBatches", "HomeTopics", "read_home_ids"]

#: Records (usage + rerouted) read and ranked at once: ~200 B of Python objects each.
WINDOW_RECORDS = 200_000


@dataclass(frozen=True, slots=True)
class HomeTopics:
    usage: str
    rerouted: str
    partitions: int  # of the usage topic: where each request's home is


class ChainBatches:
    """The chain's batches after given positions, collected while the chain is followed
    (``follow_chain(on_link=...)``): where each ended in both topics, and the replay
    fence bounds open when it was prepared (as :meth:`HomePartition.bounds` saw them)."""

    def __init__(
        self, fences: dict[str, tuple[int, int]], usage_from: int, rerouted_from: int
    ) -> None:
        self.fences = dict(fences)  # usage_date -> (usage_end, rerouted_end)
        self.usage_from, self.rerouted_from = usage_from, rerouted_from
        self.usage_ends, self.rerouted_ends = array("q"), array("q")
        self.usage_bounds, self.rerouted_bounds = array("q"), array("q")

    def __len__(self) -> int:
        return len(self.usage_ends)

    def __call__(self, link: ChainRecord) -> None:
        if isinstance(link, Fence):
            self.fences[link.usage_date] = (link.usage_end, link.rerouted_end)
            return
        assert isinstance(link, BatchEntry)
        if link.usage_next <= self.usage_from and link.rerouted_next <= self.rerouted_from:
            return  # wholly before what is read
        open_fences = [
            ends
            for ends in self.fences.values()
            if link.usage_from < ends[0] or link.rerouted_from < ends[1]
        ]
        self.usage_ends.append(link.usage_next)
        self.rerouted_ends.append(link.rerouted_next)
        self.usage_bounds.append(max((e[0] for e in open_fences), default=NO_FENCE))
        self.rerouted_bounds.append(max((e[1] for e in open_fences), default=NO_FENCE))

    def windows(self, usage_end: int, rerouted_end: int) -> list[tuple[int, int]]:
        """``[first, last)`` batch indices of each window of about
        :data:`WINDOW_RECORDS` records (whole batches)."""
        if not len(self):
            return []
        result, first = [], 0
        usage_at, rerouted_at = self.usage_from, self.rerouted_from
        for i, (u, r) in enumerate(zip(self.usage_ends, self.rerouted_ends, strict=True)):
            u, r = min(u, usage_end), min(r, rerouted_end)
            if (u - usage_at) + (r - rerouted_at) >= WINDOW_RECORDS or i == len(self) - 1:
                result.append((first, i + 1))
                first, usage_at, rerouted_at = i + 1, u, r
        return result


def _home_events(
    records: list[ConsumerRecord], partition: int, rerouted: bool, partitions: int
) -> list[tuple[int, UsageEvent]]:
    """``(offset, event)`` of the valid events homed at ``partition`` (usage partition p:
    events at home only; rerouted partition p: all)."""
    events = [
        (record.offset, event)
        for record, event in zip(records, parse_records(records), strict=True)
        if type(event) is UsageEvent
    ]
    if rerouted:
        return events
    homes = home_partitions([event.request_id for _, event in events], partitions)
    return [pair for pair, home in zip(events, homes, strict=True) if home == partition]


async def read_home_ids(
    consumer: AIOKafkaConsumer,
    topics: HomeTopics,
    partition: int,
    batches: ChainBatches,
    usage_end: int,
    rerouted_end: int,
    seen: SeenRequests,
    recorded_ms: int,
) -> int:
    """Add to ``seen`` the first copy of every home event in ``[usage_from, usage_end)``
    and ``[rerouted_from, rerouted_end)`` not tracked yet, in the chain's order; returns
    how many ids were added."""
    added = 0
    usage_at, rerouted_at = batches.usage_from, batches.rerouted_from
    ends = (np.asarray(batches.usage_ends), np.asarray(batches.rerouted_ends))
    bounds = (np.asarray(batches.usage_bounds), np.asarray(batches.rerouted_bounds))
    for first, last in batches.windows(usage_end, rerouted_end):
        upto = (
            min(int(ends[0][last - 1]), usage_end),
            min(int(ends[1][last - 1]), rerouted_end),
        )
        found: list[tuple[int, UsageEvent]] = []
        flags: list[np.ndarray] = []
        for rerouted, topic, start in (
            (False, topics.usage, usage_at),
            (True, topics.rerouted, rerouted_at),
        ):
            end = upto[rerouted]
            if end <= start:
                continue
            async for records in read_range(consumer, TopicPartition(topic, partition), start, end):
                pairs = _home_events(records, partition, rerouted, topics.partitions)
                found += pairs
                flags.append(np.full(len(pairs), rerouted))
        usage_at, rerouted_at = max(usage_at, upto[0]), max(rerouted_at, upto[1])
        if not found:
            continue
        rerouted_flags = np.concatenate(flags)
        offsets = np.fromiter((offset for offset, _ in found), np.int64, len(found))
        # each record's batch: the first whose end (in its topic) is past its offset
        batch = np.where(
            rerouted_flags,
            np.searchsorted(ends[1][first:last], offsets, side="right"),
            np.searchsorted(ends[0][first:last], offsets, side="right"),
        )
        batch = np.minimum(batch, last - first - 1)
        at = first + batch
        rank = ranks(batch, rerouted_flags, offsets, (bounds[0][at], bounds[1][at]))
        order = np.argsort(rank, kind="stable")
        events = [found[i][1] for i in order.tolist()]
        keys = Keys.of([event.request_id for event in events], billing_fingerprints(events))
        added += int(seen.add_first(keys, recorded_ms).sum())
    return added
