"""The batch log's records and its chain rule (streams/kafka/batch_log.py)."""

from __future__ import annotations

import msgspec
import pytest

from streams.kafka.batch_log import (
    MAX_RECORD_BYTES,
    BadChainRecord,
    BatchEntry,
    BatchPart,
    Chain,
    ChainHead,
    Fence,
    SumRow,
    decode,
    encode,
    encode_parts,
    record_mark,
)

ROW = SumRow("2026-11-28", "org\x00a", "user", "model", 10, 20, 1, 0, 123_456_789_012)


def entry(prev: int, start: int, end: int, newest: int = 5) -> BatchEntry:
    return BatchEntry(prev, start, end, 0, 0, newest, [ROW], "host/1")


def test_round_trip_keeps_every_value_exactly() -> None:
    for record in (
        entry(-1, 0, 10),
        Fence(7, "replay-1", "2026-11-28", 100, 3),
        BatchEntry(3, 10, 10, 4, 9, -1, [], ""),
    ):
        assert decode(encode(record)) == record
    assert decode(encode(entry(-1, 0, 1))).rows[0].client_org_id == "org\x00a"  # NUL kept


@pytest.mark.parametrize("value", [None, b"", b"{}", b'{"type":"other"}', b"\xff", b"[1,2]"])
def test_anything_else_is_a_bad_record(value: bytes | None) -> None:
    with pytest.raises(BadChainRecord):
        decode(value)


def test_the_chain_keeps_the_first_record_extending_the_head() -> None:
    chain = Chain()
    assert chain.accept(0, entry(-1, 0, 10))
    # a zombie and the new owner both extend offset 0: the first one in the log wins
    assert chain.accept(1, entry(0, 10, 20, newest=9))
    assert not chain.accept(2, entry(0, 10, 15))  # the other: not part of the chain
    assert not chain.accept(3, entry(2, 15, 30))  # nor anything built on it
    assert chain.head == ChainHead(1, 20, 0, 9)
    # a fence moves the head but not the positions; records after it must name it
    assert chain.accept(4, Fence(1, "r", "2026-11-28", 25, 0))
    assert not chain.accept(5, entry(1, 20, 40))
    assert chain.accept(6, entry(4, 20, 40, newest=3))
    assert chain.head == ChainHead(6, 40, 0, 9)  # the watermark never goes back


def test_a_record_is_never_accepted_twice() -> None:
    chain = Chain()
    first = entry(-1, 0, 10)
    assert chain.accept(0, first)
    assert not chain.accept(0, first)  # redelivered
    assert chain.head.offset == 0


def test_following_from_a_checkpoint() -> None:
    chain = Chain(ChainHead(41, 500, 7, 1_000))
    assert not chain.accept(42, entry(40, 480, 520))
    assert chain.accept(43, BatchEntry(41, 500, 520, 7, 9, 900, [ROW]))
    assert chain.head == ChainHead(43, 520, 9, 1_000)


def test_rows_given_as_tuples_encode_as_sum_rows() -> None:
    """The hot path hands plain tuples to the encoder (no SumRow per (date, key))."""
    as_tuple = BatchEntry(3, 0, 1, 0, 0, 5, [tuple(msgspec.structs.astuple(ROW))], "w")
    assert encode(as_tuple) == encode(BatchEntry(3, 0, 1, 0, 0, 5, [ROW], "w"))
    assert decode(encode(as_tuple)).rows == [ROW]


def rows(count: int, width: int = 40) -> list[SumRow]:
    return [
        SumRow("2026-11-28", f"org-{i % 50}", f"user-{i:0{width}d}", "model", i, 2 * i, 1, 0, i)
        for i in range(count)
    ]


def test_parts_hold_every_row_in_order_and_none_is_over_the_limit() -> None:
    many = rows(30_000)
    whole = encode(BatchEntry(-1, 0, 1, 0, 0, 5, many, "w"))
    assert len(whole) > 2 * MAX_RECORD_BYTES  # the case: Apache Kafka would refuse it
    parts = encode_parts(many, "w")
    assert len(parts) >= 3 and all(len(part) <= MAX_RECORD_BYTES for part in parts)
    decoded = [decode(part) for part in parts]
    assert all(isinstance(part, BatchPart) for part in decoded)
    assert [row for part in decoded for row in part.rows] == many  # type: ignore[union-attr]
    # uneven rows: a part that does not fit after the even split is halved again
    uneven = rows(200, width=5) + rows(40, width=9_000)
    parts = encode_parts(uneven, "w", limit=60_000)
    assert all(len(part) <= 60_000 for part in parts)
    assert [row for p in parts for row in decode(p).rows] == uneven  # type: ignore[union-attr]


def test_an_entry_names_its_parts_and_a_part_is_never_a_link() -> None:
    named = BatchEntry(-1, 0, 10, 0, 0, 5, [], "w", parts=[0, 1])
    assert decode(encode(named)) == named
    chain = Chain()
    assert not chain.accept(0, BatchPart([ROW], "w"))
    assert chain.accept(2, named) and chain.head.offset == 2


def test_a_record_mark_changes_with_the_value_or_the_timestamp() -> None:
    class Record:
        def __init__(self, value: bytes, timestamp: int) -> None:
            self.value, self.timestamp = value, timestamp

    mark = record_mark(Record(b"a", 1))
    assert mark == record_mark(Record(b"a", 1))
    assert mark != record_mark(Record(b"b", 1)) and mark != record_mark(Record(b"a", 2))
