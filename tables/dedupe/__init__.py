"""The hot path's dedupe state per home partition: the set of seen request ids with their
billing fingerprints (``seen_requests``) and its snapshots on disk (``seen_snapshots``)."""
