"""``tools/query_year.py`` (the measurement the README quotes for the query API) still
runs: a tiny year, the real worker, every query answered. Speed is never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.harness import REPO


def test_the_query_measurement_runs_at_a_small_scale(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    result = subprocess.run(
        [
            sys.executable,
            "tools/query_year.py",
            "--days",
            "3",
            "--keys",
            "200",
            "--repeat",
            "1",
            "--db",
            str(tmp_path / "usage.db"),
            "--out",
            str(out),
        ],  # fmt: skip
        cwd=REPO,
        capture_output=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert (report["days"], report["keys"]) == (3, 200)
    assert len(report["queries"]) == 9
    assert {query["status"] for query in report["queries"]} == {200}
