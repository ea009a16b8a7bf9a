"""The two floors every other number is divided by, measured on the same topic in the same
run (so a busy or slow machine moves them all together):

* ``raw_reader``: aiokafka ``getmany`` + ``orjson.loads`` — what reading and decoding the
  topic costs at all, the ceiling for any Python consumer;
* ``faust_noop``: a do-nothing Faust agent — Faust's per-message path alone.

Both run as their own processes (bench/raw_reader.py, bench/noop_faust.py) and are timed
from their first message to their last, without start-up and group join.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson

from bench.procwatch import MIB, Child
from bench.results import RunResult

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def raw_reader(
    bootstrap: str, topic: str, partitions: int, records: int, workdir: Path, timeout: float
) -> RunResult:
    result = RunResult("raw_reader", "raw aiokafka getmany+orjson", "floor")
    out_path, log_path = workdir / "raw_reader.json", workdir / "raw_reader.log"
    with out_path.open("wb") as out, log_path.open("wb") as log:
        child = Child(
            [
                sys.executable,
                str(BENCH / "raw_reader.py"),
                bootstrap,
                topic,
                str(partitions),
                str(records),
                str(timeout),
            ],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd=workdir,
            stdout=out,
            stderr=log,
        )
        code = child.wait(timeout + 30)
        if code is None:
            child.kill()
    result.peak_rss_mb = child.peak_rss_bytes() / MIB
    if code != 0:
        result.error = f"raw reader exited with {code}: {_tail(log_path)}"
        return result
    data = orjson.loads(out_path.read_bytes())
    result.finish(float(data["seconds"]), int(data["records"]))
    result.samples = [[float(t), float(n), None] for t, n in data["samples"]]
    result.details = {"not_json": data["not_json"], "process_seconds": child.seconds()}
    return result


_PROGRESS = re.compile(rb"NOOP_PROGRESS (\d+) ([\d.]+)")
_RESULT = re.compile(rb"NOOP_RESULT (\d+) ([\d.]+)")


def faust_noop(
    broker_url: str, topic: str, records: int, workdir: Path, timeout: float
) -> RunResult:
    result = RunResult("faust_noop", "Faust do-nothing agent", "floor")
    log_path = workdir / "faust_noop.log"
    env = {
        **os.environ,
        "BENCH_BROKER": broker_url,
        "BENCH_TOPIC": topic,
        "BENCH_COUNT": str(records),
        "BENCH_DATADIR": str(workdir / "noop"),
    }
    with log_path.open("wb") as log:
        # -l info, below WARN: no spinner, so Faust keeps the root logger at INFO;
        # --without-web: the app's web_enabled=False still left Faust's worker binding
        # 0.0.0.0:6066, so two benchmarks at once (the suite's smoke runs) collided
        child = Child(
            [sys.executable, str(BENCH / "noop_faust.py"), "worker", "-l", "info"]
            + ["--without-web"],
            env=env,
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        code = child.wait(timeout)
        if code is None:
            child.kill()
    result.peak_rss_mb = child.peak_rss_bytes() / MIB
    text = log_path.read_bytes()
    final = _RESULT.search(text)
    if not final:
        result.error = f"Faust no-op exited with {code} before the last record: {_tail(log_path)}"
        return result
    result.finish(float(final.group(2)), int(final.group(1)))
    result.samples = [[0.0, 0.0, None]]
    result.samples += [[float(t), float(n), None] for n, t in _PROGRESS.findall(text)]
    result.samples.append([result.seconds, float(result.records), None])
    result.details = {"process_seconds": child.seconds()}
    return result
