"""Time the replay's replace alone (tables/summary_db/replay_store.py :func:`replace_day`) on a
many-keys date: ``--keys`` rows (289,301 as in ``bench/run.py --workload many-keys`` at
1M events), 40 organisations, each end user in one, 5 models, the price book's default
multiplier and an NBP rate. Three passes on a fresh summary DB (WAL, the real
migrations): ``added`` (the date's rows all new: the benchmark's replay, whose date is
still pending), ``same`` (the same totals again: nothing changes) and ``changed`` (every
row's cost moved). Reports wall and process CPU seconds (aiosqlite's thread included)
and the replace's own steps.

    .venv/bin/python bench/replace_time.py [--keys N] [--db DIR]

To compare with another commit, run the same file with that commit's packages first on
``PYTHONPATH`` (``git archive REV tables streams | tar -x -C /tmp/rev``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from decimal import Decimal
from inspect import signature
from pathlib import Path

import tables.summary_db.replay_store as replay_store
from tables.summary_db.replay_store import replace_day
from tables.summary_db.schema import connect
from tables.summary_db.summary_store import SummaryRow

DAY = "2026-11-28"
#: what a real run lists (agents/replay/run.py LIST_CHANGES), where the replace takes it
_LISTED = {"list_changes": 20} if "list_changes" in signature(replace_day).parameters else {}
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet", "claude-3-haiku", "gemini-1.5-pro")


class _Rate:
    mid = Decimal("4.0123")
    table_no = "230/A/NBP/2026"


def _totals(keys: int, shift: int) -> list[SummaryRow]:
    rng = random.Random(7)
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < keys:
        chosen.add((rng.randrange(keys // 2), rng.randrange(len(MODELS))))
    rows = []
    for user, model in chosen:
        inp, out = rng.randrange(10, 50_000), rng.randrange(10, 5_000)
        rows.append(
            SummaryRow(
                f"org-{user % 40}",
                f"user-{user}",
                MODELS[model],
                DAY,
                inp,
                out,
                rng.randrange(1, 5),
                rng.randrange(0, 2),
                rng.randrange(1, 10**9) + shift,
            )
        )
    return rows


async def _pass(path: Path, totals: list[SummaryRow]) -> dict[str, object]:
    conn = await connect(path)
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        outcome = await replace_day(
            conn,
            totals,
            DAY,
            Decimal("1.3"),
            dry_run=False,
            started_at="2026-11-29T00:00:00.000000Z",
            records_processed=len(totals),
            **_LISTED,
        )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        await conn.close()
    counts = {kind: outcome.count(kind) for kind in ("added", "changed", "removed")}
    steps = {step: round(seconds, 2) for step, seconds in outcome.timings.items()}
    return {"wall": round(wall, 2), "cpu": round(cpu, 2), "counts": counts, "steps": steps}


async def _main(keys: int, directory: Path) -> None:
    async def fixed_rate(_conn: object, _day: object) -> _Rate:
        return _Rate()

    replay_store.rate_for_date = fixed_rate  # type: ignore[assignment]
    path = directory / "usage.db"
    await (await connect(path)).close()
    first, moved = _totals(keys, 0), _totals(keys, 1)
    print(json.dumps({"code": replay_store.__file__}))
    for name, totals in (("added", first), ("same", first), ("changed", moved)):
        print(json.dumps({"pass": name, "rows": len(totals), **await _pass(path, totals)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=289_301)
    parser.add_argument("--db", type=Path, default=None, help="directory for the DB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.db) as directory:
        asyncio.run(_main(args.keys, Path(directory)))


if __name__ == "__main__":
    main()
