"""Test data, ground truth and inspection helpers for the scale-out tests (issue 9).

Independent of the pipeline's code: home partitions come from aiokafka's own murmur2 (what
its default partitioner does with a key), money from Decimal, dates from zoneinfo.
"""

from __future__ import annotations

import gzip
import os
import random
import re
import time
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import orjson
from aiokafka.partitioner import murmur2

from tests.ground_truth import WARSAW, local_midnight_ms
from tests.ground_truth import ground_truth as expected_rows
from tests.harness import Stack, Worker, wait_for

PARTITIONS = 4
MODELS = ["openai/gpt-4o-mini", "anthropic/claude-3.5-sonnet", "meta/llama-3-70b"]
COLUMNS = (
    "input_tokens, output_tokens, total_tokens, requests, estimated_requests,"
    " raw_cost_nano, markup_cost_nano, markup_cost_pln_nano, usd_pln_rate"
)
Record = tuple[bytes, bytes | None, int | None]  # value, key, partition (None: by key)


# Events and ground truth ---------------------------------------------------------------


def local_today() -> date:
    return datetime.now(WARSAW).date()


def home(request_id: str) -> int:
    """The partition aiokafka's default partitioner gives a record keyed by request_id."""
    return (murmur2(request_id.encode()) & 0x7FFFFFFF) % PARTITIONS


def homed(tag: str, partition: int, count: int) -> list[str]:
    """``count`` request ids whose home partition is ``partition``."""
    found: list[str] = []
    i = 0
    while len(found) < count:
        candidate = f"{tag}-{i}"
        if home(candidate) == partition:
            found.append(candidate)
        i += 1
    return found


def make_event(request_id: str, moment_ms: int, rng: random.Random) -> dict:
    """One valid event at ``moment_ms``; cost as a rounding string, a JSON number, a whole
    number or absent (estimated: no price is known in these tests, so 0), timestamp as
    epoch ms, RFC 3339 UTC or RFC 3339 with the Warsaw offset."""
    event: dict = {
        "request_id": request_id,
        "client_org_id": f"org-{rng.randrange(4)}",
        "user_id": f"user-{rng.randrange(5)}",
        "model": rng.choice(MODELS),
        "input_tokens": rng.randrange(0, 4000),
        "output_tokens": rng.randrange(0, 1500),
    }
    kind = rng.randrange(4)
    if kind == 0:
        event["cost_usd"] = f"0.{rng.randrange(10**12):012d}"  # 12 decimals: rounds
    elif kind == 1:
        event["cost_usd"] = rng.randrange(10**9) / 10**11  # a JSON number
    elif kind == 2:
        event["cost_usd"] = str(rng.randrange(3))
    form = rng.randrange(3)
    if form == 0:
        event["timestamp"] = moment_ms
    else:
        moment = datetime.fromtimestamp(moment_ms / 1000, UTC)
        if form == 2:
            moment = moment.astimezone(WARSAW)
        event["timestamp"] = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return event


def make_day(day: date, count: int, tag: str, seed: int, until_ms: int | None = None) -> list[dict]:
    """``count`` events on local date ``day`` (its first and last millisecond included,
    unless ``until_ms`` cuts the day short)."""
    rng = random.Random(seed)
    start = local_midnight_ms(day)
    end = min(local_midnight_ms(day + timedelta(days=1)), until_ms or 2**62)
    events = []
    for i in range(count):
        moment = start if i == 0 else end - 1 if i == 1 else start + rng.randrange(end - start)
        events.append(make_event(f"{tag}-{i}", moment, rng))
    return events


def past_events(days_ago: tuple[int, ...], total: int, tag: str) -> list[dict]:
    """``total`` unique events spread over the given past local dates (closed by the wall
    clock as soon as the writer sees them)."""
    today = local_today()
    events: list[dict] = []
    for n, ago in enumerate(days_ago):
        count = total // len(days_ago) + (1 if n < total % len(days_ago) else 0)
        events += make_day(today - timedelta(days=ago), count, f"{tag}{n}", seed=100 * ago + n)
    assert len(events) == total
    return events


def ground_truth(events: list[dict]) -> dict[tuple, tuple]:
    """Expected rows (key → COLUMNS) of the unique events, the first copy counting
    (tests/ground_truth.py). No model price and no NBP rate is reachable in these tests:
    estimated costs are 0 and PLN stays NULL."""
    return {key: (*row[:8], row.usd_pln_rate) for key, row in expected_rows(events).items()}


