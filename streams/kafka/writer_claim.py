"""One summary writer per batch log: a claim every writer can read on Kafka.

``SUMMARY_WRITER`` defaults to true, so a second writer is one forgotten setting away: a
second deployment of the worker would bill the same log into another DB, run the rollup
and the refresh twice, and publish prices twice. So a writer *claims* the log before it
opens its work: it appends a :class:`ClaimRecord` to ``<APP_ID>-writer`` (one partition)
and reads the topic to its end; every reader replays the same records through
:class:`ClaimState` and agrees on the owner, without locks or a group:

* ``claim`` by X makes X the owner when there is none, or the owner's last word is older
  than :data:`EXPIRY_SECONDS` (it died without releasing), or X is the owner already (a
  restart: the same ``WORKER_ID`` with the same summary DB);
* ``heartbeat`` by the owner (every :data:`HEARTBEAT_SECONDS`) keeps it (and claims
  like ``claim`` when there is no live owner);
* ``release`` by the owner (a clean stop) ends it.

A writer that is not the owner after its claim refuses to start with one line naming
the owner. A running writer whose heartbeat finds another owner (it was frozen past the
expiry and another writer took over) stops applying and says so on ``/ready``. Time is
the records' own Kafka timestamps, so every reader judges alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streams.kafka.log_reads import read_range

__all__ = [
    "EXPIRY_SECONDS",
    "HEARTBEAT_SECONDS",
    "ClaimRecord",
    "ClaimState",
    "Claimant",
    "append_claim",
    "read_claims",
]

HEARTBEAT_SECONDS = 5.0
EXPIRY_SECONDS = 30.0


class ClaimRecord(msgspec.Struct, frozen=True):
    kind: Literal["claim", "heartbeat", "release"]
    claimant: str  # WORKER_ID:summary DB id
    worker_id: str
    pid: int


@dataclass(frozen=True, slots=True)
class Claimant:
    worker_id: str
    db_id: str
    pid: int

    @property
    def key(self) -> str:
        return f"{self.worker_id}:{self.db_id}"


@dataclass(slots=True)
class ClaimState:
    """The owner as the records up to here say (module docstring)."""

    owner: ClaimRecord | None = None
    last_seen_ms: int = -1  # timestamp of the owner's last record

    def apply(self, record: ClaimRecord, timestamp_ms: int) -> None:
        owner = self.owner
        expired = owner is None or timestamp_ms - self.last_seen_ms > EXPIRY_SECONDS * 1000
        mine = owner is not None and owner.claimant == record.claimant
        if record.kind == "claim" and (expired or mine):
            self.owner, self.last_seen_ms = record, timestamp_ms
        elif record.kind == "heartbeat" and (mine or expired):
            # (a heartbeat with no live owner claims: the claim itself may have aged out
            # of the topic's retention while its heartbeats did not)
            self.owner, self.last_seen_ms = record, timestamp_ms
        elif record.kind == "release" and mine:
            self.owner, self.last_seen_ms = None, timestamp_ms

    def live_owner(self, now_ms: int) -> ClaimRecord | None:
        if self.owner is None or now_ms - self.last_seen_ms > EXPIRY_SECONDS * 1000:
            return None
        return self.owner


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(ClaimRecord)


async def append_claim(
    producer: AIOKafkaProducer, topic: str, kind: str, claimant: Claimant
) -> int:
    """Append one record; returns its Kafka timestamp (ms)."""
    record = ClaimRecord(kind, claimant.key, claimant.worker_id, claimant.pid)  # type: ignore[arg-type]
    sent = await producer.send_and_wait(topic, _ENCODER.encode(record), partition=0)
    return int(sent.timestamp)


async def read_claims(consumer: AIOKafkaConsumer, topic: str, state: ClaimState, start: int) -> int:
    """Apply the records from ``start`` to the end to ``state``; returns the next offset."""
    position = start
    async for records in read_range(consumer, TopicPartition(topic, 0), start, None):
        for record in records:
            position = record.offset + 1
            try:
                decoded = _DECODER.decode(record.value or b"")
            except msgspec.DecodeError:
                continue
            state.apply(decoded, record.timestamp)
    return position
