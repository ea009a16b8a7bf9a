"""The batch log: one chain of records per home partition, the commit point of the
scale-out hot path and the way its aggregates reach the summary writer (issue 9).

Topic ``<APP_ID>-batch-log``, as many partitions as the usage topic. Per batch and home
partition p the worker that owns p appends a :class:`BatchEntry` to partition p: the
positions it has read up to in the usage topic and the rerouted topic (partition p of
both), the batch's exact sums per (usage date, summary key), and the partition's newest
event time (its watermark). A replay appends a :class:`Fence`.

**The chain rule.** Every record names ``prev``, the offset of the record it extends (-1
for the first). A record is *valid* when ``prev`` is the offset of the last valid record
of the partition; nothing else counts. Everyone applies the same rule over the same log,
so everyone agrees on the chain without transactions or locks:

* the summary writer adds the sums of valid entries only (and stores the head with them);
* a worker that is assigned p follows the chain to its head to learn where to read from;
* a worker that lost p without knowing (a zombie) and appends anyway names a ``prev``
  that is no longer the head: its record is not in the chain, and the owner's is;
* the appending worker checks the offset its record got: anything but ``prev + 1`` means
  another record came first, so it must follow the chain again before going on.

**Records fit Apache Kafka's defaults.** A record may not exceed :data:`MAX_RECORD_BYTES`
(Apache Kafka refuses records over ``max.message.bytes``, 1,048,588 B by default, and the
test broker would take them silently). A batch whose sums do not fit (a backlog with
hundreds of thousands of keys) is appended as :class:`BatchPart` records holding its rows
(:func:`encode_parts`), then the entry naming their offsets in ``parts``. Parts are not
links of the chain: they count only through the entry that names them, so a split batch
is applied whole or not at all (a worker that dies between its parts and its entry leaves
parts nobody names, which the writer drops once a later entry is valid).

Records are msgspec structs encoded as JSON (tagged union), small and self-describing.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

import msgspec

from streams.model.event import KafkaRecord

__all__ = [
    "AnyLogRecord",
    "MAX_RECORD_BYTES",
    "BadChainRecord",
    "BatchEntry",
    "BatchPart",
    "Chain",
    "ChainHead",
    "ChainRecord",
    "Fence",
    "LogRecord",
    "RawLogRecord",
    "SumRow",
    "decode",
    "decode_rows_raw",
    "encode",
    "encode_parts",
    "record_mark",
]


class SumRow(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """A batch's exact increments of one ``usage_daily`` key (a usage date and a summary
    key), before markup and conversion (the writer applies those)."""

    usage_date: str
    client_org_id: str
    user_id: str
    model: str
    input_tokens: int
    output_tokens: int
    requests: int
    estimated_requests: int
    raw_cost_nano: int


Rows = TypeVar("Rows")


class BatchEntry(msgspec.Struct, Generic[Rows], tag="batch", frozen=True):
    """One batch of one home partition: read ``[usage_from, usage_next)`` of the usage
    topic and ``[rerouted_from, rerouted_next)`` of the rerouted topic (partition p).

    ``rows`` is a ``list[SumRow]`` everywhere but in the summary writer, which decodes
    them as ``msgspec.Raw`` (their JSON text) and lets SQLite fold them
    (:func:`decode_rows_raw`): generic so both are the same record."""

    prev: int
    usage_from: int
    usage_next: int
    rerouted_from: int
    rerouted_next: int
    newest_event_ms: int  # the partition's event-time watermark after the batch, -1 none
    rows: Rows
    worker: str = ""  # who appended it (host/pid), for operators
    behind: bool = False  # the batch was full: the worker is catching up on a backlog
    #: :func:`record_mark` of the last record read in the usage / rerouted partition (at
    #: ``usage_next - 1`` / ``rerouted_next - 1``): ties the positions to the topic they
    #: were read in, so a recreated topic is never mistaken for the one read ("" unknown)
    usage_mark: str = ""
    rerouted_mark: str = ""
    #: offsets (in this partition, between ``prev`` and the entry) of the
    #: :class:`BatchPart` records holding the rest of its rows
    parts: list[int] = msgspec.field(default_factory=list)


class BatchPart(msgspec.Struct, Generic[Rows], tag="part", frozen=True):
    """Rows of a batch too large for one record: they count when the :class:`BatchEntry`
    that names this record's offset in ``parts`` is valid, and never otherwise."""

    rows: Rows
    worker: str = ""


class Fence(msgspec.Struct, tag="fence", frozen=True):
    """A replay of ``usage_date`` read this partition up to these offsets: the date's
    events below them are the replay's (see the README's scale-out design)."""

    prev: int
    replay_id: str
    usage_date: str
    usage_end: int
    rerouted_end: int