def spread(events: list[dict], copy_share: float, seed: int) -> tuple[list[Record], int]:
    """Records for ``events``: most keyed by request_id (at home), some unkeyed on a random
    partition, some keyed by something else; plus ``copy_share`` copies, mostly on another
    partition than the original's (unkeyed or keyed otherwise), a few on the same one
    keyed by request_id (a producer's retry). Shuffled, so a copy may come first.
    Returns the records and the number of copies."""
    rng = random.Random(seed)
    records: list[Record] = []
    for i, event in enumerate(events):
        value = orjson.dumps(event)
        rid = event["request_id"].encode()
        if i % 20 == 7:
            records.append((value, None, rng.randrange(PARTITIONS)))
        elif i % 20 == 13:
            records.append((value, f"tenant-{i % 7}".encode(), None))
        else:
            records.append((value, rid, None))
    copies = rng.sample(events, int(len(events) * copy_share))
    for j, event in enumerate(copies):
        value = orjson.dumps(event)
        rid = event["request_id"]
        if j % 10 == 0:
            records.append((value, rid.encode(), None))  # same partition, same key
            continue
        other = (home(rid) + 1 + rng.randrange(PARTITIONS - 1)) % PARTITIONS
        key = None if j % 2 else f"session-{j % 13}".encode()
        records.append((value, key, other))
    rng.shuffle(records)
    return records, len(copies)


def invalid_records(now_ms: int, template: dict) -> list[Record]:
    """A few invalid messages (ids ``bad-*`` that must never be billed nor written)."""
    values = [
        b"this is not json",
        b"[1, 2, 3]",
        orjson.dumps({"request_id": "bad-missing"}),
        orjson.dumps({**template, "request_id": "bad-negative", "input_tokens": -5}),
        orjson.dumps(
            {**template, "request_id": "bad-future", "timestamp": now_ms + 3 * 86_400_000}
        ),
        orjson.dumps({**template, "request_id": "bad-type", "output_tokens": "many"}),
    ]
    return [
        (value, f"bad-{k}".encode() if k % 2 else None, k % PARTITIONS)
        for k, value in enumerate(values)
    ]


def publish(stack: Stack, records: list[Record]) -> None:
    stack.publish(
        [value for value, _, _ in records],
        [key for _, key, _ in records],
        [partition for _, _, partition in records],
    )


# Reading the writer's database ---------------------------------------------------------


def daily(stack: Stack, table: str = "usage_daily", where: str = "", params=()) -> dict:
    rows = stack.query(
        f"SELECT client_org_id, user_id, model, usage_date, {COLUMNS} FROM {table} {where}",
        params,
    )
    return {tuple(row[:4]): tuple(row[4:]) for row in rows}


def scalar(stack: Stack, sql: str, params: tuple = ()) -> object:
    """One value, or None while the DB or the table does not exist yet."""
    if not stack.db_path.exists():
        return None
    try:
        return stack.query(sql, params)[0][0]
    except Exception:  # noqa: BLE001 - created by the writer at start-up
        return None


def closed_days(stack: Stack) -> set[str]:
    """Closed usage dates (none while the writer has not created its DB yet)."""
    if not stack.db_path.exists():
        return set()
    try:
        return {row[0] for row in stack.query("SELECT usage_date FROM closed_days")}
    except Exception:  # noqa: BLE001 - the schema is created at start-up
        return set()


def wait_billed(stack: Stack, truth: dict[tuple, tuple], timeout: float) -> None:
    """Wait until every unique event is in ``usage_daily`` (all test days are past, so
    closed by the wall clock), let a few rollup intervals pass (anything applied twice
    would show up), then compare every row with the ground truth."""
    unique = sum(row[3] for row in truth.values())
    query = "SELECT COALESCE(SUM(requests), 0) FROM usage_daily"

    def billed() -> bool:
        value = scalar(stack, query)
        return value is not None and value >= unique

    try:
        wait_for(billed, timeout, f"{unique} unique events in usage_daily", 1.0)
    except AssertionError as error:
        live = scalar(stack, "SELECT COALESCE(SUM(requests), 0) FROM usage_daily_live")
        raise AssertionError(
            f"{error}; requests in usage_daily: {scalar(stack, query)}, in usage_daily_live:"
            f" {live}, closed days: {sorted(closed_days(stack))}"
        ) from None
    time.sleep(3)
    billed_now = scalar(stack, query)
    assert billed_now == unique, f"{billed_now} requests billed for {unique} unique events"
    assert_rows(daily(stack), truth, "usage_daily")
    assert_rows(daily(stack, "usage_daily_live"), truth, "usage_daily_live")
    open_rows = stack.query("SELECT COUNT(*) FROM usage_daily_live WHERE final = 0")
    assert open_rows == [(0,)], f"provisional rows left: {open_rows}"
    closed = closed_days(stack)
    assert {key[3] for key in truth} <= closed, f"closed days: {sorted(closed)}"


