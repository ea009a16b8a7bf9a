"""End to end on real components: kcat and aiokafka producers → Tansu → worker → raw sink.

Covers validation and the dead-letter topic, deduplication across partitions (producers
keying by request_id, by something else, or by nothing), exact raw points in a real
InfluxDB 1.x, metrics, and a worker restart that must keep dropping old duplicates.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson

from streams.sinks.lineprotocol import sub_ms
from tests.e2e.kcat import kcat_produce
from tests.harness import Stack, consume_all, wait_for
from tests.servers import influxd_server

BASE_MS = 1_795_169_472_000  # 2026-11-20T10:11:12Z


def usage(request_id: str, offset_ms: int = 0, **extra: object) -> bytes:
    body = {
        "request_id": request_id,
        "client_org_id": f"org-{int(request_id.split('-')[-1]) % 3}",
        "user_id": "user-1",
        "model": "openai/gpt-4o-mini",
        "input_tokens": 100,
        "output_tokens": 10,
        "cost_usd": "0.000123456",
        "timestamp": BASE_MS + offset_ms,
        **extra,
    }
    return orjson.dumps(body)


INVALID = [
    (b"this is not json", "not_json"),
    (b"[1,2,3]", "not_object"),
    (orjson.dumps({"request_id": "bad-1"}), "missing_field"),
    (usage("bad-2", input_tokens=-5), "bad_value"),
    (usage("bad-3", timestamp=BASE_MS * 2), "future_timestamp"),
]


def raw_lines(stack: Stack) -> list[str]:
    raw_dir = Path(stack.env["DATA_DIR"]) / "raw"
    return [
        line
        for path in sorted(raw_dir.glob("*.lp"))
        for line in path.read_text().splitlines()
        if line and not line.startswith("#")
    ]


def test_kcat_and_aiokafka_events_are_validated_deduplicated_and_written(
    stack: Stack, tmp_path: Path
) -> None:
    with influxd_server() as influx:
        influx.create_database("usage")
        worker = stack.worker(INFLUXDB_URL=influx.url, INFLUXDB_DATABASE="usage").start()
        worker.wait_assigned()

        # kcat: 40 events keyed by request_id, 10 of them retried with the same key
        kcat_lines = [f"req-{i}".encode() + b"\t" + usage(f"req-{i}", i) for i in range(40)]
        kcat_lines += kcat_lines[:10]
        # and the invalid ones, unkeyed
        kcat_lines += [value for value, _ in INVALID]
        kcat_produce(stack.broker.port, stack.topic, kcat_lines, tmp_path)

        # aiokafka: 20 new events, plus copies of kcat's on *other* partitions, keyed by
        # something else or by nothing
        values = [usage(f"req-{i}", i) for i in range(40, 60)]
        keys: list[bytes | None] = [f"req-{i}".encode() for i in range(40, 60)]
        partitions: list[int | None] = [None] * 20
        for i in range(15):
            for partition in range(4):
                values.append(usage(f"req-{i}", i))
                keys.append(None if partition % 2 else b"some-other-key")
                partitions.append(partition)
        stack.publish(values, keys, partitions)

        total = len(kcat_lines) + len(values)
        duplicates = 10 + 15 * 4
        # (a copy read away from its home partition is judged where the rerouted topic
        # delivers it, possibly a batch after every usage record was consumed: the
        # duplicates are waited for too)
        wait_for(
            lambda: (
                (m := worker.metrics()).get("usage_stream_raw_points_written_total") == 60
                and m.get("usage_stream_events_consumed_total") == total
                and m.get("usage_stream_events_duplicate_total") == duplicates
            ),
            60,
            "all events to be consumed and judged, and 60 raw points written",
        )
        metrics = worker.metrics()
        assert metrics["usage_stream_events_duplicate_total"] == duplicates
        for _, reason in INVALID:
            assert metrics[f"usage_stream_events_invalid_total{{reason={reason}}}"] == 1
        assert metrics["usage_stream_raw_write_errors_total"] == 0
        assert metrics["usage_stream_raw_sink_circuit_open"] == 0

        # exactly the 60 unique requests, each once, with its deterministic timestamp
        # (raw_points_written counts only points InfluxDB acknowledged)
        rows = influx.rows("usage")
        assert sorted(row["request_id"] for row in rows) == sorted(f"req-{i}" for i in range(60))
        for row in rows:
            i = int(row["request_id"].split("-")[1])
            assert row["time"] == (BASE_MS + i) * 1_000_000 + sub_ms(row["request_id"])
            assert row["input_tokens"] == 100 and row["total_tokens"] == 110
            assert row["cost_usd"] == 0.000123456
            assert row["markup_cost_usd"] == 0.000160493  # 160492.8 nano, rounded half-even
            assert row["client_org_id"] == f"org-{i % 3}"

        # the dead-letter topic holds the original bytes with the reason and origin
        dead = asyncio.run(consume_all(stack.broker, stack.topic + "-dlq", len(INVALID)))
        assert sorted(record.value for record in dead) == sorted(v for v, _ in INVALID)
        for record in dead:
            headers = dict(record.headers)
            reason = dict(INVALID)[record.value]
            assert headers["error"].decode().startswith(reason + ": ")
            topic, partition, offset = headers["source-offset"].decode().rsplit("/", 2)
            assert topic == stack.topic and 0 <= int(partition) < 4 and int(offset) >= 0
        assert worker.alive()


def test_restart_keeps_dropping_duplicates_seen_before(stack: Stack) -> None:
    worker = stack.worker().start()
    worker.wait_assigned()
    stack.publish([usage(f"old-{i}", i) for i in range(30)])
    wait_for(lambda: len(raw_lines(stack)) == 30, 60, "30 raw points")
    assert worker.stop() == 0

    restarted = stack.worker(WEB_PORT=worker.env["WEB_PORT"]).start()
    restarted.wait_assigned()
    # copies of the old events, on every partition, plus 10 new events
    copies = [usage(f"old-{i}", i) for i in range(30)]
    stack.publish(copies * 2, partitions=[p % 4 for p in range(60)])
    stack.publish([usage(f"new-{i}", i) for i in range(10)])
    # (copies read away from their home partition are counted as duplicates where the
    # rerouted topic delivers them, possibly a batch after the usage records)
    wait_for(
        lambda: (
            restarted.metrics().get("usage_stream_events_consumed_total") == 70
            and restarted.metrics().get("usage_stream_events_duplicate_total", 0) >= 60
        ),
        60,
        "70 events consumed and 60 duplicates dropped after the restart",
    )
    wait_for(lambda: len(raw_lines(stack)) >= 40, 30, "40 raw points")
    # the restarted worker resumed at the positions committed with the last batch (the
    # chain heads the summary writer stored with the sums: 100 usage records in all)
    wait_for(lambda: stack.records_committed() == 100, 30, "100 records committed")
    metrics = restarted.metrics()
    assert metrics["usage_stream_events_duplicate_total"] == 60
    assert metrics["usage_stream_raw_points_written_total"] == 10
    # the dedupe state, rebuilt from the topics after the restart, remembered the old
    # requests: no second raw point, and every request billed exactly once
    lines = raw_lines(stack)
    assert len(lines) == len(set(lines)) == 40
    # (the sums of copies delivered by the rerouted topic may be committed a batch later)
    wait_for(lambda: stack.billed_requests() == 40, 30, "40 requests billed")
    assert restarted.metrics()["usage_stream_events_duplicate_total"] == 60


def test_influxdb_outage_loses_nothing_and_the_circuit_closes_again(stack: Stack) -> None:
    with influxd_server() as influx:
        influx.create_database("usage")
        worker = stack.worker(INFLUXDB_URL=influx.url, INFLUXDB_DATABASE="usage").start()
        worker.wait_assigned()
        stack.publish([usage(f"before-{i}", i) for i in range(20)])
        wait_for(lambda: len(influx.rows("usage")) == 20, 60, "20 points before the outage")

        influx.stop()
        stack.publish([usage(f"during-{i}", i) for i in range(30)])
        wait_for(
            lambda: worker.metrics().get("usage_stream_raw_sink_circuit_open") == 1,
            60,
            "the circuit breaker to open",
        )
        # billing does not wait for InfluxDB: the points wait in the local spool
        wait_for(lambda: stack.billed_requests() == 50, 30, "billed")
        assert worker.metrics()["usage_stream_raw_spool_points"] > 0
        influx.start()
        wait_for(
            lambda: (
                worker.metrics().get("usage_stream_raw_sink_circuit_open") == 0
                and worker.metrics().get("usage_stream_raw_points_written_total") == 50
            ),
            60,
            "the circuit to close and every point to be written",
        )
        rows = influx.rows("usage")
        ids = [row["request_id"] for row in rows]
        assert len(ids) == len(set(ids)) == 50
        assert worker.metrics()["usage_stream_raw_write_errors_total"] >= 3
        # every record committed, every request billed once
        wait_for(lambda: stack.records_committed() == 50, 30, "50 records committed")
        assert stack.billed_requests() == 50


def test_dedupe_lasts_the_ttl_and_an_expired_id_counts_as_new(stack: Stack) -> None:
    """A copy within DEDUP_TTL_DAYS is dropped, also late in the TTL; after it the
    request is forgotten (state stays bounded), so a copy arriving later counts as new,
    as the contract allows ("at least DEDUP_TTL_DAYS").

    The dedupe state is the worker's in-memory set per home partition now (no SQLite
    ledger whose rows could be counted and seen pruned), so what this observes is the
    outcome: the raw points, the duplicate metric and the billed totals."""
    ttl = 16.0  # seconds; ids expire in whole buckets of ttl/8, pruned every second
    worker = stack.worker(DEDUP_TTL_DAYS=str(ttl / 86_400)).start()
    worker.wait_assigned()
    stack.publish([usage("ttl-1", 1)])
    wait_for(lambda: len(raw_lines(stack)) == 1, 60, "the first point", step=0.05)
    # the id is recorded when its batch is committed, after its raw point is written
    written = time.monotonic()
    wait_for(lambda: stack.billed_requests() == 1, 30, "the first request billed")
    committed = time.monotonic()  # the id was recorded by now

    time.sleep(max(0.0, written + ttl / 2 - time.monotonic()))
    stack.publish([usage("ttl-1", 1)])  # half-way through the TTL: dropped
    wait_for(lambda: worker.metrics()["usage_stream_events_duplicate_total"] == 1, 30, "dup 1")
    assert time.monotonic() < written + ttl, "the copy came too late to prove the TTL"
    wait_for(lambda: stack.records_committed() == 2, 30, "the copy committed")
    assert len(raw_lines(stack)) == 1
    assert stack.billed_requests() == 1

    # forgotten at most one bucket (ttl/8) after the TTL, plus a prune interval (1 s)
    time.sleep(max(0.0, committed + ttl * 9 / 8 + 2 - time.monotonic()))
    stack.publish([usage("ttl-1", 1)])  # past the TTL: a new event again
    wait_for(lambda: len(raw_lines(stack)) == 2, 30, "the second point")
    lines = raw_lines(stack)
    assert lines[0] == lines[1]  # the same point, written again
    assert worker.metrics()["usage_stream_events_duplicate_total"] == 1
    # and billed again: the same request counts twice once it expired (a copy read away
    # from its home partition is billed where the rerouted topic delivers it, so the
    # usage record's commit may come a batch before its sums)
    wait_for(lambda: stack.records_committed() == 3, 30, "the third record committed")
    wait_for(lambda: stack.billed_requests() == 2, 30, "the request billed again")
    assert worker.metrics()["usage_stream_events_duplicate_total"] == 1


def test_a_batch_waits_to_fill_unless_it_reaches_the_end_of_a_backlog(stack: Stack) -> None:
    """RAW_BATCH_SECONDS is the longest a batch waits for more records: a light load
    waits it out, but a batch that already fills a raw-sink request (RAW_BATCH_SIZE) and
    has read every owned partition to its end is closed at once."""
    worker = stack.worker(RAW_BATCH_SECONDS="40", RAW_BATCH_SIZE="200").start()
    worker.wait_assigned()

    def publish(ids: list[str]) -> None:  # keyed by request id, as producers are told
        stack.publish([usage(i, n) for n, i in enumerate(ids)], keys=[i.encode() for i in ids])

    publish([f"light-{i}" for i in range(50)])
    time.sleep(6)
    assert stack.records_committed() == 0, "a batch of 50 (< RAW_BATCH_SIZE) waits to fill"
    published = time.monotonic()
    publish([f"backlog-{i}" for i in range(450)])
    # the same batch now holds at least RAW_BATCH_SIZE more records, every partition read
    # to its end: without the early close it would wait until ~40 s after it began. (On a
    # loaded machine the fetch may reach the end before the producer is done: the batch
    # then closes with what it has, and the rest, under RAW_BATCH_SIZE, waits its 40 s.)
    wait_for(lambda: stack.records_committed() >= 250, 25, "a full batch committed early")
    assert time.monotonic() - published < 25
    wait_for(lambda: stack.records_committed() == 500, 60, "the rest committed")
    assert len(raw_lines(stack)) == 500
    assert worker.metrics()["usage_stream_events_duplicate_total"] == 0
    assert worker.stop() == 0
