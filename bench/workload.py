"""The benchmark's input: realistic usage events, duplicates and invalid messages, with the
exact counts a correct pipeline must end up with.

Why these shapes:

* request ids are random UUIDs (36 characters) like the gateway's, so the per-id cost of
  the dedupe state is measured on incompressible keys;
* event times fall in three whole local days that have already closed (business time
  zone, grace included), so the worker writes final ``usage_daily`` rows and the totals
  can be checked without waiting for a wall-clock day to end;
* ``cost_usd`` comes as a decimal string, as a JSON number, or not at all (estimated),
  and ``timestamp`` as epoch ms or RFC 3339 (UTC ``Z`` or a local offset): every input
  form of docs/contract.md §1 goes through the hot path;
* 10 % duplicates: half re-sent with the same key (same partition, the common retry),
  half onto another partition (no key, or another key), which only the re-keying /
  cross-partition dedupe catches;
* 1 % invalid messages (not JSON, negative tokens, a missing field), which must reach
  the dead-letter topic and the invalid counter.

Two workloads (``WORKLOADS``) differ only in the events' keys and dates:

* ``default``: 40 organisations × 400 users × 5 models (≤ 80k (client, user, model)
  keys, ~57k of them used per day at 1M events) over three days;
* ``many-keys``: an LLM gateway whose ``user_id`` is the end user. Every event falls in
  ONE day (so a replay of that date validates, deduplicates and bills all of them), and
  the key is drawn uniformly from ``MANY_KEYS_SPACE_PER_EVENT`` × N keys (each end user
  belongs to one of 40 organisations and uses the 5 models): ~0.29 distinct keys per
  unique event, ~289k keys at 1M events. Keys per event, not their absolute number, set
  the per-key costs, so a smaller N measures the same costs per event.

Records go to the partition aiokafka's ``DefaultPartitioner`` would pick for their key
(murmur2, like the Java client; computed here with numpy, see ``murmur2_partitions``) and
are sent with ``send_batch``: per-message ``send()`` tops out at ~33k records/s here,
mostly in the pure-Python murmur2, ``send_batch`` at ~150-300k/s, and producing must not
dominate the run.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streams.model.partitioning import murmur2_partitions as _murmur2_partitions

PARTITIONS = 4
WORKLOADS = ("default", "many-keys")
#: many-keys: the key space per unique event; distinct keys ≈ space × (1 - e^(-1/0.3))
MANY_KEYS_SPACE_PER_EVENT = 0.3
ORGS = 40
USERS_PER_ORG_DEFAULT = 400  # default: users drawn from 0..399, whatever the org
MODELS = (
    "openai/gpt-4o-mini",
    "openai/gpt-4o",
    "anthropic/claude-3.5-sonnet",
    "google/gemini-flash-1.5",
    "meta-llama/llama-3.1-70b-instruct",
)
#: The worker's invalid reason for each kind of broken message we produce.
INVALID_REASONS = {"not_json": "not_json", "negative": "bad_value", "missing": "missing_field"}


@dataclass
class Expected:
    """What a correct pipeline must count for this workload."""

    records: int  # everything on the topic: unique + duplicates + invalid
    unique: int  # valid distinct request_ids (what gets billed)
    duplicates: int
    duplicates_same_partition: int
    duplicates_other_partition: int  # keyless or another key, on another partition
    invalid: int
    invalid_by_reason: dict[str, int]  # keyed by the worker's reason label
    records_by_partition: list[int]
    unique_by_day: dict[str, int]  # local usage date -> unique events
    without_cost: int
    business_timezone: str
    workload: str = "default"
    #: local usage date -> distinct (client_org_id, user_id, model) keys of its events
    keys_by_day: dict[str, int] = field(default_factory=dict)

    @property
    def replay_date(self) -> str:
        """The date the benchmark replays: the middle one (the second of three days, the
        only day of many-keys)."""
        days = sorted(self.unique_by_day)
        return days[len(days) // 2]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Workload:
    """Records in send order, each with its key and the partition it goes to."""

    keys: list[bytes | None] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)
    partitions: list[int] = field(default_factory=list)
    expected: Expected | None = None


def usage_days(tz: ZoneInfo, now: datetime | None = None) -> list[date]:
    """Three whole local days that are closed already (midnight + 1 h grace passed).

    Yesterday closes at 01:00 local; before 02:00 we step one more day back."""
    local = (now or datetime.now(UTC)).astimezone(tz)
    last = local.date() - timedelta(days=1 if local.hour >= 2 else 2)
    return [last - timedelta(days=2), last - timedelta(days=1), last]


def _day_bounds_ms(day: date, tz: ZoneInfo) -> tuple[int, int]:
    start = datetime(day.year, day.month, day.day, tzinfo=tz)
    end_day = day + timedelta(days=1)
    end = datetime(end_day.year, end_day.month, end_day.day, tzinfo=tz)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def _rfc3339(ms: int, tz: ZoneInfo, utc: bool) -> str:
    moment = datetime.fromtimestamp(ms / 1000, UTC if utc else tz)
    text = moment.isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z") if utc else text


def murmur2_partitions(keys: list[bytes]) -> list[int]:
    """The partition aiokafka's ``DefaultPartitioner`` picks for each key: the pipeline's
    own vectorised murmur2 (:mod:`streams.model.partitioning`; pure Python costs ~34 µs a key,
    which alone would take half a minute for a million records)."""
    return _murmur2_partitions(keys, PARTITIONS)


def build(
    events: int, timezone: str = "Europe/Warsaw", seed: int = 7, workload: str = "default"
) -> Workload:
    """``events`` unique valid events plus 10 % duplicates and 1 % invalid messages, keyed
    and dated as ``workload`` says (module docstring).

    Random draws come from numpy arrays made up front (a per-event ``random.randrange``
    costs more than the JSON encoding); the result is the same for the same seed."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload {workload!r}: expected one of {', '.join(WORKLOADS)}")
    frozen = gc.isenabled()
    gc.disable()  # millions of new containers: gen-2 collections made this quadratic
    try:
        return _build(events, timezone, seed, workload)
    finally:
        if frozen:
            gc.enable()


