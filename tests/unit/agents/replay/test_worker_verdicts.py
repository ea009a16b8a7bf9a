"""The dead-letter topic's ``source-offset`` header as the replay reads it back."""

from __future__ import annotations

from agents.replay.worker_verdicts import parse_source


def test_a_source_offset_names_topic_partition_and_offset() -> None:
    assert parse_source(b"usage-events-rerouted/3/1234") == ("usage-events-rerouted", 3, 1234)
    assert parse_source(b"a.b_c-d/0/0") == ("a.b_c-d", 0, 0)


def test_a_malformed_source_offset_is_none() -> None:
    for value in (b"", b"usage-events", b"usage-events/1", b"t/x/1", b"t/1/y", b"\xff/1/2"):
        assert parse_source(value) is None
