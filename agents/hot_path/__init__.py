"""The hot path: usage events read in batches, validated, routed to their home
partition, deduplicated there, aggregated, and committed to the raw sink and the batch
log (``service``), with the home partitions' state (``home_state``, ``home_assignor``,
``dedupe``, ``rebuild_ids``, ``snapshots``).
"""
