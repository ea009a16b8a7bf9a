"""usage-stream's foundation: the Faust app that hosts the services (``app``), the generic
steps of the console script (``cli``), the settings (``settings``), the Prometheus
metrics (``metrics``), the worker process class (``worker``) and its runtime tuning
(``gc_tuning``, ``malloc_tuning``, ``log_throttle``), with the packages the rest builds
on: ``model`` (the usage event, money, dates, partitioning, pricing), ``kafka`` (clients,
topics, the batch log), ``sinks`` (raw points) and ``clients`` (HTTP reference data).

Nothing in this package imports ``agents`` or ``tables``: the console script and the
wiring of the services onto the app are at the top, in ``agents`` (:mod:`agents.main`,
:mod:`agents.wiring`).

The data path: the hot path (:mod:`agents.hot_path.service`) reads the usage topic in batches,
validates, deduplicates per home partition and appends one record per batch to the batch
log (:mod:`streams.kafka.batch_log`); the one summary writer
(:mod:`agents.summary_writer`) folds the log into the SQLite summary DB
(:mod:`tables.summary_db`); a replay (:mod:`agents.replay`) re-aggregates a date behind
fences in the log.
"""
