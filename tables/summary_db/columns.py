"""The ``usage_daily`` columns (docs/contract.md §3), named once: the rollup's upsert, the
replay's replace, the adjustments, the report and the ``/usage`` view all build their
column lists from these.

``usage_daily_open`` has the same columns; ``adjustments`` carries :data:`SUMMED_COLUMNS`
as its deltas.
"""

from __future__ import annotations

__all__ = ["DAILY_COLUMNS", "KEY_COLUMNS", "SUMMED_COLUMNS", "VALUE_COLUMNS", "SummaryValues"]

#: The key of a ``usage_daily`` row, in primary-key order.
KEY_COLUMNS = ("client_org_id", "user_id", "model", "usage_date")
#: Columns a rollup recomputes, in table order; a row is re-written (revision + 1) only
#: when one differs.
VALUE_COLUMNS = (
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "requests",
    "estimated_requests",
    "raw_cost_nano",
    "markup_cost_nano",
    "markup_cost_pln_nano",
    "raw_cost_usd",
    "markup_cost_usd",
    "markup_cost_pln",
    "usd_pln_rate",
    "nbp_table_no",
    "markup_multiplier",
)
#: Every ``usage_daily`` column (``markup_multiplier`` is last in the table itself: it
#: came with migration 20).
DAILY_COLUMNS = (*KEY_COLUMNS, *VALUE_COLUMNS, "revision", "updated_at")
#: The exact summed columns (counts and nano-units), in the order of a sum row
#: (:class:`tables.summary_db.statements.Usage`) and of the ``adjustments`` deltas.
SUMMED_COLUMNS = (
    "requests",
    "estimated_requests",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "raw_cost_nano",
    "markup_cost_nano",
    "markup_cost_pln_nano",
)

#: One row's ``usage_daily`` values in the order the rollup writes them
#: (tables/summary_db/summary_store.py): the key, then :data:`VALUE_COLUMNS`, then
#: ``updated_at``.
SummaryValues = tuple[
    str, str, str, str,  # client_org_id, user_id, model, usage_date
    int, int, int, int, int,  # input, output, total tokens; requests, estimated_requests
    int, int, int | None,  # raw_cost_nano, markup_cost_nano, markup_cost_pln_nano
    float | None, float | None, float | None,  # raw_cost_usd, markup_cost_usd, markup_cost_pln
    str | None, str | None, str,  # usd_pln_rate, nbp_table_no, markup_multiplier
    str,  # updated_at
]  # fmt: skip