def _keys(
    gen: np.random.Generator, events: int, workload: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(organisation, user, model) indices per event (draws in the default workload's
    original order, so its events are the same as before many-keys existed)."""
    if workload == "many-keys":
        space = max(1, round(events * MANY_KEYS_SPACE_PER_EVENT))
        key = gen.integers(0, space, events)
        users = key // len(MODELS)  # an end user of one organisation
        return users % ORGS, users, key % len(MODELS)
    orgs = gen.integers(0, ORGS, events)
    users = gen.integers(0, USERS_PER_ORG_DEFAULT, events)
    return orgs, users, gen.integers(0, len(MODELS), events)


def _keys_by_day(
    days: list[date], day_index: np.ndarray, keys: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> dict[str, int]:
    """Distinct (organisation, user, model) per day, counted exactly with numpy."""
    orgs, users, models = (part.astype(np.int64) for part in keys)
    combined = ((day_index.astype(np.int64) * ORGS + orgs) * 2**32 + users) * 8 + models
    distinct = np.unique(combined) >> 3 >> 32  # day * ORGS + org
    per_day = np.bincount(distinct // ORGS, minlength=len(days))
    return {day.isoformat(): int(per_day[i]) for i, day in enumerate(days) if per_day[i]}


def _build(events: int, timezone: str, seed: int, workload: str) -> Workload:
    tz = ZoneInfo(timezone)
    gen = np.random.default_rng(seed)
    days = usage_days(tz)
    if workload == "many-keys":
        days = [days[1]]
    bounds = [_day_bounds_ms(day, tz) for day in days]
    day_index = gen.integers(0, len(days), events)
    starts = np.array([start for start, _ in bounds], dtype=np.int64)
    lengths = np.array([end - start for start, end in bounds], dtype=np.int64)
    stamps = (
        starts[day_index] + (gen.random(events) * lengths[day_index]).astype(np.int64)
    ).tolist()
    id_bytes = gen.bytes(16 * events).hex()
    key_arrays = _keys(gen, events, workload)
    keys_by_day = _keys_by_day(days, day_index, key_arrays)
    orgs, users, models = (part.tolist() for part in key_arrays)
    inputs = gen.integers(0, 8000, events).tolist()
    outputs = gen.integers(0, 2000, events).tolist()
    nanos = gen.integers(0, 10**9, events).tolist()
    unique_by_day = Counter(days[i].isoformat() for i in day_index.tolist())
    without_cost = 0

    values: list[bytes] = []
    ids: list[bytes] = []
    for index in range(events):
        h = id_bytes[index * 32 : index * 32 + 32]
        request_id = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:32]}"
        stamp = stamps[index]
        event: dict[str, object] = {
            "request_id": request_id,
            "client_org_id": f"org-{orgs[index]}",
            "user_id": f"user-{users[index]}",
            "model": MODELS[models[index]],
            "input_tokens": inputs[index],
            "output_tokens": outputs[index],
        }
        form = index % 20
        if form < 14:  # 70 %: decimal string, nano precision
            event["cost_usd"] = f"0.{nanos[index]:09d}"
        elif form < 18:  # 20 %: JSON number
            event["cost_usd"] = nanos[index] // 1000 / 10**7
        else:  # 10 %: estimated from the model's price
            without_cost += 1
        if index % 10 == 3:
            event["timestamp"] = _rfc3339(stamp, tz, utc=index % 20 == 3)
        else:
            event["timestamp"] = stamp
        if index % 4 == 1:
            event["total_tokens"] = inputs[index] + outputs[index]
        ids.append(request_id.encode())
        values.append(orjson.dumps(event))
    print(f"  generated {events:,} events", file=sys.stderr, flush=True)
    partitions = murmur2_partitions(ids)

    # (sort position, key, value, partition); originals sit at their index, copies later
    rows: list[tuple[float, bytes | None, bytes, int]] = [
        (float(index), ids[index], values[index], partitions[index]) for index in range(events)
    ]
    copies = events // 10
    sources = gen.integers(0, events, copies).tolist()
    delays = gen.uniform(0.5, 5000.0, copies).tolist()
    shifts = gen.integers(1, PARTITIONS, copies).tolist()
    # copies re-sent under another key: retry suffixes until the key hashes elsewhere
    other_keys: dict[int, tuple[bytes, int]] = {}
    waiting = [copy for copy in range(copies) if copy % 4 == 3]
    attempt = 0
    while waiting:
        attempt += 1
        candidates = [ids[sources[copy]] + f"#retry-{attempt}".encode() for copy in waiting]
        still = []
        for copy, key, partition in zip(
            waiting, candidates, murmur2_partitions(candidates), strict=True
        ):
            if partition != partitions[sources[copy]]:
                other_keys[copy] = (key, partition)
            else:
                still.append(copy)
        waiting = still
    same = other = 0
    for copy in range(copies):
        source = sources[copy]
        key, value, partition = ids[source], values[source], partitions[source]
        position = source + delays[copy]
        kind = copy % 4
        if kind < 2:  # the producer's own retry: same key, same partition
            rows.append((position, key, value, partition))
            same += 1
        elif kind == 2:  # re-sent without a key, onto another partition
            rows.append((position, None, value, (partition + shifts[copy]) % PARTITIONS))
            other += 1
        else:  # re-sent under another key that hashes to another partition
            other_key, other_partition = other_keys[copy]
            rows.append((position, other_key, value, other_partition))
            other += 1

    invalid_by_reason: Counter[str] = Counter()
    broken_count = events // 100
    broken_sources = gen.integers(0, events, broken_count).tolist()
    broken_positions = gen.uniform(0, events, broken_count).tolist()
    broken_keys = [f"broken-{broken}".encode() for broken in range(broken_count)]
    broken_partitions = murmur2_partitions(broken_keys)
    for broken in range(broken_count):
        kind = ("not_json", "negative", "missing")[broken % 3]
        if kind == "not_json":
            value = b'{"request_id": "broken-' + str(broken).encode() + b'", not json'
        else:
            event = orjson.loads(values[broken_sources[broken]])
            event["request_id"] = f"broken-{broken}"
            if kind == "negative":
                event["input_tokens"] = -1 - broken % 100
            else:
                del event["model"]
            value = orjson.dumps(event)
        invalid_by_reason[INVALID_REASONS[kind]] += 1
        rows.append(
            (broken_positions[broken], broken_keys[broken], value, broken_partitions[broken])
        )

    rows.sort(key=lambda row: row[0])
    workload_name, workload = workload, Workload()
    by_partition = [0] * PARTITIONS
    for _, key, value, partition in rows:
        workload.keys.append(key)
        workload.values.append(value)
        workload.partitions.append(partition)
        by_partition[partition] += 1
    workload.expected = Expected(
        records=len(rows),
        unique=events,
        duplicates=same + other,
        duplicates_same_partition=same,
        duplicates_other_partition=other,
        invalid=sum(invalid_by_reason.values()),
        invalid_by_reason=dict(sorted(invalid_by_reason.items())),
        records_by_partition=by_partition,
        unique_by_day=dict(sorted(unique_by_day.items())),
        without_cost=without_cost,
        business_timezone=timezone,
        workload=workload_name,
        keys_by_day=keys_by_day,
    )
    return workload


async def create_topics(bootstrap: str, topics: list[str]) -> None:
    """The source topic (and its DLQ) with 4 partitions, before any consumer: Tansu would
    otherwise auto-create them with its own default."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, PARTITIONS, 1) for name in topics])
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, workload: Workload) -> float:
    """Send every record to its partition in send order; returns the seconds it took."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        max_batch_size=512_000,
        max_request_size=4_000_000,
        linger_ms=50,
    )
    await producer.start()
    started = time.perf_counter()
    try:
        batches = {p: producer.create_batch() for p in range(PARTITIONS)}
        pending: list[asyncio.Future[object]] = []
        for key, value, partition in zip(
            workload.keys, workload.values, workload.partitions, strict=True
        ):
            batch = batches[partition]
            if batch.append(key=key, value=value, timestamp=None) is None:
                batch.close()
                pending.append(await producer.send_batch(batch, topic, partition=partition))
                batch = batches[partition] = producer.create_batch()
                if batch.append(key=key, value=value, timestamp=None) is None:
                    raise ValueError(f"a record of {len(value)} bytes does not fit a batch")
        for partition, batch in batches.items():
            if batch.record_count():
                batch.close()
                pending.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - started
