"""State on disk: the hot path's dedupe state per home partition (``dedupe/``), the
event-time watermarks that close usage dates (``watermarks``), and the SQLite summary DB,
the billing record (``summary_db/``)."""
