"""The transitions benchmark (bench/transitions.py) runs end to end on a tiny history and
every count it checks is exact: each scenario runs, each restarted worker consumed exactly
its new records, the summary DB holds every unique event once, the raw files every one.

Speed is never asserted (the figures live in the benchmark's JSON): short group timeouts
keep the run short, not fast. The figures' arithmetic is checked on its own below.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from bench.transition_probes import longest_gap
from bench.transitions import SCENARIOS

REPO = Path(__file__).resolve().parents[2]


def test_longest_gap_counts_the_window_edges() -> None:
    """The interval running into the window starts at the last progress before it; one
    still running at the end counts up to the end, marked open."""
    gap = longest_gap([1.0, 2.0, 9.0, 10.0], start=3.0, end=12.0)
    assert (gap.seconds, gap.began, gap.ended, gap.open) == (7.0, 2.0, 9.0, False)
    still = longest_gap([1.0, 2.0], start=3.0, end=12.0)
    assert (still.seconds, still.began, still.open) == (10.0, 2.0, True)
    nothing = longest_gap([], start=3.0, end=5.0)
    assert (nothing.seconds, nothing.open) == (2.0, True)
    steady = longest_gap([3.5, 4.0, 4.5, 5.0], start=3.0, end=5.0)
    assert (steady.seconds, steady.began, steady.open) == (0.5, 3.0, False)


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_transitions_bench_runs_and_counts_match(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(REPO / "bench/transitions.py"),
        "--events",
        "2000",
        "--session-timeout",
        "6",
        "--rebalance-timeout",
        "6",
        "--heartbeat-interval",
        "1",
        "--load-rate",
        "200",
        "--warmup",
        "6",
        "--settle",
        "4",
        "--timeout",
        "150",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, timeout=450, cwd=REPO)
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, output[-6000:]
    document = orjson.loads((tmp_path / "transitions.json").read_bytes())
    assert document["ok"] is True and document["failures"] == [] and document["error"] is None
    assert document["checks"] and all(check["ok"] for check in document["checks"])
    runs = {check["run"] for check in document["checks"]}
    assert {"first-start", "cold-empty#1", "sigterm#1", "sigkill#1", "cold-history#1"} <= runs
    assert {"join+leave#1", "raw files"} <= runs
    for scenario in ("first-start", *SCENARIOS):
        (result,) = document["scenarios"][scenario]
        assert result["seconds"] >= 0, scenario
    lines = done.stdout.decode().splitlines()
    assert any(line.startswith("SIGKILL → restart") for line in lines), lines
    assert not [line for line in lines if line.startswith("FAIL")]
