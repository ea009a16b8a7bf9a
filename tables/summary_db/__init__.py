"""The SQLite summary DB, the billing record: its schema and migrations (``schema``,
``schema_billing``), connections (``connection``, ``command_db``), the start-up check
(``preflight``), the summary rows and their keys (``summary_store``, ``summary_keys``),
applying batch-log records (``batch_apply``), reference data (``reference``), statements,
the price book and budgets (``statements``, ``pricebook``, ``budgets``, ``budget_watch``),
the replay's tables (``replay_store``, ``replay_staging``), the report's queries
(``report_queries``) and the consistent backup (``backup``)."""