def assert_rows(actual: dict[tuple, tuple], expected: dict[tuple, tuple], what: str) -> None:
    """Row-by-row equality with a readable message (this module is not assert-rewritten)."""
    if actual == expected:
        return
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    wrong = sorted(k for k in set(actual) & set(expected) if actual[k] != expected[k])
    lines = [
        f"{what}: {len(missing)} rows missing, {len(extra)} unexpected, {len(wrong)} differ"
        f" (columns: {COLUMNS})"
    ]
    lines += [f"  missing {k}: expected {expected[k]}" for k in missing[:5]]
    lines += [f"  unexpected {k}: {actual[k]}" for k in extra[:5]]
    lines += [f"  {k}: got {actual[k]}, expected {expected[k]}" for k in wrong[:5]]
    raise AssertionError("\n".join(lines))


# Workers -------------------------------------------------------------------------------


def assigned(worker: Worker) -> set[int]:
    return set(worker.status().get("assigned_partitions", [])) if worker.alive() else set()


def wait_group(workers: list[Worker], timeout: float = 90) -> None:
    """Wait until every worker holds partitions, none twice, all of them covered."""

    def balanced() -> bool:
        for worker in workers:
            if not worker.alive():
                raise AssertionError(f"worker died; log:\n{worker.log_tail()}")
        sets = [assigned(worker) for worker in workers]
        union = set().union(*sets)
        disjoint = sum(len(s) for s in sets) == len(union)
        return all(sets) and disjoint and union == set(range(PARTITIONS))

    wait_for(balanced, timeout, f"{len(workers)} workers to share the partitions", 0.5)


def metric(worker: Worker, name: str) -> float:
    return worker.metrics().get(name, 0.0)


def sqlite_files(directory: Path) -> list[Path]:
    """SQLite files (and their journals) anywhere under ``directory``."""
    pattern = re.compile(r"\.(db|sqlite|sqlite3)(-wal|-shm|-journal)?$")
    return sorted(p for p in directory.rglob("*") if pattern.search(p.name))


def open_sqlite_files(worker: Worker) -> list[str]:
    """Files the live process holds open that look like SQLite databases."""
    assert worker.process is not None
    fd_dir = Path(f"/proc/{worker.process.pid}/fd")
    targets = []
    for fd in fd_dir.iterdir():
        try:
            targets.append(os.readlink(fd))
        except OSError:  # closed meanwhile
            continue
    pattern = re.compile(r"\.(db|sqlite|sqlite3)(-wal|-shm|-journal)?$")
    return [target for target in targets if pattern.search(target)]


def non_writer(stack: Stack, data_dir: Path, **env: str) -> Worker:
    """A worker on another host: its own, empty DATA_DIR, not the summary writer."""
    data_dir.mkdir()  # fails if it exists: every host starts empty
    return stack.worker(DATA_DIR=str(data_dir), SUMMARY_WRITER="false", **env)


def assert_no_sqlite(data_dir: Path, worker: Worker | None = None) -> None:
    assert not (data_dir / "usage.db").exists()
    assert sqlite_files(data_dir) == []
    if worker is not None and worker.alive():
        assert open_sqlite_files(worker) == []


# Raw points (file sink) ----------------------------------------------------------------

_REQUEST_ID = re.compile(r' request_id="((?:[^"\\]|\\.)*)"|,request_id="((?:[^"\\]|\\.)*)"')


def raw_lines(data_dir: Path) -> list[str]:
    """Every complete data line of the line-protocol files under ``data_dir/raw`` (plain,
    gzipped, or caught mid-gzip); a torn last line (a crash mid-write) is left out."""
    lines: list[str] = []
    raw = data_dir / "raw"
    if not raw.is_dir():
        return lines
    for path in sorted(raw.iterdir()):
        name = path.name
        if name.endswith(".lp.gz"):
            text = gzip.decompress(path.read_bytes()).decode()
        elif name.endswith((".lp", ".lp.gzipping")):
            text = path.read_text()
        else:
            continue
        complete = text.split("\n")[:-1]  # what follows the last newline is torn
        lines += [line for line in complete if line and not line.startswith("#")]
    return lines


def raw_points(data_dirs: list[Path]) -> dict[str, set[str]]:
    """request_id → the distinct lines written for it, over every directory."""
    points: dict[str, set[str]] = defaultdict(set)
    for data_dir in data_dirs:
        for line in raw_lines(data_dir):
            match = _REQUEST_ID.search(line)
            assert match, f"a raw line without request_id: {line!r}"
            points[match.group(1) or match.group(2)].add(line)
    return points
