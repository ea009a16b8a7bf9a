"""Throughput only: bench/run.py without the InfluxDB and replay runs, kept under its old
name and command line for the README's instructions.

    .venv/bin/python bench/throughput.py [EVENTS]   (default 100000)

The worker against the raw aiokafka+orjson reader and the do-nothing Faust agent, on the
same broker and events, with the count checks; results in bench/results/latest.*.
It used to poll the old ``usage_events`` ledger; bench/run.py's completion signal is the
summary writer's ``batch_log_heads`` (see bench/worker_run.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.run import main  # noqa: E402

if __name__ == "__main__":
    events = sys.argv[1] if len(sys.argv) > 1 else "100000"
    sys.exit(main(["--events", events, "--skip-influx", "--skip-replay"]))
