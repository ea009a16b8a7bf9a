"""The one summary writer: reads the batch log into the SQLite summary DB (``writer``),
closes days and keeps the reference data current (``rollup``), holds its claim on the
log (``claim``) and checks that the log is the one its DB followed (``log_guard``)."""
