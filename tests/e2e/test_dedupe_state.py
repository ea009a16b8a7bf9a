"""The dedupe state on real processes: conflicting duplicates (docs/contract.md §1) on one
partition, across partitions, across a restart and a rebuild; and seen-set snapshots
that let a restart read only the tail (issue 20 item 3), never trusting a damaged one."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import orjson

from streams.model.partitioning import home_partition
from tests.harness import Stack, Worker, consume_all, wait_for

BASE_MS = 1_795_169_472_000  # 2026-11-20T10:11:12Z
PARTITIONS = 4


def usage(request_id: str, offset_ms: int = 0, **extra: object) -> bytes:
    body = {
        "request_id": request_id,
        "client_org_id": "org-1",
        "user_id": "user-1",
        "model": "openai/gpt-4o-mini",
        "input_tokens": 100,
        "output_tokens": 10,
        "cost_usd": "0.000123456",
        "timestamp": BASE_MS + offset_ms,
        **extra,
    }
    return orjson.dumps(body)


def home(request_id: str) -> int:
    return home_partition(request_id, PARTITIONS)


def away(request_id: str) -> int:
    return (home(request_id) + 1) % PARTITIONS


def metric(worker: Worker, name: str) -> float:
    return worker.metrics().get(name, 0.0)


CONFLICTS = "usage_stream_events_invalid_total{reason=conflicting_duplicate}"
DUPLICATES = "usage_stream_events_duplicate_total"


def dead_letters(stack: Stack, expected: int) -> list[tuple[bytes, str]]:
    records = asyncio.run(consume_all(stack.broker, stack.topic + "-dlq", expected, 30))
    return [(record.value, dict(record.headers)["error"].decode()) for record in records]


def billed(stack: Stack) -> tuple[int, int]:
    """(requests, input tokens) billed so far, closed and open days."""
    ((requests, tokens),) = stack.query(
        "SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(input_tokens), 0) FROM ("
        " SELECT requests, input_tokens FROM usage_daily"
        " UNION ALL SELECT requests, input_tokens FROM daily_pending)"
    )
    return int(requests), int(tokens)


def test_conflicting_copies_go_to_the_dlq_and_identical_ones_stay_duplicates(
    stack: Stack,
) -> None:
    worker = stack.worker().start()
    worker.wait_assigned()
    stack.publish([usage("conf-1")], partitions=[home("conf-1")])
    wait_for(lambda: billed(stack) == (1, 100), 60, "the first copy billed")

    copies = [
        (usage("conf-1"), home("conf-1")),  # a retry: duplicate
        (usage("conf-1"), away("conf-1")),  # a retry read elsewhere: duplicate
        (usage("conf-1", cost_usd="0.5"), home("conf-1")),  # conflict: cost_usd
        (usage("conf-1", input_tokens=7, offset_ms=1), away("conf-1")),  # conflict, away
        # inside one batch: the first copy (lowest offset at home) counts
        (usage("conf-2", input_tokens=20), home("conf-2")),
        (usage("conf-2", input_tokens=21), home("conf-2")),
        (usage("conf-2", input_tokens=20), home("conf-2")),
    ]
    stack.publish([value for value, _ in copies], partitions=[p for _, p in copies])
    wait_for(
        lambda: metric(worker, CONFLICTS) == 3 and metric(worker, DUPLICATES) == 3,
        60,
        "3 conflicts and 3 duplicates",
    )
    wait_for(lambda: billed(stack) == (2, 120), 30, "conf-1 and conf-2 billed once each")
    letters = dead_letters(stack, 3)
    errors = {value: error for value, error in letters}
    assert len(letters) == 3
    assert errors[usage("conf-1", cost_usd="0.5")].startswith("conflicting_duplicate: ")
    assert errors[usage("conf-1", cost_usd="0.5")].endswith("billing fields: cost_usd")
    assert errors[usage("conf-1", input_tokens=7, offset_ms=1)].endswith(
        "billing fields: input_tokens, timestamp"
    )
    assert errors[usage("conf-2", input_tokens=21)].endswith("billing fields: input_tokens")
    assert len(stack.raw_points()) == 2
    assert metric(worker, "usage_stream_raw_points_written_total") == 2


def test_conflicts_are_judged_alike_after_a_rebuild_and_a_snapshot_restart(
    stack: Stack,
) -> None:
    """The copy billed first was read from the rerouted topic, the conflicting one from
    the usage topic in a later batch: a rebuild that read the usage topic first would
    keep the wrong fingerprint. After a rebuild from the topics (snapshots removed) and
    after a restart from a snapshot, a copy of the billed one is a duplicate and a copy
    of the other a conflict, as on the live worker."""
    rid = "rebuilt-1"
    billed_copy = usage(rid, input_tokens=100)
    other_copy = usage(rid, input_tokens=999)
    worker = stack.worker().start()
    worker.wait_assigned()
    stack.publish([billed_copy], partitions=[away(rid)])  # rerouted to its home
    wait_for(lambda: billed(stack) == (1, 100), 60, "the rerouted copy billed")
    stack.publish([other_copy], partitions=[home(rid)])
    wait_for(lambda: metric(worker, CONFLICTS) == 1, 60, "the conflict")
    wait_for(lambda: stack.records_committed() == 2, 30, "both records committed")
    worker.kill()
    shutil.rmtree(Path(stack.env["DATA_DIR"]) / "snapshots", ignore_errors=True)

    rebuilt = stack.worker(WEB_PORT=worker.env["WEB_PORT"]).start()
    rebuilt.wait_assigned()
    wait_for(
        lambda: metric(rebuilt, "usage_stream_rebuild_ids_total{source=topics}") == 1,
        60,
        "the id read back from the topics",
    )
    stack.publish([billed_copy, other_copy], partitions=[home(rid), home(rid)])
    wait_for(
        lambda: metric(rebuilt, DUPLICATES) == 1 and metric(rebuilt, CONFLICTS) == 1,
        60,
        "one duplicate and one conflict after the rebuild",
    )
    assert rebuilt.stop() == 0  # a clean stop writes a snapshot

    restarted = stack.worker(WEB_PORT=worker.env["WEB_PORT"]).start()
    restarted.wait_assigned()
    wait_for(
        lambda: metric(restarted, "usage_stream_rebuild_ids_total{source=snapshot}") == 1,
        60,
        "the id loaded from the snapshot",
    )
    assert metric(restarted, "usage_stream_rebuild_ids_total{source=topics}") == 0
    stack.publish([other_copy, billed_copy], partitions=[away(rid), away(rid)])
    wait_for(
        lambda: metric(restarted, DUPLICATES) == 1 and metric(restarted, CONFLICTS) == 1,
        60,
        "one duplicate and one conflict after the snapshot restart",
    )
    assert billed(stack) == (1, 100)
    assert len(dead_letters(stack, 3)) == 3


def test_a_replay_bills_the_copy_the_worker_billed(stack: Stack) -> None:
    """The copy billed was read from the rerouted topic in an earlier batch than the
    conflicting copy at home in the usage topic. A replay, which reads the usage slice
    before the rerouted one, leaves out the copy the worker dead-lettered and bills what
    the worker billed; twice, the same."""
    rid = "replayed-1"
    day = "2026-11-20"
    worker = stack.worker().start()
    worker.wait_assigned()
    stack.publish([usage(rid, input_tokens=100)], partitions=[away(rid)])
    wait_for(lambda: billed(stack) == (1, 100), 60, "the rerouted copy billed")
    stack.publish([usage(rid, input_tokens=999)], partitions=[home(rid)])
    wait_for(lambda: metric(worker, CONFLICTS) == 1, 60, "the conflict")
    wait_for(lambda: stack.records_committed() == 2, 30, "both records committed")
    (letter,) = dead_letters(stack, 1)
    assert letter[0] == usage(rid, input_tokens=999)

    def daily() -> list[tuple[int, int]]:
        return stack.query(
            "SELECT requests, input_tokens FROM usage_daily WHERE usage_date = ?", (day,)
        )

    # twice, then from offsets (the dead letters are then read whole)
    whole = ",".join(f"{p}:0" for p in range(PARTITIONS))
    for extra in ([], [], ["--from-offsets", whole]):
        done = stack.cli("replay", "--date", day, *extra, timeout=180)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        assert daily() == [(1, 100)]
    assert billed(stack) == (1, 100)
    assert worker.stop() == 0


def _snapshot_files(stack: Stack) -> list[Path]:
    return sorted((Path(stack.env["DATA_DIR"]) / "snapshots").rglob("p*.npz"))


def test_a_restart_loads_the_snapshot_and_reads_only_the_tail(stack: Stack) -> None:
    first = [f"snap-{i}" for i in range(400)]
    tail = [f"tail-{i}" for i in range(100)]
    worker = stack.worker().start()
    worker.wait_assigned()
    stack.publish([usage(rid, i) for i, rid in enumerate(first)])
    wait_for(lambda: billed(stack)[0] == 400, 90, "400 requests billed")
    assert worker.stop() == 0
    assert "seen-set snapshot of" in worker.log_path.read_text()
    assert _snapshot_files(stack), "a clean stop writes snapshots"

    # loads the snapshots, reads nothing back; then bills a tail and dies without one
    second = stack.worker(WEB_PORT=worker.env["WEB_PORT"]).start()
    second.wait_assigned()
    wait_for(
        lambda: metric(second, "usage_stream_rebuild_ids_total{source=snapshot}") == 400,
        60,
        "400 ids loaded",
    )
    assert metric(second, "usage_stream_rebuild_ids_total{source=topics}") == 0
    stack.publish([usage(rid, i) for i, rid in enumerate(tail)])
    wait_for(lambda: billed(stack)[0] == 500, 90, "the tail billed")
    wait_for(lambda: stack.records_committed() == 500, 30, "the tail committed")
    second.kill()

    third = stack.worker(WEB_PORT=worker.env["WEB_PORT"]).start()
    third.wait_assigned()
    wait_for(
        lambda: (
            metric(third, "usage_stream_rebuild_ids_total{source=snapshot}") == 400
            and metric(third, "usage_stream_rebuild_ids_total{source=topics}") == 100
        ),
        60,
        "400 ids loaded and only the 100 of the tail read back",
    )
    assert "ids loaded from a snapshot" in third.log_path.read_text()
    stack.publish([usage(rid, i) for ids in (first, tail) for i, rid in enumerate(ids)])
    wait_for(lambda: metric(third, DUPLICATES) == 500, 60, "every copy a duplicate")
    assert billed(stack)[0] == 500
    assert metric(third, CONFLICTS) == 0


def test_a_damaged_snapshot_is_ignored_and_the_state_rebuilt_from_the_topics(
    stack: Stack,
) -> None:
    ids = [f"dmg-{i}" for i in range(200)]
    worker = stack.worker().start()
    worker.wait_assigned()
    stack.publish([usage(rid, i) for i, rid in enumerate(ids)])
    wait_for(lambda: billed(stack)[0] == 200, 90, "200 requests billed")
    assert worker.stop() == 0
    files = _snapshot_files(stack)
    assert files
    for path in files:  # every one truncated: none may be trusted
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    restarted = stack.worker(WEB_PORT=worker.env["WEB_PORT"]).start()
    restarted.wait_assigned()
    wait_for(
        lambda: metric(restarted, "usage_stream_rebuild_ids_total{source=topics}") == 200,
        60,
        "200 ids read back from the topics",
    )
    assert metric(restarted, "usage_stream_rebuild_ids_total{source=snapshot}") == 0
    log = restarted.log_path.read_text()
    assert "seen-set snapshot" in log and "ignored" in log
    stack.publish([usage(rid, i) for i, rid in enumerate(ids)])
    wait_for(lambda: metric(restarted, DUPLICATES) == 200, 60, "every copy a duplicate")
    assert billed(stack)[0] == 200
