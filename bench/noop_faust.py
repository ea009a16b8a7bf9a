"""The baseline: a do-nothing Faust agent on the usage topic (run by bench/run.py): what
Faust's per-message path alone costs on this machine.

BENCH_BROKER=kafka://127.0.0.1:PORT BENCH_TOPIC=t BENCH_COUNT=N python bench/noop_faust.py worker

Prints ``NOOP_PROGRESS <seen> <seconds since the first message>`` every half second (the
benchmark's events/s-over-time plot) and ``NOOP_RESULT <seen> <seconds>`` at the end, then
exits at once; Faust redirects print() into its log, so the caller reads them from there.
"""

from __future__ import annotations

import os
import time

import faust

app = faust.App(
    f"bench-noop-{os.getpid()}",
    broker=os.environ["BENCH_BROKER"],
    store="memory://",
    datadir=os.environ.get("BENCH_DATADIR", "bench-noop-data"),
    web_enabled=False,
    consumer_auto_offset_reset="earliest",
    broker_session_timeout=10,
    broker_rebalance_timeout=10,
    broker_heartbeat_interval=1,
)
topic = app.topic(os.environ["BENCH_TOPIC"], value_type=bytes, value_serializer="raw")
EXPECTED = int(os.environ["BENCH_COUNT"])
SAMPLE_SECONDS = 0.5
seen = 0
first = 0.0
last_sample = 0.0


@app.agent(topic)
async def noop(stream: faust.StreamT) -> None:
    global seen, first, last_sample
    async for _ in stream:
        now = time.perf_counter()
        if not seen:
            first = last_sample = now
        seen += 1
        if now - last_sample >= SAMPLE_SECONDS:
            last_sample = now
            print(f"NOOP_PROGRESS {seen} {now - first:.3f}", flush=True)
        if seen == EXPECTED:
            elapsed = time.perf_counter() - first
            print(f"NOOP_RESULT {seen} {elapsed:.3f}", flush=True)
            os._exit(0)


if __name__ == "__main__":
    app.main()
