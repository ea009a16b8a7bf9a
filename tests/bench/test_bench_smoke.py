"""The benchmark harness runs end to end on a small workload and the pipeline's counts
match the workload's (records consumed, invalid, duplicates, unique billed, replayed).

Speed is never asserted: it depends on the machine and on what else runs on it. The
harness is a subprocess, as an operator runs it (``make bench``), with its own broker;
the InfluxDB run is included whenever ``influxd`` is installed (the suite installs it).
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner

from bench.workload import build, murmur2_partitions
from tests.servers import INFLUXD_BIN

REPO = Path(__file__).resolve().parents[2]
EVENTS = 20_000


def test_partitions_are_aiokafkas_default_partitioner() -> None:
    """The vectorised murmur2 sends each record where ``producer.send(key=...)`` would."""
    rng = random.Random(3)
    keys = [rng.randbytes(rng.randrange(0, 45)) for _ in range(3000)]
    everything = [0, 1, 2, 3]
    expected = [DefaultPartitioner()(key, everything, everything) for key in keys]
    assert murmur2_partitions(keys) == expected


def test_workload_counts() -> None:
    """The expected counts describe exactly the records produced."""
    workload = build(1000)
    expected = workload.expected
    assert expected is not None
    assert len(workload.values) == expected.records == 1000 + 100 + 10
    unique_ids = {orjson.loads(v)["request_id"] for v in workload.values if v.endswith(b"}")}
    assert len([i for i in unique_ids if not i.startswith("broken-")]) == expected.unique
    assert sum(expected.unique_by_day.values()) == expected.unique
    assert sum(expected.records_by_partition) == expected.records
    keyless = sum(key is None for key in workload.keys)
    assert 0 < keyless < expected.duplicates_other_partition


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_bench_runs_and_counts_match(tmp_path: Path) -> None:
    influx = shutil.which(INFLUXD_BIN) is not None
    command = [sys.executable, str(REPO / "bench/run.py"), "--events", str(EVENTS)]
    command += ["--out", str(tmp_path)] + ([] if influx else ["--skip-influx"])
    done = subprocess.run(command, capture_output=True, timeout=300, cwd=REPO)
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, output[-6000:]

    document = orjson.loads((tmp_path / "latest.json").read_bytes())
    assert (tmp_path / "latest.png").stat().st_size > 10_000
    expected = document["expected"]
    assert expected["unique"] == EVENTS
    assert expected["records"] == EVENTS + EVENTS // 10 + EVENTS // 100
    assert expected["duplicates_same_partition"] == expected["duplicates_other_partition"] > 0
    assert document["ok"] is True and document["failures"] == []

    runs = document["runs"]
    measured = ["raw_reader", "faust_noop", "worker_file", "replay"]
    measured += ["worker_influx"] if influx else []
    for name in measured:
        run = runs[name]
        assert run["skipped"] is None and run["error"] is None, (name, run)
        assert run["events_per_s"] > 0, name
        assert run["peak_rss_mb"] > 0, name
        assert run["samples"], name
    for name in [n for n in measured if n.startswith("worker_")]:
        details = runs[name]["details"]
        metrics = details["metrics"]
        assert metrics["consumed"] == expected["records"], name
        assert sum(metrics["invalid"].values()) == expected["invalid"], name
        assert metrics["duplicate"] == expected["duplicates"], name
        assert details["billed_requests"] == expected["unique"], name
        assert details["processed_offsets"] == expected["records"], name
        assert details["dedupe_bytes_per_id"] > 0 and details["summary_db_bytes_per_unique"] > 0
    if influx:
        assert runs["worker_influx"]["details"]["influx_points"] == expected["unique"]
    replay = runs["replay"]["details"]
    assert replay["records_read"] == expected["records"]
    assert replay["unique_of_day"] == expected["unique_by_day"][replay["date"]]
    assert all(check["ok"] for check in document["checks"])
    # one result line per run on stdout, none of them a failure
    lines = done.stdout.decode().splitlines()
    assert not [line for line in lines if line.startswith("FAIL")]
    assert sum("events/s" in line for line in lines) == len(measured)