#: anything the batch log holds, as :func:`decode` returns it
LogRecord = BatchEntry[list[SumRow]] | Fence | BatchPart[list[SumRow]]
#: the same with the rows as their JSON text, as :func:`decode_rows_raw` returns it
RawLogRecord = BatchEntry[msgspec.Raw] | Fence | BatchPart[msgspec.Raw]
ChainRecord = BatchEntry[msgspec.Raw] | Fence  # the links of a chain, as followed
#: either: the chain rule and the summary writer's apply take rows decoded or as text
AnyLogRecord = LogRecord | RawLogRecord

#: The largest record the pipeline appends to the batch log: under Apache Kafka's default
#: ``max.message.bytes`` (1,048,588 B, which also covers the record batch's own ~70 B of
#: overhead), with room to spare.
MAX_RECORD_BYTES = 1_000_000

_ENCODER = msgspec.json.Encoder()
_DECODER: msgspec.json.Decoder[LogRecord] = msgspec.json.Decoder(LogRecord)
_RAW_ROWS_DECODER: msgspec.json.Decoder[RawLogRecord] = msgspec.json.Decoder(RawLogRecord)


class BadChainRecord(ValueError):
    """Bytes in the batch log that are not a chain record (never written by this code)."""


def encode(record: BatchEntry[Rows] | Fence | BatchPart[Rows]) -> bytes:
    """Any record, its rows as given (the hot path's are plain tuples: ``SumRow`` is
    ``array_like``, so both encode the same)."""
    return _ENCODER.encode(record)


def encode_parts(rows: Sequence[object], worker: str, limit: int = MAX_RECORD_BYTES) -> list[bytes]:
    """``rows`` as encoded :class:`BatchPart` records of at most ``limit`` bytes each,
    in order. Rows are split evenly by count first (one encoding of the whole to size
    it), and a part that still does not fit is halved again."""
    whole = len(_ENCODER.encode(rows))
    pieces = max(1, -(-whole // (limit * 9 // 10)))
    size = -(-len(rows) // pieces)
    encoded: list[bytes] = []
    pending = [rows[start : start + size] for start in range(0, len(rows), size)]
    while pending:
        chunk = pending.pop(0)
        record = _ENCODER.encode(BatchPart(list(chunk), worker))
        if len(record) <= limit:
            encoded.append(record)
        elif len(chunk) > 1:
            half = len(chunk) // 2
            pending[:0] = [chunk[:half], chunk[half:]]
        else:
            raise ValueError(f"one batch-log row is {len(record)} bytes, over {limit}")
    return encoded


def decode(value: bytes | None) -> LogRecord:
    try:
        return _DECODER.decode(value or b"")
    except msgspec.DecodeError as error:
        raise BadChainRecord(str(error)) from None


def decode_rows_raw(value: bytes | None) -> RawLogRecord:
    """Like :func:`decode`, but an entry's ``rows`` stay JSON text (``msgspec.Raw``): the
    summary writer hands them to SQLite as they are, so no Python object is built per
    row (tables/summary_db/summary_keys.py). The rows are checked there, not here."""
    try:
        return _RAW_ROWS_DECODER.decode(value or b"")
    except msgspec.DecodeError as error:
        raise BadChainRecord(str(error)) from None


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The last valid record of a partition's chain and the read positions it leaves."""

    offset: int = -1  # -1: no valid record yet
    usage_next: int = 0
    rerouted_next: int = 0
    newest_event_ms: int = -1
    usage_mark: str = ""  # record_mark() at usage_next - 1 ("" unknown)
    rerouted_mark: str = ""


def record_mark(record: KafkaRecord) -> str:
    """A fingerprint of one Kafka record: its timestamp and the CRC-32 of its value.

    A Kafka record never changes at its offset, so the mark of the record just before a
    stored position tells whether a topic is still the one that position was read in:
    a recreated topic (a new broker, a deleted and re-made topic) holds another record
    there, or none. Positions are checked this way wherever they are trusted again
    (the summary writer's place in the batch log, a chain head's usage positions)."""
    return f"{record.timestamp}:{zlib.crc32(record.value or b''):08x}"


class Chain:
    """Follows one partition's batch log record by record (the chain rule above)."""

    def __init__(self, head: ChainHead | None = None) -> None:
        self.head = head or ChainHead()

    def accept(self, offset: int, record: AnyLogRecord) -> bool:
        """True (and the head moves) when the record at ``offset`` is a valid link (a
        :class:`BatchPart` never is one)."""
        if isinstance(record, BatchPart):
            return False
        if record.prev != self.head.offset or offset <= self.head.offset:
            return False
        if isinstance(record, BatchEntry):
            self.head = ChainHead(
                offset,
                record.usage_next,
                record.rerouted_next,
                max(self.head.newest_event_ms, record.newest_event_ms),
                record.usage_mark,
                record.rerouted_mark,
            )
        else:  # a fence moves the head, not the positions
            self.head = replace(self.head, offset=offset)
        return True
