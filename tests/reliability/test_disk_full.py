"""Full disks under the raw files and under the summary DB (issue 10, item 5).

Real full filesystems, not mocks: the test runs as root in a sandbox and mounts two
small tmpfs (``mount -t tmpfs -o size=...``, which works here): one at ``DATA_DIR`` (the
summary DB, its WAL and shm) and one at ``DATA_DIR/raw`` (the raw line-protocol files), so
each can be filled on its own with a filler file written until ``ENOSPC``. Without the
privilege to mount, the test fails and says so (no silent skip).

For each condition, in turn:

* raw files dir full: the raw sink cannot append; the batch stalls before its batch-log
  record (the commit point) is appended;
* summary DB full: the raw points are written and the batch-log records appended (the
  hot path no longer writes SQLite), but the summary writer's transaction (sums and chain
  heads) fails with ``database or disk is full`` and rolls back;

expected: ONE error line for the condition (the hot path and the summary writer log a
condition once, the raw sink its circuit opening once; the raw sink's per-attempt
warnings are bounded by its backoff, never per message), ``/ready`` 503 naming it,
``/health`` 200, no position advancing past unwritten data (the chain heads stored in
SQLite, ``batch_log_heads``, and the bills stay put; while the raw disk is full the
group's committed offsets in Kafka too; while the DB disk is full they may move: the
batch log holds what was read), and once the filler is deleted: full recovery, exact
bills against the independent ground truth, every raw point present once (a retried
append may repeat an identical line, which is the same point on import: distinct lines
are counted).
"""

from __future__ import annotations

import asyncio
import errno
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.harness import Stack, http_get, wait_for
from tests.rollup.test_rollup_e2e import actual, ground_truth, make_events, seed_rates

MOUNT_SIZE = "64m"
STALL_SECONDS = 8.0  # how long the offsets are watched while a disk is full


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (needs root in a sandbox): {result.stderr.strip()}")


@pytest.fixture
def small_disks(stack: Stack) -> Iterator[tuple[Path, Path]]:
    """(DATA_DIR, DATA_DIR/raw), each its own 64 MiB tmpfs, unmounted after the test."""
    data = Path(stack.env["DATA_DIR"])
    raw = data / "raw"
    mounted: list[Path] = []
    try:
        mount_tmpfs(data, MOUNT_SIZE)
        mounted.append(data)
        mount_tmpfs(raw, MOUNT_SIZE)
        mounted.append(raw)
        yield data, raw
    finally:
        for worker in stack.workers:
            if worker.alive():
                worker.kill()
        for path in reversed(mounted):
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write a filler file until the filesystem says ENOSPC; return it (delete to free)."""
    filler = directory / "filler.bin"
    with filler.open("wb", buffering=0) as file:
        for chunk in (1 << 20, 4096, 512):
            block = b"\0" * chunk
            while True:
                try:
                    file.write(block)
                except OSError as error:
                    assert error.errno == errno.ENOSPC, error
                    break
    return filler


def stored_offsets(stack: Stack) -> dict[int, int]:
    """Per partition, how far the usage topic was read and billed (the chain heads the
    summary writer stored with the sums)."""
    return dict(stack.query("SELECT partition, usage_next FROM batch_log_heads"))


def kafka_committed(stack: Stack) -> dict[int, int | None]:
    """The consumer group's committed offsets, read without joining the group."""

    async def read() -> dict[int, int | None]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=f"127.0.0.1:{stack.broker.port}",
            group_id=stack.env["APP_ID"],
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            return {p: await consumer.committed(TopicPartition(stack.topic, p)) for p in range(4)}
        finally:
            await consumer.stop()

    return asyncio.run(read())


def billed(stack: Stack, unique: int) -> bool:
    try:
        count = stack.billed_requests()
        (pending,) = stack.query("SELECT COUNT(*) FROM daily_pending")[0]
        (total,) = stack.query("SELECT COALESCE(SUM(requests), 0) FROM usage_daily")[0]
    except Exception:  # noqa: BLE001 - DB busy or not created yet
        return False
    return count == unique and pending == 0 and total == unique


