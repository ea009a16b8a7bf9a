"""The Kafka plumbing: the client settings and the embedded broker (``broker``), the
topics' guards (``topic_guards``), the producer of usage events (``producer``), bounded
reads of a partition (``log_reads``), the batch log's records and chain (``batch_log``),
whether a batch log is the one a summary DB followed (``log_identity``), and the summary
writer's claim protocol (``writer_claim``). No SQLite and no Faust app here."""
