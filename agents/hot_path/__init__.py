"""The hot path: usage events read in batches, validated, routed to their home partition,
deduplicated there, aggregated, and committed to the raw sink and the batch log.

One object per stage of the data path, wired by the service; none imports the service,
and the pure stages import no Faust app:

* ``service``: ``HotPath``, the ``mode.Service`` the app starts: the Kafka clients,
  the batch loop (prepare of batch N+1 overlapping the commit of batch N), the timers;
* ``ownership``: which home partitions this worker owns (assigned, rebuilding, owned,
  held, revoked), their states, epochs and read positions;
* ``batch_reader``: the next batch of the owned partitions, in the replay fences' order;
* ``prepare``: stages 1-4, pure: validate → route → dedupe → aggregate, into a
  ``PreparedBatch`` (``batch``: the records passed between stages);
* ``committer``: stages 5-6: raw points and sends stored, then one batch-log record per
  home partition (the commit point), then the Kafka offsets.

A home partition's state and how it is rebuilt: ``home_partition`` (the state),
``home_state`` (the Rebuilder, following the batch-log chain), ``rebuild_ids`` (ids read
back in the chain's order), ``snapshots`` (when the seen sets are saved and found again),
``dedupe`` (the verdict rule shared by the hot path and the rebuild), ``home_assignor``
(the sticky assignor that keeps home partitions with their state).
"""
