"""The dead-letter topic's verdicts as the replay reads them back and applies them."""

from __future__ import annotations

from dataclasses import dataclass

from agents.replay.worker_verdicts import parse_source, value_digest, without_losers


def test_a_source_offset_names_topic_partition_and_offset() -> None:
    assert parse_source(b"usage-events-rerouted/3/1234") == ("usage-events-rerouted", 3, 1234)
    assert parse_source(b"a.b_c-d/0/0") == ("a.b_c-d", 0, 0)


def test_a_malformed_source_offset_is_none() -> None:
    for value in (b"", b"usage-events", b"usage-events/1", b"t/x/1", b"t/1/y", b"\xff/1/2"):
        assert parse_source(value) is None


@dataclass
class Record:
    offset: int
    value: bytes | None


def test_the_judged_copy_is_left_out_by_position_and_bytes() -> None:
    records = [Record(0, b"a"), Record(1, b"conflict"), Record(2, b"c"), Record(3, None)]
    losers = {1: value_digest(b"conflict"), 3: value_digest(None)}
    assert without_losers(records, losers) == [Record(0, b"a"), Record(2, b"c")]


def test_another_record_at_a_judged_position_stays() -> None:
    """A recreated topic starts its offsets again: the verdict names other bytes there."""
    records = [Record(0, b"a"), Record(1, b"a new event")]
    assert without_losers(records, {1: value_digest(b"conflict")}) == records
