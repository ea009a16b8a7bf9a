"""``usage-stream replay --date D`` timed as a whole command, as an operator would see it.

On Tansu a timestamp lookup returns offset 0, so the replay reads the whole topic whatever
the date: events/s is the topic's record count over the command's wall time (start-up,
the read, the temporary dedupe file and the replace transaction all included). The
replay's own progress lines (stderr, every ~10 % or 5 s) give the over-time samples; its
summary line gives the records read, the unique events of the date and the date's rows
after the replay (one per distinct key), checked exactly.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.procwatch import MIB, Child
from bench.results import Check, RunResult

REPO = Path(__file__).resolve().parents[1]
_PROGRESS = re.compile(r"(\d+)/(\d+) records")
_SUMMARY = re.compile(r"(\d+) records read, (\d+) unique events of (\S+),")
_ROWS_NOW = re.compile(r"(\d+) rows now\)")


def run_replay(
    env: dict[str, str],
    day: str,
    records: int,
    unique_of_day: int,
    workdir: Path,
    timeout: float,
    keys_of_day: int | None = None,
) -> tuple[RunResult, list[Check]]:
    """Run the replay of ``day`` once; ``keys_of_day`` (distinct keys of the date's
    events), when given, is checked against the date's rows after the replay."""
    result = RunResult("replay", f"usage-stream replay --date {day}", "replay")
    out_path, log_path = workdir / "replay.out", workdir / "replay.log"
    lines: list[tuple[float, str]] = []
    with out_path.open("wb") as out:
        child = Child(
            [sys.executable, "-m", "agents", "replay", "--date", day],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.PIPE,
        )

        def collect() -> None:
            assert child.popen.stderr is not None
            with log_path.open("wb") as log:
                for raw in child.popen.stderr:
                    lines.append((time.monotonic(), raw.decode(errors="replace")))
                    log.write(raw)

        reader = threading.Thread(target=collect, daemon=True)
        reader.start()
        code = child.wait(timeout)
        if code is None:
            child.kill()
        reader.join(10)
    wall = child.seconds()
    result.peak_rss_mb = child.peak_rss_bytes() / MIB
    output = out_path.read_text(errors="replace")
    summary = _SUMMARY.search(output)
    result.details = {
        "exit_code": code,
        "date": day,
        "summary_line": next((ln for ln in output.splitlines() if _SUMMARY.search(ln)), None),
    }
    if code != 0:
        tail = "".join(line for _, line in lines[-20:])
        result.error = f"replay exited with {code}: {output[-1000:]}{tail}"
        return result, []
    result.finish(wall, records)
    result.samples = [[0.0, 0.0, None]]
    for moment, line in lines:
        match = _PROGRESS.search(line)
        if match:
            result.samples.append([moment - child.started, float(match.group(1)), None])
    result.samples.append([wall, float(records), None])
    read = int(summary.group(1)) if summary else None
    unique = int(summary.group(2)) if summary else None
    # where the time went, as the command reports it, and when each stderr line came
    timings = next((line.strip() for _, line in lines if " timings: " in line), None)
    said = [[round(moment - child.started, 2), line.rstrip()] for moment, line in lines]
    rows_now = _ROWS_NOW.search(output)
    rows = int(rows_now.group(1)) if rows_now else None
    result.details.update(
        {
            "records_read": read,
            "unique_of_day": unique,
            "rows_of_day": rows,
            "timings": timings,
            "stderr": said,
        }
    )
    checks = [
        Check("replay", "records read == records produced", records, read),
        Check("replay", f"unique events of {day} == produced", unique_of_day, unique),
    ]
    if keys_of_day is not None:
        checks.append(
            Check("replay", f"rows of {day} == distinct keys produced", keys_of_day, rows)
        )
    return result, checks
