"""Peak RSS and seconds of closing one date of many keys (``rollup_day``), alone.

    nice -n 19 .venv/bin/python bench/rollup_memory.py [--keys 289000] [--stored 0]
        [--chunk N] [--open] [--code DIR]

Fills a summary DB (the project's migrations) with one date of ``--keys`` pending keys
shaped like the many-keys workload's (40 organisations, end users, 5 models; key ids in
an order unrelated to key order), ``--stored`` of them already in ``usage_daily`` from an
earlier close (so that they merge), then closes the date in a fresh process and prints
that process's RSS before the close, its peak (``VmHWM``) and the close's seconds.
``--open`` refreshes the date's provisional rows instead (``refresh_open_days``, every
key dirty); ``--chunk N`` sets ``CHUNK_KEYS``; ``--code DIR`` imports the project from another
checkout (e.g. the main one, to compare with the code before a change).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

DAY = "2026-11-20"
EARLIER = "2026-11-19"
MODELS = (
    "openai/gpt-4o-mini",
    "openai/gpt-4o",
    "anthropic/claude-3.5-sonnet",
    "anthropic/claude-3-haiku",
    "google/gemini-1.5-pro",
)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


async def _fill(path: Path, keys: int, stored: int) -> None:
    from tables.summary_db.schema import connect
    from tables.summary_db.summary_store import rollup_day

    rng = random.Random(21)
    names = sorted(
        {(f"org-{rng.randrange(40)}", f"user-{rng.randrange(10**7)}", rng.choice(MODELS))
         for _ in range(keys * 2)}
    )[:keys]  # fmt: skip
    rng.shuffle(names)
    conn = await connect(path)
    try:
        await conn.executemany(
            "INSERT INTO summary_keys (client_org_id, user_id, model) VALUES (?, ?, ?)", names
        )
        rows = [
            (key_id, rng.randrange(1, 5000), rng.randrange(1, 5000), 3, 1, rng.randrange(10**9))
            for key_id in range(1, keys + 1)
        ]
        if stored:
            await conn.executemany(
                f"INSERT INTO daily_pending VALUES ('{DAY}', ?, ?, ?, ?, ?, ?, 0, 1)",
                rows[:stored],
            )
            await conn.commit()
            await rollup_day(conn, DAY, Decimal("1.3"), _no_rate)
        await conn.executemany(
            f"INSERT INTO daily_pending VALUES ('{DAY}', ?, ?, ?, ?, ?, ?, 0, 1)", rows
        )
        await conn.commit()
    finally:
        await conn.close()


async def _no_rate(conn: object, day: object) -> None:
    return None


async def _close(path: Path, chunk: int | None, open_day: bool) -> None:
    from tables.summary_db import summary_store
    from tables.summary_db.schema import connect
    from tables.summary_db.summary_store import refresh_open_days, rollup_day

    if chunk is not None:
        summary_store.CHUNK_KEYS = chunk  # type: ignore[attr-defined]  # absent before chunks

    conn = await connect(path)
    try:
        before_kb = _status_kb("VmRSS")
        started = time.perf_counter()
        if open_day:
            rows = await refresh_open_days(conn, [DAY], Decimal("1.3"), _no_rate)
        else:
            rows = (await rollup_day(conn, DAY, Decimal("1.3"), _no_rate)).summaries_written
        seconds = time.perf_counter() - started
    finally:
        await conn.close()
    print(
        f"{Path(rollup_day.__code__.co_filename).parents[2].name}"
        f" {'refresh_open_days' if open_day else 'rollup_day'}: {rows} rows in {seconds:.2f} s;"
        f" RSS {before_kb / 1024:.0f} MB before, peak {_status_kb('VmHWM') / 1024:.0f} MB"
        f" (+{(_status_kb('VmHWM') - before_kb) / 1024:.0f} MB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=289_000)
    parser.add_argument("--stored", type=int, default=0)
    parser.add_argument("--chunk", type=int)
    parser.add_argument("--open", action="store_true")
    parser.add_argument("--code", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--close", type=Path, help=argparse.SUPPRESS)  # the child's DB
    args = parser.parse_args()
    sys.path.insert(0, str(args.code.resolve()))
    if args.close is not None:
        asyncio.run(_close(args.close, args.chunk, args.open))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "usage.db"
        asyncio.run(_fill(path, args.keys, args.stored))
        command = [sys.executable, __file__, "--code", str(args.code), "--close", str(path)]
        if args.chunk is not None:
            command += ["--chunk", str(args.chunk)]
        if args.open:
            command.append("--open")
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
