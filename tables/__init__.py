"""State: the dedupe table, the per-event ledger, daily aggregates and the SQLite summary store."""
