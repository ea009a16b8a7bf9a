"""Faust agents: ingest (validate, DLQ, forward), record (dedupe, raw sink, ledger),
rollup (close days into SQLite), refresh (NBP + OpenRouter), replay (re-aggregate a day).

Agents import topics and tables; nothing imports agents (Faust autodiscovers them).
"""
