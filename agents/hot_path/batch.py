"""What a batch carries from one stage of the hot path to the next: plain records.

:mod:`agents.hot_path.prepare` fills a :class:`PreparedBatch` from the records read,
:mod:`agents.hot_path.committer` stores what it holds. Kept apart from both so that the
committer, the reader and the ownership name the same shapes without importing the
stages that make them (and so that a test builds one by hand).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiokafka import ConsumerRecord

from streams.model.event import InvalidEvent
from tables.dedupe.seen_requests import Keys

__all__ = ["HomeBatch", "PreparedBatch", "Reroute", "SumKey", "Topics"]

#: (usage date, client_org_id, user_id, model): the key of a batch's sums
SumKey = tuple[str, str, str, str]


@dataclass(frozen=True, slots=True)
class Topics:
    """The topics the hot path reads and writes (``streams.settings``'s names)."""

    usage: str  # USAGE_TOPIC
    rerouted: str  # APP_ID-rerouted: copies read away from home, partition = home
    batch_log: str  # APP_ID-batch-log: the commit point
    dlq: str  # usage-events-dlq


@dataclass(slots=True)
class HomeBatch:
    """What one batch brings to one home partition."""

    partition: int
    epoch: int  # the state's epoch when prepared: a resync in between voids it
    usage_next: int = -1  # next offset after the batch's usage records (-1: none read)
    rerouted_next: int = -1
    new: Keys | None = None  # the new requests' keys and fingerprints (agents/hot_path/dedupe.py)
    #: per key, [input_tokens, output_tokens, requests, estimated_requests, cost_nano]
    sums: dict[SumKey, list[int]] = field(default_factory=dict)
    newest_event_ms: int = -1
    usage_mark: str = ""  # record_mark of the last usage / rerouted record read
    rerouted_mark: str = ""
    appended: bool = False  # a retried commit must not append this partition's record again


@dataclass(frozen=True, slots=True)
class Reroute:
    """A valid event read away from its home partition: produced unchanged to the
    rerouted topic, partition ``home``, where its home's owner judges it."""

    record: ConsumerRecord
    request_id: str
    home: int


@dataclass(slots=True)
class PreparedBatch:
    """A batch after validation, routing, dedupe and aggregation: its raw points, dead
    letters and reroutes still to be stored by the committer."""

    records: int  # of the usage topic (rerouted copies were counted where they were read)
    homes: dict[int, HomeBatch] = field(default_factory=dict)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    last: dict[tuple[str, int], ConsumerRecord] = field(default_factory=dict)  # at offsets - 1
    invalid: dict[str, int] = field(default_factory=dict)  # reason -> count
    known: int = 0  # duplicates: identical copies inside the batch and of ids seen before
    full: bool = False
    lines: list[str] = field(default_factory=list)  # raw points still to store
    #: invalid records and conflicting copies, with their verdicts, in the order found
    dead_letters: list[tuple[ConsumerRecord, InvalidEvent]] = field(default_factory=list)
    reroutes: list[Reroute] = field(default_factory=list)
    #: each home partition's ownership epoch when the batch was read: a partition revoked
    #: (or rebuilt) while the batch is prepared is left out and its part never appended
    epochs: dict[int, int] = field(default_factory=dict)

    def home(self, partition: int) -> HomeBatch:
        """The batch's part for ``partition``, made on first use with the epoch the batch
        was read under (-1 when it was not owned then: such a part is never appended)."""
        home = self.homes.get(partition)
        if home is None:
            home = self.homes[partition] = HomeBatch(partition, self.epochs.get(partition, -1))
        return home
