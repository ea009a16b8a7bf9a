"""Restart cost of a home partition's dedupe state, with and without a seen-set snapshot.

    .venv/bin/python bench/rebuild_time.py [--ids 1000000 5000000] [--tail 50000] [--json OUT]

For each N: a Tansu broker in memory, one partition of the usage topic holding N valid
events (canonical UUID ids, all at home), and a batch-log chain over them (one entry per
5,000 records, with real record marks), as a worker would have left them. Then the real
:class:`agents.hot_path.home_state.Rebuilder`, in this process:

1. ``catch_up(None, 0)`` with no snapshot: the state read back from the topics (what
   every restart cost before snapshots); it then writes its snapshot (timed apart);
2. a tail of ``--tail`` more events and entries is appended, and ``catch_up(None, 0)``
   runs again: it loads the snapshot and reads only the tail.

Prints (and writes as JSON) the seconds of each, ids per second, the snapshot's size on
disk and the state's memory per id. Group membership is not part of it: that is the
transitions benchmark's (issue 20 items 1-2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from aiokafka import AIOKafkaProducer  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402

from agents.hot_path.home_state import Rebuilder  # noqa: E402
from streams.kafka.batch_log import BatchEntry, encode  # noqa: E402
from streams.kafka.broker import EmbeddedBroker  # noqa: E402
from streams.settings import Settings  # noqa: E402

BATCH = 5_000
STAMP_MS = int(time.time() * 1000) - 3_600_000  # an hour ago: within every retention


def event(i: int) -> bytes:
    request_id = str(uuid.UUID(int=(i * 0x9E3779B97F4A7C15 + 12345) % (1 << 128)))
    return (
        b'{"request_id":"'
        + request_id.encode()
        + b'","client_org_id":"org-'
        + str(i % 50).encode()
        + b'","user_id":"user-'
        + str(i % 977).encode()
        + b'","model":"openai/gpt-4o-mini","input_tokens":'
        + str(100 + i % 1000).encode()
        + b',"output_tokens":10,"cost_usd":"0.000123456","timestamp":'
        + str(STAMP_MS).encode()
        + b"}"
    )


async def append(settings: Settings, start: int, count: int, head: list[int]) -> None:
    """Events ``start..start+count`` to usage partition 0, and the chain entries over
    them (``head``: [entry offset, usage_next] of the chain so far, updated)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.KAFKA_BROKER.removeprefix("kafka://"),
        max_batch_size=1_000_000,
        max_request_size=4_000_000,
        linger_ms=20,
    )
    await producer.start()
    try:
        pending = []
        batch = producer.create_batch()
        last = b""
        for i in range(start, start + count):
            last = event(i)
            if batch.append(key=None, value=last, timestamp=STAMP_MS) is None:
                batch.close()
                pending.append(await producer.send_batch(batch, settings.USAGE_TOPIC, partition=0))
                batch = producer.create_batch()
                batch.append(key=None, value=last, timestamp=STAMP_MS)
            if len(pending) > 50:
                await asyncio.gather(*pending)
                pending = []
        batch.close()
        pending.append(await producer.send_batch(batch, settings.USAGE_TOPIC, partition=0))
        await asyncio.gather(*pending)
        for first in range(start, start + count, BATCH):
            end = min(first + BATCH, start + count)
            mark = f"{STAMP_MS}:{zlib.crc32(event(end - 1)):08x}"
            entry = BatchEntry(head[0], head[1], end, 0, 0, STAMP_MS, [], "bench", False, mark)
            sent = await (await producer.send(settings.batch_log_topic, encode(entry), partition=0))
            head[0], head[1] = sent.offset, end
    finally:
        await producer.stop()


async def measure(settings: Settings, ids: int, tail: int) -> dict:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.KAFKA_BROKER.removeprefix("kafka://"))
    await admin.start()
    await admin.create_topics(
        [
            NewTopic(name, 1, 1)
            for name in (settings.USAGE_TOPIC, settings.rerouted_topic, settings.batch_log_topic)
        ]
    )
    await admin.close()
    head = [-1, 0]
    started = time.perf_counter()
    await append(settings, 0, ids, head)
    produced = time.perf_counter() - started

    rebuilder = Rebuilder(settings, 1)
    assert rebuilder.snapshots is not None
    try:
        started = time.perf_counter()
        state = await rebuilder.catch_up(None, 0)
        full = time.perf_counter() - started
        assert len(state.seen) == ids, (len(state.seen), ids)
        memory = state.seen.approx_bytes()
        started = time.perf_counter()
        await rebuilder.snapshots.settle(600)
        written = time.perf_counter() - started  # (the write began inside catch_up)
        files = sorted(rebuilder.snapshots.folder.glob("p0-*.npz"))
        size = files[-1].stat().st_size
        del state

        await append(settings, ids, tail, head)
        started = time.perf_counter()
        state = await rebuilder.catch_up(None, 0)
        restart = time.perf_counter() - started
        assert len(state.seen) == ids + tail
        await rebuilder.snapshots.settle(600)
    finally:
        await rebuilder.stop()
    result = {
        "ids": ids,
        "tail": tail,
        "produce_seconds": round(produced, 1),
        "rebuild_from_topics_seconds": round(full, 2),
        "rebuild_ids_per_second": round(ids / full),
        "snapshot_write_wait_seconds": round(written, 2),
        "snapshot_bytes": size,
        "snapshot_bytes_per_id": round(size / ids, 2),
        "memory_bytes_per_id": round(memory / ids, 2),
        "restart_with_snapshot_seconds": round(restart, 2),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--tail", type=int, default=50_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    for ids in args.ids:
        with (
            tempfile.TemporaryDirectory() as data,
            EmbeddedBroker(log_path=Path(data) / "tansu.log") as broker,
        ):
            os.environ.pop("INFLUXDB_URL", None)
            settings = Settings(
                KAFKA_BROKER=broker.url,
                APP_ID=f"rebuild-bench-{ids}",
                USAGE_TOPIC=f"rebuild-bench-{ids}",
                USAGE_TOPIC_PARTITIONS=1,
                DATA_DIR=Path(data) / "data",
            )
            results.append(asyncio.run(measure(settings, ids, args.tail)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
