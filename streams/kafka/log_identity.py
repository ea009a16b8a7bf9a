"""Is the batch log on the broker the one the summary DB followed? One decision per partition.

The summary DB stores, per batch-log partition, where it has read up to (``next_offset``)
and the chain head's positions in the usage and rerouted topics. Those numbers mean
something only in the log they were read in. A new broker under an old ``DATA_DIR`` (a
second ``usage-stream dev``), a cluster migration, a recreated or truncated topic all
present a log whose offsets start again or miss records, and a writer that trusted its
stored offsets there skipped every record below them as "redelivered": bills lost
without a word. So each position carries a mark (:func:`streams.kafka.batch_log.record_mark` of
the record just before it), and before the writer trusts a position it looks at what the
broker holds there.

:func:`decide` is pure: the facts (:class:`PartitionFacts`) are gathered by
``agents/summary_writer/log_guard.py``, which also carries out the decision. The outcomes:

* ``continue``: the same log; read on from the stored position.
* ``adopt``: a different batch log *and* a different usage topic (a new broker or
  cluster): nothing in the new log was billed, so the writer follows it from its start,
  keeping the bills it has. Request ids of the old log are not carried over: a copy of an
  old request sent again to the new cluster counts as new.
* ``carry_over``: the batch log is new and empty but the usage topic is the one already
  billed: the writer starts the new chain at its stored positions (a genesis record), so
  the workers neither bill the old events twice nor skip new ones.
* ``refuse``: going on would lose or double-count; the reason says what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Decision", "LogFacts", "PartitionFacts", "TopicFacts", "decide"]


@dataclass(frozen=True, slots=True)
class LogFacts:
    """What the broker holds in one batch-log partition now."""

    beginning: int  # first offset still in the log
    end: int  # high watermark (next offset to be written)
    mark_before_position: str | None  # mark of the record at next_offset - 1, None: absent
    first_prev: int | None  # ``prev`` of the first chain record at ``beginning``; None: none


@dataclass(frozen=True, slots=True)
class TopicFacts:
    """What the broker holds in the usage (or rerouted) partition the chain reads."""

    beginning: int
    end: int
    mark_before_head: str | None  # mark of the record at the head's position - 1


@dataclass(frozen=True, slots=True)
class PartitionFacts:
    partition: int
    log_topic: str
    usage_topic: str
    #: the summary DB's stored position (None: nothing stored for the partition)
    next_offset: int | None
    log_mark: str  # stored mark at next_offset - 1 ("" unknown)
    usage_next: int  # stored chain head's usage position
    usage_mark: str  # stored mark at usage_next - 1 ("" unknown)
    log: LogFacts
    usage: TopicFacts


Action = Literal["continue", "adopt", "carry_over", "refuse"]


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str = ""  # one line, for the log (and the refusal)


def decide(facts: PartitionFacts) -> Decision:
    """What the summary writer does with one batch-log partition (module docstring)."""
    log, where = facts.log, f"batch log {facts.log_topic} partition {facts.partition}"
    position = facts.next_offset or 0
    if position == 0:  # nothing read from this partition: it must start at a chain's start
        if log.first_prev not in (None, -1):
            return Decision("refuse", _truncated(where, log))
        return Decision("continue")
    if log.end < position:
        return _new_log(
            facts, f"{where} ends at offset {log.end}, before the summary DB's position {position}"
        )
    if log.beginning > position:
        return Decision(
            "refuse",
            f"{where} begins at offset {log.beginning}, past the summary DB's position"
            f" {position}: records {position}..{log.beginning - 1} were deleted before they"
            " were applied, and their bills with them. Restore the topic's records, or a"
            f" summary DB backup whose position is at or past {log.beginning}, then replay"
            " the dates those records covered (usage-stream replay)",
        )
    if log.beginning == position:
        # the record before the position is gone (retention), nothing unapplied is:
        # nothing to compare, nothing lost
        return Decision("continue")
    if facts.log_mark and log.mark_before_position != facts.log_mark:
        return _new_log(
            facts,
            f"{where} holds another record at offset {position - 1} than the one the"
            " summary DB applied there",
        )
    return Decision("continue")


def _new_log(facts: PartitionFacts, found: str) -> Decision:
    """The batch log is not the one followed: safe to follow only when nothing in it can
    be an event already billed, i.e. the usage topic is not the one billed either."""
    log, usage = facts.log, facts.usage
    stored = facts.usage_next
    where = f"{facts.usage_topic} partition {facts.partition}"
    if stored == 0:
        same_usage: bool | None = False  # nothing was read from it: nothing can repeat
    elif usage.end < stored:
        same_usage = False  # shorter than what was read: another topic
    elif usage.beginning > stored - 1:
        same_usage = None  # the record is gone: cannot tell
    elif not facts.usage_mark:
        same_usage = None
    else:
        same_usage = usage.mark_before_head == facts.usage_mark
    if same_usage is False:
        if log.first_prev not in (None, -1):
            return Decision("refuse", _truncated(f"{found}; the new log", log))
        return Decision(
            "adopt",
            f"{found}, and {where} is not the topic billed either (a new broker or"
            " cluster): following the new log from its start; the bills already in the"
            " summary DB are kept",
        )
    if log.end == log.beginning and same_usage:
        return Decision(
            "carry_over",
            f"{found}; it is empty and {where} is the topic billed up to offset {stored}:"
            " starting its chain there",
        )
    if same_usage:
        return Decision(
            "refuse",
            f"{found}, but {where} is the topic the summary DB billed up to offset"
            f" {stored}: a new chain would bill those events again. Stop every worker,"
            " delete the batch-log topic and start the summary writer first: it starts the"
            " new log at the billed positions",
        )
    return Decision(
        "refuse",
        f"{found}, and whether {where} is the topic billed up to offset {stored} cannot"
        " be told (its record there is gone or was never marked): refusing to bill it"
        " twice or not at all. Restore the batch-log topic, or restore the summary DB"
        " from a backup of this cluster",
    )


def _truncated(where: str, log: LogFacts) -> str:
    return (
        f"{where} begins at offset {log.beginning} with a record that extends offset"
        f" {log.first_prev}: the start of its chain was deleted, so it cannot be followed"
        " from there (a truncated or copied log). Restore the summary DB from a backup"
        " (usage-stream backup) and the topic's records, or recreate the topic empty"
    )
