"""Prometheus metrics (docs/contract.md §7), prefix ``usage_stream_``, on one registry.

``prometheus_client`` appends ``_total`` to counters itself, so counters are declared
without it. ``REGISTRY`` is private to the app (no default process collectors twice).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from streams.model.event import REASONS

__all__ = [
    "BUDGET_ALERTS",
    "BUDGET_ALERTS_UNDELIVERED",
    "BUDGET_USED_RATIO",
    "CONSUMER_LAG",
    "EVENTS_CONSUMED",
    "EVENTS_DUPLICATE",
    "EVENTS_INVALID",
    "EVENTS_LATE",
    "OPEN_DAYS",
    "RAW_POINTS_WRITTEN",
    "RAW_SINK_CIRCUIT_OPEN",
    "RAW_WRITE_ERRORS",
    "RAW_WRITE_SECONDS",
    "REFRESH_LAST_SUCCESS",
    "REFRESH_RUNS",
    "REBUILD_IDS",
    "REGISTRY",
    "ROLLUP_SECONDS",
    "SNAPSHOTS",
    "SUMMARIES_WRITTEN",
    "USD_PLN_RATE",
    "render",
]

# no *_created series: they double the scrape for no use here
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client: unannotated
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)

_P = "usage_stream_"

EVENTS_CONSUMED = Counter(
    _P + "events_consumed", "Messages read from the usage topic", registry=REGISTRY
)
EVENTS_DUPLICATE = Counter(
    _P + "events_duplicate", "Valid events dropped as duplicates of a request_id", registry=REGISTRY
)
EVENTS_INVALID = Counter(
    _P + "events_invalid",
    "Invalid messages sent to the dead-letter topic",
    ["reason"],
    registry=REGISTRY,
)
for _reason in REASONS:
    EVENTS_INVALID.labels(reason=_reason)
EVENTS_LATE = Counter(
    _P + "events_late", "Unique events for a day that had already closed", registry=REGISTRY
)
DEDUPE_IDS = Gauge(
    f"{_P}dedupe_ids",
    "Request ids this worker remembers for deduplication (its home partitions)",
    registry=REGISTRY,
)
DEDUPE_BYTES = Gauge(
    f"{_P}dedupe_bytes",
    "Memory those ids take: their arrays of keys and fingerprints (24 B per id)",
    registry=REGISTRY,
)
REBUILD_IDS = Counter(
    f"{_P}rebuild_ids",
    "Request ids put back into home partitions' dedupe state when rebuilt, by source:"
    " snapshot (loaded from a seen-set snapshot) or topics (read back from the usage and"
    " rerouted topics)",
    ["source"],
    registry=REGISTRY,
)
for _source in ("snapshot", "topics"):
    REBUILD_IDS.labels(source=_source)
SNAPSHOTS = Counter(
    f"{_P}dedupe_snapshots",
    "Seen-set snapshots of home partitions, by result: written, failed",
    ["result"],
    registry=REGISTRY,
)
for _result in ("written", "failed"):
    SNAPSHOTS.labels(result=_result)
PARTIALS_APPLIED = Counter(
    f"{_P}partials_applied",
    "Batch-log records whose sums the summary writer added (scale-out)",
    registry=REGISTRY,
)
PARTIALS_SKIPPED = Counter(
    f"{_P}partials_skipped",
    "Batch-log records the summary writer read again and skipped (reason=redelivered)",
    ["reason"],
    registry=REGISTRY,
)
BATCH_LOG_RECORDS_REJECTED = Counter(
    f"{_P}batch_log_records_rejected",
    "Batch-log records the summary writer did not add: not_in_chain (a zombie's record,"
    " or one that lost a race: expected now and then), not_a_record (bytes no worker"
    " writes), missing_part (a part named by a valid entry but never read: rows lost)",
    ["reason"],
    registry=REGISTRY,
)
for _reason in ("not_in_chain", "not_a_record", "missing_part"):
    BATCH_LOG_RECORDS_REJECTED.labels(reason=_reason)
SUMMARY_WRITER_LAG = Gauge(
    f"{_P}summary_writer_lag_records",
    "Batch-log records on the broker the summary writer has not applied yet (all"
    " partitions, including those held at a replay's fence or refused)",
    registry=REGISTRY,
)
BATCH_LOG_GUARD = Counter(
    f"{_P}batch_log_guard",
    "Batch-log partitions the summary writer found not to be the log its DB followed, by"
    " what it did: adopt (a new cluster's log, followed from its start), carry_over (a new"
    " empty log started at the billed positions), refuse (going on would lose or"
    " double-count)",
    ["action"],
    registry=REGISTRY,
)
SUMMARY_WRITER_HELD = Gauge(
    f"{_P}summary_writer_held_partitions",
    "Batch-log partitions the summary writer does not apply, by why: replay_fence (a"
    " replay of a date not complete yet), log_refused (not the log its DB followed),"
    " stepped_down (another writer owns the batch log)",
    ["reason"],
    registry=REGISTRY,
)
for _reason in ("replay_fence", "log_refused", "stepped_down"):
    SUMMARY_WRITER_HELD.labels(reason=_reason)
HOME_PARTITIONS_HELD = Gauge(
    f"{_P}home_partitions_held",
    "Home partitions this worker owns but does not read: their batch log cannot be"
    " followed (a deleted chain start, a recreated usage topic; /ready says which)",
    registry=REGISTRY,
)
TOPIC_CONFIG_PROBLEMS = Gauge(
    f"{_P}topic_config_problems",
    "1 while a pipeline topic's config weakens a guarantee (streams/kafka/topic_guards.py):"
    " checks retention_ms, retention_bytes, cleanup_policy",
    ["topic", "check"],
    registry=REGISTRY,
)
RAW_POINTS_WRITTEN = Counter(
    _P + "raw_points_written", "Raw points acknowledged by the raw sink", registry=REGISTRY
)
RAW_WRITE_ERRORS = Counter(
    _P + "raw_write_errors", "Failed raw sink write attempts (retried)", registry=REGISTRY
)
SUMMARIES_WRITTEN = Counter(
    _P + "summaries_written", "usage_daily rows inserted or changed", registry=REGISTRY
)
REFRESH_RUNS = Counter(
    _P + "refresh_runs",
    "Reference data refresh attempts",
    ["source", "result"],
    registry=REGISTRY,
)
RAW_WRITE_SECONDS = Histogram(
    _P + "raw_write_seconds", "Duration of one raw sink batch write", registry=REGISTRY
)
ROLLUP_SECONDS = Histogram(
    _P + "rollup_seconds", "Duration of one rollup pass over pending days", registry=REGISTRY
)
RAW_SINK_CIRCUIT_OPEN = Gauge(
    _P + "raw_sink_circuit_open", "1 while the raw sink circuit breaker is open", registry=REGISTRY
)
OPEN_DAYS = Gauge(
    _P + "open_days", "Usage dates with aggregates not yet written", registry=REGISTRY
)
CONSUMER_LAG = Gauge(
    _P + "consumer_lag",
    "Messages between the committed offset and the high watermark",
    ["topic", "partition"],
    registry=REGISTRY,
)
REFRESH_LAST_SUCCESS = Gauge(
    _P + "refresh_last_success_timestamp_seconds",
    "Unix time of the last successful refresh",
    ["source"],
    registry=REGISTRY,
)
USD_PLN_RATE = Gauge(
    _P + "usd_pln_rate", "Latest stored NBP table A USD mid rate", registry=REGISTRY
)

# Budgets (summary writer only): alerts fired, webhook deliveries, spend per budget.
BUDGET_ALERTS = Counter(
    _P + "budget_alerts",
    "Budget threshold alerts: fired (a threshold crossed, recorded once per client and"
    " month), delivered (the webhook answered 2xx), failed (a delivery attempt failed;"
    " retried with backoff)",
    ["result"],
    registry=REGISTRY,
)
for _result in ("fired", "delivered", "failed"):
    BUDGET_ALERTS.labels(result=_result)
BUDGET_USED_RATIO = Gauge(
    _P + "budget_used_ratio",
    "Marked-up USD spent this business-time month (open days included) / monthly budget",
    ["client_org_id"],
    registry=REGISTRY,
)
BUDGET_ALERTS_UNDELIVERED = Gauge(
    _P + "budget_alerts_undelivered",
    "Budget alerts fired but not yet accepted by their webhook",
    registry=REGISTRY,
)


def render() -> bytes:
    """The registry in the Prometheus text exposition format."""
    return generate_latest(REGISTRY)
