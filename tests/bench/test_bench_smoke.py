"""The benchmark harness runs end to end on a small workload and the pipeline's counts
match the workload's (records consumed, invalid, duplicates, unique billed, replayed),
on both workloads (``--workload default`` and ``many-keys``).

Speed is never asserted: it depends on the machine and on what else runs on it. The
harness is a subprocess, as an operator runs it (``make bench``), with its own broker;
the InfluxDB run is included whenever ``influxd`` is installed (the suite installs it).
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner

from bench.workload import build, murmur2_partitions
from streams.model.business_time import UsageDates
from tests.servers import INFLUXD_BIN

REPO = Path(__file__).resolve().parents[2]
EVENTS = 20_000
MANY_KEYS_EVENTS = 10_000


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
    assert expected.keys_by_day == _distinct_keys_by_day(workload.values)
    assert expected.replay_date == sorted(expected.unique_by_day)[1]


def _distinct_keys_by_day(values: list[bytes]) -> dict[str, int]:
    """Distinct (client, user, model) per usage date of the valid unique events, the slow
    way (the workload counts them with numpy)."""
    dates = UsageDates(ZoneInfo("Europe/Warsaw"))
    keys: dict[str, set[tuple[str, str, str]]] = {}
    for value in values:
        if not value.endswith(b"}"):
            continue
        event = orjson.loads(value)
        if event["request_id"].startswith("broken-"):
            continue
        stamp = event["timestamp"]
        if isinstance(stamp, str):
            stamp = int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1000)
        day = dates(stamp)[0]
        keys.setdefault(day, set()).add((event["client_org_id"], event["user_id"], event["model"]))
    return {day: len(found) for day, found in sorted(keys.items())}


def test_many_keys_workload_counts() -> None:
    """Every event in one date, ~0.29 distinct keys per event, copies on the same and on
    other partitions, and the expected counts exact."""
    workload = build(3000, workload="many-keys")
    expected = workload.expected
    assert expected is not None
    assert expected.workload == "many-keys"
    assert len(workload.values) == expected.records == 3000 + 300 + 30
    assert list(expected.unique_by_day.values()) == [3000]  # one date
    assert expected.replay_date == next(iter(expected.unique_by_day))
    assert expected.keys_by_day == _distinct_keys_by_day(workload.values)
    assert 0.25 * 3000 < expected.keys_by_day[expected.replay_date] < 0.33 * 3000
    assert expected.duplicates_same_partition == expected.duplicates_other_partition > 0
    assert sum(expected.records_by_partition) == expected.records


def _run_bench(tmp_path: Path, arguments: list[str]) -> tuple[dict, list[str]]:
    command = [sys.executable, str(REPO / "bench/run.py"), *arguments, "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, timeout=300, cwd=REPO)
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, output[-6000:]
    stem = "latest-many-keys" if "many-keys" in arguments else "latest"
    document = orjson.loads((tmp_path / f"{stem}.json").read_bytes())
    assert (tmp_path / f"{stem}.png").stat().st_size > 10_000
    return document, done.stdout.decode().splitlines()


def _assert_counts(document: dict, lines: list[str], measured: list[str]) -> None:
    """Every run measured and every count right (the pipeline's and the replay's)."""
    expected = document["expected"]
    assert document["ok"] is True and document["failures"] == []
    runs = document["runs"]
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
        log = details["batch_log"]
        assert log["entries"] > 0 and log["bytes_per_event"] > 0, name
        assert 0 < log["largest_record_bytes"] <= log["bytes"], name
        assert log["rows"] >= sum(expected["keys_by_day"].values()), name
    replay = runs["replay"]["details"]
    assert replay["date"] == sorted(expected["unique_by_day"])[len(expected["unique_by_day"]) // 2]
    assert replay["records_read"] == expected["records"]
    assert replay["unique_of_day"] == expected["unique_by_day"][replay["date"]]
    assert replay["rows_of_day"] == expected["keys_by_day"][replay["date"]]
    assert all(check["ok"] for check in document["checks"])
    # one result line per run on stdout, none of them a failure
    assert not [line for line in lines if line.startswith("FAIL")]
    assert sum("events/s" in line for line in lines) == len(measured)


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_bench_runs_and_counts_match(tmp_path: Path) -> None:
    influx = shutil.which(INFLUXD_BIN) is not None
    arguments = ["--events", str(EVENTS)] + ([] if influx else ["--skip-influx"])
    document, lines = _run_bench(tmp_path, arguments)
    expected = document["expected"]
    assert document["workload"] == expected["workload"] == "default"
    assert expected["unique"] == EVENTS
    assert expected["records"] == EVENTS + EVENTS // 10 + EVENTS // 100
    assert expected["duplicates_same_partition"] == expected["duplicates_other_partition"] > 0
    measured = ["raw_reader", "faust_noop", "worker_file", "replay"]
    measured += ["worker_influx"] if influx else []
    _assert_counts(document, lines, measured)
    if influx:
        assert document["runs"]["worker_influx"]["details"]["influx_points"] == expected["unique"]


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_bench_many_keys_runs_and_counts_match(tmp_path: Path) -> None:
    """The high-cardinality workload (no InfluxDB run: counts only, quick)."""
    arguments = ["--workload", "many-keys", "--events", str(MANY_KEYS_EVENTS), "--skip-influx"]
    document, lines = _run_bench(tmp_path, arguments)
    expected = document["expected"]
    assert document["workload"] == expected["workload"] == "many-keys"
    assert expected["unique"] == MANY_KEYS_EVENTS
    assert list(expected["unique_by_day"].values()) == [MANY_KEYS_EVENTS]
    (keys,) = expected["keys_by_day"].values()
    assert keys > MANY_KEYS_EVENTS // 4
    assert expected["duplicates_same_partition"] == expected["duplicates_other_partition"] > 0
    _assert_counts(document, lines, ["raw_reader", "faust_noop", "worker_file", "replay"])
