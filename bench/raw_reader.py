"""The ceiling: a plain aiokafka consumer (``getmany``) decoding every value with orjson.

Run as its own process by bench/run.py, so its peak RSS is its own and not the
benchmark's (which holds the whole workload in memory). Prints one JSON object:
``{"records", "seconds", "not_json", "samples": [[t, records], ...]}``, timed from the
first record received to the last, like the Faust no-op.

    python bench/raw_reader.py BOOTSTRAP TOPIC PARTITIONS RECORDS [TIMEOUT_SECONDS]
"""

from __future__ import annotations

import asyncio
import sys
import time

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

SAMPLE_SECONDS = 0.5


async def read(
    bootstrap: str, topic: str, partitions: int, expected: int, timeout: float
) -> dict[str, object]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        await consumer.seek_to_beginning()
        seen = not_json = 0
        first = last_sample = 0.0
        samples: list[list[float]] = []
        deadline = time.monotonic() + timeout
        while seen < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"read {seen} of {expected} records in {timeout:.0f} s")
            batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for records in batches.values():
                if not first and records:
                    first = last_sample = time.perf_counter()
                    samples.append([0.0, 0])
                for record in records:
                    try:
                        orjson.loads(record.value)
                    except orjson.JSONDecodeError:
                        not_json += 1
                seen += len(records)
            now = time.perf_counter()
            if first and now - last_sample >= SAMPLE_SECONDS:
                samples.append([now - first, seen])
                last_sample = now
        elapsed = time.perf_counter() - first
        samples.append([elapsed, seen])
        return {"records": seen, "seconds": elapsed, "not_json": not_json, "samples": samples}
    finally:
        await consumer.stop()


def main() -> None:
    bootstrap, topic = sys.argv[1], sys.argv[2]
    partitions, expected = int(sys.argv[3]), int(sys.argv[4])
    timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 600.0
    result = asyncio.run(read(bootstrap, topic, partitions, expected, timeout))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
