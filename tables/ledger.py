"""Ledger events: the one place where a validated event becomes a billable row.

:func:`ledger_events` gives each valid event its usage date (in the business timezone)
and its cost (``cost_usd`` when present, else estimated from the model's latest stored
price). The hot path (:mod:`agents.pipeline`) sums these rows per (date, key) into its
batch-log entries, which the summary writer folds into ``daily_pending``
(:mod:`tables.summary_db.batch_apply`); the replay (:mod:`agents.replay.run`) stages them
for one date.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from streams.model.business_time import UsageDates
from streams.model.event import UsageEvent
from streams.model.pricing import Price, estimate_cost_nano

__all__ = ["LedgerEvent", "bill", "ledger_events"]


class LedgerEvent(NamedTuple):
    """A valid event with its usage date and its cost (resolved or estimated). A tuple:
    the hot path builds one per event, and a frozen dataclass costs three times more."""

    request_id: str
    usage_date: str
    usage_day: int  # usage_date as date.toordinal()
    client_org_id: str
    user_id: str
    model: str
    input_tokens: int
    output_tokens: int
    cost_nano: int
    cost_estimated: int  # 0/1
    event_ms: int
    partition: int
    offset: int


def bill(
    event: UsageEvent, prices: Mapping[str, Price], dates: UsageDates
) -> tuple[str, int, int, int]:
    """``(usage_date, usage_day, cost_nano, estimated)`` of a valid event: the one place
    where an event gets its usage date (and its ordinal) and its cost (``cost_usd`` when
    present, else estimated from the model's latest stored price; no price → 0, still
    counted in ``estimated_requests``; ``estimated`` is 0/1). The hot path calls it per
    new request without building a :class:`LedgerEvent`; :func:`ledger_events` too."""
    day, ordinal = dates(event.event_ms)
    cost = event.cost_nano
    if cost is not None:
        return day, ordinal, cost, 0
    price = prices.get(event.model)
    return day, ordinal, estimate_cost_nano(event.input_tokens, event.output_tokens, price), 1


def ledger_events(
    located: Sequence[tuple[UsageEvent, int, int]],
    prices: Mapping[str, Price],
    dates: UsageDates,
) -> list[LedgerEvent]:
    """Valid events read at ``(event, partition, offset)`` as ledger rows (date and cost
    from :func:`bill`), for the replay's staging."""
    entries = []
    for event, partition, offset in located:
        day, ordinal, cost, estimated = bill(event, prices, dates)
        entries.append(
            LedgerEvent(
                event.request_id,
                day,
                ordinal,
                event.client_org_id,
                event.user_id,
                event.model,
                event.input_tokens,
                event.output_tokens,
                cost,
                estimated,
                event.event_ms,
                partition,
                offset,
            )
        )
    return entries
