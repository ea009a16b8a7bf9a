"""streams.kafka.log_identity.decide: what the summary writer does with a batch-log partition."""

from __future__ import annotations

from dataclasses import replace

from streams.kafka.log_identity import LogFacts, PartitionFacts, TopicFacts, decide

SAME_LOG = LogFacts(beginning=0, end=50, mark_before_position="t:log39", first_prev=-1)
SAME_USAGE = TopicFacts(beginning=0, end=900, mark_before_head="t:use799")
STORED = PartitionFacts(
    partition=1,
    log_topic="app-batch-log",
    usage_topic="usage-events",
    next_offset=40,
    log_mark="t:log39",
    usage_next=800,
    usage_mark="t:use799",
    log=SAME_LOG,
    usage=SAME_USAGE,
)
NEW_USAGE = TopicFacts(beginning=0, end=120, mark_before_head=None)  # shorter than 800
EMPTY_LOG = LogFacts(beginning=0, end=0, mark_before_position=None, first_prev=None)


def test_the_same_log_continues() -> None:
    assert decide(STORED).action == "continue"
    # a log that grew on: still the same record before the position
    assert decide(replace(STORED, log=replace(SAME_LOG, end=5000))).action == "continue"


def test_a_new_broker_under_an_old_db_is_adopted() -> None:
    """The second `usage-stream dev` in the same folder: every topic is new and short."""
    new_log = LogFacts(beginning=0, end=3, mark_before_position=None, first_prev=-1)
    decision = decide(replace(STORED, log=new_log, usage=NEW_USAGE))
    assert decision.action == "adopt"
    assert "following the new log from its start" in decision.reason
    # the new cluster already holds more records than the old position: told by the marks
    busy = LogFacts(beginning=0, end=90, mark_before_position="t:other", first_prev=-1)
    other = TopicFacts(beginning=0, end=5000, mark_before_head="t:other-event")
    assert decide(replace(STORED, log=busy, usage=other)).action == "adopt"


def test_a_new_empty_log_over_the_billed_usage_topic_carries_the_positions_over() -> None:
    assert decide(replace(STORED, log=EMPTY_LOG)).action == "carry_over"


def test_a_new_chain_over_the_billed_usage_topic_is_refused() -> None:
    started = LogFacts(beginning=0, end=4, mark_before_position=None, first_prev=-1)
    decision = decide(replace(STORED, log=started))
    assert decision.action == "refuse"
    assert "would bill those events again" in decision.reason


def test_a_log_cut_past_the_position_is_refused() -> None:
    cut = LogFacts(beginning=45, end=60, mark_before_position=None, first_prev=44)
    decision = decide(replace(STORED, log=cut))
    assert decision.action == "refuse" and "40..44 were deleted" in decision.reason


def test_a_log_cut_exactly_at_the_position_loses_nothing() -> None:
    cut = LogFacts(beginning=40, end=60, mark_before_position=None, first_prev=39)
    assert decide(replace(STORED, log=cut)).action == "continue"


def test_a_copied_log_missing_its_first_records() -> None:
    """A topic recreated with its first records missing: offsets start at 0 again, the
    record before the position differs, and its first record extends a lost one."""
    copied = LogFacts(beginning=0, end=45, mark_before_position="t:log44", first_prev=4)
    decision = decide(replace(STORED, log=copied))
    assert decision.action == "refuse"  # the usage topic is the billed one
    # a new summary DB on such a log cannot be rebuilt from it
    fresh = replace(STORED, next_offset=None, log_mark="", usage_next=0, usage_mark="")
    decision = decide(replace(fresh, log=copied))
    assert decision.action == "refuse" and "extends offset 4" in decision.reason


def test_unknowable_cases_refuse() -> None:
    new_log = LogFacts(beginning=0, end=3, mark_before_position=None, first_prev=-1)
    # the usage record before the head is gone (retention): cannot tell
    gone = TopicFacts(beginning=850, end=5000, mark_before_head=None)
    assert decide(replace(STORED, log=new_log, usage=gone)).action == "refuse"
    # a database from before marks: cannot tell either
    legacy = replace(STORED, log_mark="", usage_mark="", log=new_log)
    assert decide(legacy).action == "refuse"


def test_a_legacy_db_on_its_own_log_continues() -> None:
    assert decide(replace(STORED, log_mark="", usage_mark="")).action == "continue"


def test_a_new_db_follows_any_complete_log() -> None:
    fresh = replace(STORED, next_offset=None, log_mark="", usage_next=0, usage_mark="")
    assert decide(fresh).action == "continue"
    assert decide(replace(fresh, log=EMPTY_LOG)).action == "continue"