def raw_points(raw: Path) -> list[str]:
    """Distinct raw lines (a retried append may repeat an identical line)."""
    lines = {
        line
        for path in raw.glob("*.lp")
        for line in path.read_text().splitlines()
        if line and not line.startswith("#")
    }
    return sorted(lines)


def ready_reasons(stack: Stack, url: str) -> str | None:
    code, body = http_get(url + "/ready", timeout=10)
    if code == 503:
        return " ".join(orjson.loads(body)["reasons"])
    return None


def assert_stalled(stack: Stack, url: str, what: str, kafka_static: bool) -> str:
    """While a disk is full: /ready 503 naming ``what``, /health 200, the stored chain
    heads and the bills static (and the group's committed offsets, when ``kafka_static``)."""
    reason = wait_for(
        lambda: (r := ready_reasons(stack, url)) and what in r and r, 60, f"/ready naming {what}"
    )
    before = (stored_offsets(stack), kafka_committed(stack) if kafka_static else None)
    billed_before = stack.billed_requests()
    deadline = time.monotonic() + STALL_SECONDS
    while time.monotonic() < deadline:
        assert http_get(url + "/health")[0] == 200
        time.sleep(1)
    assert (stored_offsets(stack), kafka_committed(stack) if kafka_static else None) == before
    assert stack.billed_requests() == billed_before
    return str(reason)


def test_full_disks_stall_cleanly_and_recover_exactly(
    stack: Stack, small_disks: tuple[Path, Path]
) -> None:
    data, raw = small_disks
    events = make_events(6_000, seed=51)
    values = [orjson.dumps(event) for event in events]
    seed_rates(stack)
    worker = stack.worker().start()
    worker.wait_assigned()
    stack.publish(values[:2_000])
    wait_for(lambda: billed(stack, 2_000), 90, "the first 2,000 events billed")
    assert http_get(worker.web + "/ready", timeout=10)[0] == 200

    # 1. the raw files' disk is full
    lines_before = len(worker.log_path.read_text().splitlines())
    filler = fill(raw)
    stack.publish(values[2_000:4_000])
    reason = assert_stalled(stack, worker.web, "raw files", kafka_static=True)
    assert str(raw) in reason
    filler.unlink()
    wait_for(lambda: billed(stack, 4_000), 90, "recovery after the raw disk is freed")
    log = worker.log_path.read_text().splitlines()[lines_before:]
    errors = [line for line in log if "ERROR" in line and "raw sink" in line]
    assert len(errors) == 1 and "circuit open" in errors[0], "\n".join(errors)
    retries = [line for line in log if "raw sink" in line]
    assert len(retries) <= 10, "\n".join(retries)  # per attempt (backoff), not per message

    # 2. the summary DB's disk is full
    lines_before = len(worker.log_path.read_text().splitlines())
    filler = fill(data)
    stack.publish(values[4_000:])
    # (the hot path goes on: its commit point is the batch log; the summary writer is stuck)
    reason = assert_stalled(stack, worker.web, "database or disk is full", kafka_static=False)
    assert "summary" in reason
    filler.unlink()
    wait_for(lambda: billed(stack, len(events)), 90, "recovery after the DB disk is freed")
    log = worker.log_path.read_text().splitlines()[lines_before:]
    ours = [line for line in log if "summary writer: applying" in line]
    assert len(ours) == 2, "\n".join(ours)  # the failure, once, and the recovery
    assert "ERROR" in ours[0] and "database or disk is full" in ours[0]
    assert "recovered" in ours[1]
    assert not [line for line in log if "hot path: commit" in line]

    wait_for(lambda: http_get(worker.web + "/ready", timeout=10)[0] == 200, 30, "/ready 200")
    assert actual(stack) == ground_truth(events)
    points = raw_points(raw)
    ids = sorted(line.rsplit('request_id="', 1)[1].split('"', 1)[0] for line in points)
    assert ids == sorted(event["request_id"] for event in events)
    assert worker.alive()
    assert "Traceback" not in worker.log_path.read_text()
