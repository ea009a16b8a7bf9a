"""``usage-stream replay``: re-aggregate one usage date from the usage topic and replace it
in the summary DB behind fences. ``run`` (the command and its steps), ``command`` (its
entry in Faust's CLI), ``fences`` (taking the date over from the live pipeline),
``readers`` (the reader processes), ``topic_slice`` (the bounded, group-less read of the
usage topic) and ``results`` (a replay's result on Kafka, which the summary writer reads).
Its tables are :mod:`tables.summary_db.replay_store` and ``replay_staging``."""
