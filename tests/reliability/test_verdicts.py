"""A record's verdict is the same at every read, whatever the reader's clock.

The case that would lose a bill: an event more than 24 h in the future is dead-lettered
(``future_timestamp``); the producer then sends the corrected copy under the same
request id. Had a worker that rebuilds the partition later (a restart, another host
adopting it) judged the first record by its own clock, hours later, it would have found
it valid and taken its request id as seen, and the corrected copy would have been dropped
as a duplicate: never billed. The future is bounded by each record's own Kafka
timestamp (``streams.model.event.received_ms``), so every reader says the same.

The second worker runs under libfaketime, its clock hours ahead of the first one's.
"""

from __future__ import annotations

import time
from pathlib import Path

import orjson

from streams.model.partitioning import home_partition
from tests.harness import Stack, wait_for

HOURS = 3_600_000


def libfaketime() -> Path:
    """Debian's libfaketime (deploy/local/bootstrap.sh installs it): a missing one fails."""
    found = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    assert found, "libfaketime is missing: run deploy/local/bootstrap.sh test"
    return found[0]


def event(request_id: str, timestamp_ms: int) -> bytes:
    return orjson.dumps(
        {
            "request_id": request_id,
            "client_org_id": "org-1",
            "user_id": "user-1",
            "model": "openai/gpt-4o-mini",
            "input_tokens": 10,
            "output_tokens": 5,
            "cost_usd": "0.001",
            "timestamp": timestamp_ms,
        }
    )


def hours_ahead(hours: int) -> dict[str, str]:
    """The environment that runs a worker with its clock ``hours`` ahead (libfaketime)."""
    return {"LD_PRELOAD": str(libfaketime()), "FAKETIME": f"+{hours}h", "DONT_FAKE_MONOTONIC": "1"}


def invalid_future(stack: Stack, worker) -> float:  # type: ignore[no-untyped-def]
    return worker.metrics().get("usage_stream_events_invalid_total{reason=future_timestamp}", 0)


def test_a_corrected_copy_after_a_future_dead_letter_is_billed_after_a_restart_hours_later(
    stack: Stack,
) -> None:
    first = stack.worker().start()
    first.wait_assigned()
    now = int(time.time() * 1000)
    # 26 h ahead of its record: invalid now; a clock 4 h later would find it valid
    stack.publish([event("fix-1", now + 26 * HOURS)], keys=[b"fix-1"])
    wait_for(lambda: invalid_future(stack, first) == 1, 60, "the dead letter")
    wait_for(lambda: stack.records_committed() >= 1, 60, "the batch to be committed")
    assert first.stop() == 0

    later = stack.worker(**hours_ahead(4)).start()
    later.wait_assigned()
    stack.publish([event("fix-1", now)], keys=[b"fix-1"])
    wait_for(lambda: stack.billed_requests() == 1, 90, "the corrected copy to be billed")
    assert later.metrics().get("usage_stream_events_duplicate_total", 0) == 0


def test_a_corrected_copy_is_billed_when_another_worker_with_a_later_clock_adopts_it(
    stack: Stack,
) -> None:
    # the summary writer's clock is 4 h ahead; the first worker only runs the hot path
    adopter = stack.worker(**hours_ahead(4)).start()
    leaver = stack.worker(SUMMARY_WRITER="false").start()
    wait_for(
        lambda: (
            len(adopter.status().get("assigned_partitions", [])) == 2
            and len(leaver.status().get("assigned_partitions", [])) == 2
        ),
        120,
        "the partitions to be shared",
    )
    owned = set(leaver.status()["assigned_partitions"])
    request_id = next(f"fix-{i}" for i in range(1000) if home_partition(f"fix-{i}", 4) in owned)
    now = int(time.time() * 1000)
    stack.publish([event(request_id, now + 26 * HOURS)], keys=[request_id.encode()])
    wait_for(lambda: invalid_future(stack, leaver) == 1, 60, "the dead letter")
    wait_for(lambda: stack.records_committed() >= 1, 60, "the batch to be committed")
    assert leaver.stop() == 0

    wait_for(
        lambda: len(adopter.status().get("assigned_partitions", [])) == 4,
        120,
        "the adopter to own every partition",
    )
    stack.publish([event(request_id, now)], keys=[request_id.encode()])
    wait_for(lambda: stack.billed_requests() == 1, 90, "the corrected copy to be billed")
    assert adopter.metrics().get("usage_stream_events_duplicate_total", 0) == 0
