"""The usage event and the rules on it, with no I/O: validation and parsing (``event``),
exact money (``money``), business dates (``business_time``), home partitions
(``partitioning``), the price of an event (``pricing``) and the billing fingerprint of a
request (``fingerprint``). Everything else in the project builds on these."""
