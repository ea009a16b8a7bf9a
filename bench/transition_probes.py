"""What bench/transitions.py watches while workers start, stop, join and leave, and how it
turns those samples into figures.

Everything here samples from outside the worker, as an operator or a load balancer
would, so the same probes measure any commit (``--tree``):

* :class:`WorkerProbe`: one worker's ``/ready`` (every transition of its status code, and
  the first 200), its ``/metrics`` counters (raw points written, events consumed) and the
  partitions ``/status`` says it holds, each in its own thread so that a slow ``/ready``
  (it may take 2 s to answer) does not coarsen the other samples;
* :class:`HeadsProbe`: each home partition's billed position, ``batch_log_heads.usage_next``
  in the summary DB, which the summary writer stores in the transaction that adds the
  batch's sums: when it moves, that partition's events are billed. Its gaps are the
  stalls the benchmark reports;
* :class:`Publisher`: one producer on its own event loop for markers (single events whose
  ``client_org_id`` is unique, so the summary DB shows when each is billed) and for the
  steady load of the join and leave scenarios;
* :func:`log_timeline`: the worker log's milestones (group joins, rebuilds, readiness) in
  seconds since the process started, to explain where each second goes.

The figures are pure functions of the samples (:func:`longest_gap` and friends), so the
smoke test and a reader can check what a number means.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import sqlite3
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson
from aiokafka import AIOKafkaProducer

from bench.worker_run import read_metrics, read_only

PREFIX = "usage_stream_"
MODELS = ("openai/gpt-4o-mini", "anthropic/claude-3.5-sonnet", "google/gemini-flash-1.5")


def http_json(url: str, timeout: float) -> tuple[int, dict[str, object] | None]:
    """(status, JSON body or None); status 0 when nothing answered in ``timeout``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read()
    except (urllib.error.URLError, OSError):
        return 0, None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return status, None
    return status, parsed if isinstance(parsed, dict) else {"body": parsed}


def counter(metrics: dict[str, float] | None, name: str) -> int | None:
    """A ``usage_stream_<name>_total`` counter, or None when absent or unreachable."""
    if metrics is None:
        return None
    value = metrics.get(PREFIX + name + "_total")
    return None if value is None else int(value)


def invalid_total(metrics: dict[str, float] | None) -> int | None:
    """``usage_stream_events_invalid_total`` summed over its reasons."""
    if metrics is None:
        return None
    prefix = PREFIX + "events_invalid_total{"
    return int(sum(value for key, value in metrics.items() if key.startswith(prefix)))


class _Loop(threading.Thread):
    """Calls ``step()`` every ``interval`` seconds until stopped (a daemon thread: a probe
    must never keep the benchmark alive)."""

    def __init__(self, interval: float, name: str) -> None:
        super().__init__(daemon=True, name=name)
        self.interval = interval
        self.done = threading.Event()

    def step(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def run(self) -> None:
        while not self.done.is_set():
            started = time.monotonic()
            try:
                self.step()
            except Exception:  # a probe must outlive a bad sample
                pass
            self.done.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=10)


class _ReadyLoop(_Loop):
    def __init__(self, port: int, interval: float) -> None:
        super().__init__(interval, f"ready-{port}")
        self.url = f"http://127.0.0.1:{port}/ready"
        #: (monotonic time, status, phase or first reason): every change of status or phase
        self.changes: list[tuple[float, int, str]] = []
        self.first_200: float | None = None
        self.answers = 0
        self.slowest = 0.0  # seconds of the slowest answer (a probe times out at 3 s)

    def step(self) -> None:
        asked = time.monotonic()
        status, body = http_json(self.url, timeout=3.0)
        now = time.monotonic()
        if status:
            self.answers += 1
            self.slowest = max(self.slowest, now - asked)
        note = ""
        if body:
            phase = body.get("phase")
            reasons = body.get("reasons")
            if isinstance(phase, str):
                note = phase
            elif isinstance(reasons, list) and reasons:
                note = str(reasons[0])[:160]
        if status == 200 and self.first_200 is None:
            self.first_200 = asked  # it was ready when asked, at the latest
        if not self.changes or self.changes[-1][1:] != (status, note):
            self.changes.append((asked, status, note))


class _MetricsLoop(_Loop):
    def __init__(self, port: int, interval: float) -> None:
        super().__init__(interval, f"metrics-{port}")
        self.port = port
        #: (monotonic time, raw points written, events consumed) of every answer
        self.samples: list[tuple[float, int, int]] = []
        #: (monotonic time, partitions held) at every change
        self.assigned: list[tuple[float, tuple[int, ...]]] = []
        self.last: dict[str, float] | None = None
        self._n = 0

    def step(self) -> None:
        now = time.monotonic()
        metrics = read_metrics(self.port, timeout=3.0)
        if metrics is not None:
            self.last = metrics
            self.samples.append(
                (
                    now,
                    counter(metrics, "raw_points_written") or 0,
                    counter(metrics, "events_consumed") or 0,
                )
            )
        self._n += 1
        if self._n % 2:  # /status every other sample: it reads the summary DB
            status, body = http_json(f"http://127.0.0.1:{self.port}/status", timeout=3.0)
            if status == 200 and body is not None:
                held = tuple(sorted(int(p) for p in body.get("assigned_partitions") or []))  # type: ignore[union-attr]
                if not self.assigned or self.assigned[-1][1] != held:
                    self.assigned.append((now, held))


class WorkerProbe:
    """``/ready``, ``/metrics`` and ``/status`` of one worker, sampled in two threads."""

    def __init__(self, port: int, ready_every: float = 0.5, metrics_every: float = 0.25) -> None:
        self.port = port
        self.ready = _ReadyLoop(port, ready_every)
        self.metrics = _MetricsLoop(port, metrics_every)

    def start(self) -> WorkerProbe:
        self.ready.start()
        self.metrics.start()
        return self

    def stop(self) -> None:
        self.ready.stop()
        self.metrics.stop()

    def assigned_at(self, moment: float) -> tuple[int, ...]:
        """The partitions held at ``moment`` as last seen (empty before the first sample)."""
        held: tuple[int, ...] = ()
        for when, partitions in self.metrics.assigned:
            if when > moment:
                break
            held = partitions
        return held

    def assigned_now(self) -> tuple[int, ...]:
        return self.metrics.assigned[-1][1] if self.metrics.assigned else ()

    def raw_progress(self) -> list[float]:
        """Times at which this worker's raw points written had grown since the sample
        before (a restart of the counter is not a process this probe follows)."""
        times, last = [], None
        for when, points, _ in self.metrics.samples:
            if last is not None and points > last:
                times.append(when)
            last = points
        return times

    def first_raw_point(self) -> float | None:
        for when, points, _ in self.metrics.samples:
            if points > 0:
                return when
        return None


class HeadsProbe(_Loop):
    """Each home partition's billed position (``batch_log_heads.usage_next``) in one
    summary DB, every ``interval`` seconds."""

    def __init__(self, db: Path, interval: float = 0.25) -> None:
        super().__init__(interval, "heads")
        self.db = db
        #: (monotonic time, {partition: usage_next}) of every successful read
        self.samples: list[tuple[float, dict[int, int]]] = []

    def step(self) -> None:
        heads = billed_positions(self.db)
        if heads is not None:
            self.samples.append((time.monotonic(), heads))

    def progress(self) -> dict[int, list[float]]:
        """Per partition, the sample times at which its billed position had moved."""
        moved: dict[int, list[float]] = {}
        last: dict[int, int] = {}
        for when, heads in self.samples:
            for partition, position in heads.items():
                if partition in last and position > last[partition]:
                    moved.setdefault(partition, []).append(when)
                moved.setdefault(partition, [])
                last[partition] = position
        return moved


def billed_positions(db: Path) -> dict[int, int] | None:
    """``{partition: usage_next}`` of the summary DB, or None while it cannot be read."""
    if not db.exists():
        return None
    try:
        with read_only(db) as conn:
            rows = conn.execute("SELECT partition, usage_next FROM batch_log_heads").fetchall()
    except sqlite3.Error:
        return None
    return {int(partition): int(position) for partition, position in rows}


def marker_dates(timezone: str) -> tuple[str, str]:
    """The usage dates a marker published now can fall on (today, and yesterday should
    local midnight pass between publishing and asking)."""
    today = datetime.now(ZoneInfo(timezone)).date()
    return today.isoformat(), (today - timedelta(days=1)).isoformat()


def marker_requests(db: Path, client: str, dates: tuple[str, str]) -> int:
    """Requests billed to ``client``: its sums in ``daily_pending`` (open days, written by
    the summary writer in the transaction that applies the batch) plus ``usage_daily``
    (closed days). Not ``usage_daily_live``, what ``/usage`` serves: its open days are a
    copy the rollup refreshes every ``ROLLUP_INTERVAL_SECONDS`` (5 s), which would add
    0-5 s of noise to every figure. ``dates``: :func:`marker_dates`, so that both
    lookups are index seeks (``daily_pending`` holds a whole history's rows while it is
    billed). A DB without ``summary_keys`` (an older commit) is asked through that view.
    0 while nothing is there yet."""
    if not db.exists():
        return 0
    try:
        with read_only(db) as conn:
            try:
                (count,) = conn.execute(
                    "SELECT (SELECT COALESCE(SUM(p.requests), 0) FROM summary_keys k"
                    " JOIN daily_pending p ON p.key_id = k.key_id AND p.usage_date IN (?, ?)"
                    " WHERE k.client_org_id = ?)"
                    " + (SELECT COALESCE(SUM(requests), 0) FROM usage_daily"
                    " WHERE client_org_id = ?)",
                    (*dates, client, client),
                ).fetchone()
            except sqlite3.OperationalError:
                (count,) = conn.execute(
                    "SELECT COALESCE(SUM(requests), 0) FROM usage_daily_live"
                    " WHERE client_org_id = ?",
                    (client,),
                ).fetchone()
    except sqlite3.Error:
        return 0
    return int(count)


# Publishing ---------------------------------------------------------------------------


def usage_event(client: str, index: int) -> tuple[bytes, bytes]:
    """(key, value) of one valid, unique usage event at the current time."""
    request_id = str(uuid.uuid4())
    event = {
        "request_id": request_id,
        "client_org_id": client,
        "user_id": f"user-{index % 50}",
        "model": MODELS[index % len(MODELS)],
        "input_tokens": 100 + index % 900,
        "output_tokens": 10 + index % 90,
        "cost_usd": f"0.{index % 10**9:09d}",
        "timestamp": time.time_ns() // 1_000_000,
    }
    return request_id.encode(), orjson.dumps(event)


@dataclass
class LoadStats:
    """What the steady load has published (acknowledged by the broker)."""

    events: int = 0
    started: float | None = None
    stopped: float | None = None
    late_ticks: int = 0  # ticks sent more than one tick late: the producer fell behind


class Publisher:
    """One aiokafka producer on its own event loop in a thread: markers are sent without
    waiting for a producer to start (a worker's clock starts at its process start, and
    so does the marker's), and the steady load keeps its pace whatever the main thread
    is doing."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="publish")
        self.producer: AIOKafkaProducer | None = None
        self.load = LoadStats()
        self._load_task: concurrent.futures.Future[None] | None = None
        self._stop_load = threading.Event()

    def start(self) -> Publisher:
        self.thread.start()
        self._call(self._start()).result(60)
        return self

    async def _start(self) -> None:
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=2)
        await self.producer.start()

    def _call(self, coroutine: object) -> concurrent.futures.Future:  # type: ignore[type-arg]
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)  # type: ignore[arg-type]

    def send(self, topic: str, key: bytes, value: bytes) -> concurrent.futures.Future[object]:
        """Send one record; the future completes when the broker acknowledged it."""

        async def send() -> object:
            assert self.producer is not None
            return await (await self.producer.send(topic, value, key=key))

        return self._call(send())

    def marker(self, topic: str, client: str) -> concurrent.futures.Future[object]:
        key, value = usage_event(client, 0)
        return self.send(topic, key, value)

    def start_load(self, topic: str, rate: float, client_prefix: str, tick: float = 0.05) -> None:
        """Publish ``rate`` unique events a second, in ticks of ``tick`` seconds, until
        :meth:`stop_load`."""
        self._stop_load.clear()
        self.load.started = time.monotonic()
        self._load_task = self._call(self._load(topic, rate, client_prefix, tick))

    async def _load(self, topic: str, rate: float, client_prefix: str, tick: float) -> None:
        assert self.producer is not None
        owed = 0.0
        next_tick = time.monotonic()
        index = self.load.events
        while not self._stop_load.is_set():
            owed += rate * tick
            count, owed = int(owed), owed - int(owed)
            futures = []
            for _ in range(count):
                key, value = usage_event(f"{client_prefix}{index % 20}", index)
                futures.append(await self.producer.send(topic, value, key=key))
                index += 1
            for future in futures:
                await future
            self.load.events += count
            next_tick += tick
            delay = next_tick - time.monotonic()
            if delay < -tick:
                self.load.late_ticks += 1
            await asyncio.sleep(max(0.0, delay))

    def stop_load(self) -> None:
        self._stop_load.set()
        if self._load_task is not None:
            self._load_task.result(60)
            self._load_task = None
        self.load.stopped = time.monotonic()

    def close(self) -> None:
        if self._load_task is not None:
            self.stop_load()
        if self.producer is not None:
            self._call(self.producer.stop()).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


# Figures ------------------------------------------------------------------------------


@dataclass
class Gap:
    """The longest interval without progress in a window: its length, and when it began
    and ended (monotonic). ``open`` when no progress ended it before the window did."""

    seconds: float
    began: float
    ended: float
    open: bool = False

    def as_dict(self, origin: float) -> dict[str, object]:
        return {
            "seconds": self.seconds,
            "began_s": self.began - origin,
            "ended_s": self.ended - origin,
            "open": self.open,
        }


def longest_gap(progress: Sequence[float], start: float, end: float) -> Gap:
    """The longest interval between two consecutive progress times that overlaps
    ``[start, end]``. The interval running into the window starts at the last progress
    before ``start`` (or at ``start`` when there is none); one still running at ``end``
    counts up to ``end`` and is marked open. Resolution: the sampling interval."""
    before = [t for t in progress if t <= start]
    inside = sorted(t for t in progress if start < t <= end)
    previous = before[-1] if before else start
    best = Gap(0.0, previous, previous)
    for moment in inside:
        if moment - previous > best.seconds:
            best = Gap(moment - previous, previous, moment)
        previous = moment
    if end - previous > best.seconds:
        best = Gap(end - previous, previous, end, open=True)
    return best


def merged(progress: dict[object, list[float]]) -> list[float]:
    """Progress of anything at all: the union of every series' times."""
    return sorted(t for times in progress.values() for t in times)


def first_after(times: Sequence[float], moment: float) -> float | None:
    return next((t for t in sorted(times) if t > moment), None)


@dataclass
class Milestone:
    """A worker log line that marks a step of a transition."""

    label: str
    pattern: str  # a regular expression; ``{app}`` is the worker's APP_ID


#: Log lines of the worker at main's HEAD (and Faust's and aiokafka's) that date the steps
#: of a start; a later commit's own lines are kept by :data:`INTERESTING` anyway.
MILESTONES = (
    Milestone("web server started", r"\[\^---Server\]: Starting"),
    Milestone("control group: joining", r"\(Re-\)joining group {app}-control\s*$"),
    Milestone("control group: joined", r"Joined group '{app}-control'"),
    Milestone("hot path: starting", r"\[\^--HotPath\]: Starting"),
    Milestone("hot path group: joining", r"\(Re-\)joining group {app}\s*$"),
    Milestone("hot path group: joined", r"Joined group '{app}'"),
    Milestone("hot path group: synced", r"Successfully synced group {app}\b(?!-control)"),
    Milestone("hot path: partitions assigned", r"hot path: assigned home partitions"),
    Milestone("summary writer: applying", r"summary writer: applying"),
    Milestone("Faust: ready", r"\[\^Worker\]: Ready"),
    Milestone("signal received", r"Signal received"),
)
_JOINED = re.compile(r"Joined group '([^']+)' \(generation (-?\d+)\)")
_REBUILD = re.compile(
    r"home partition (\d+): chain head (-?\d+) .*?(\d+) ids read back in ([\d.]+) s"
)
#: Other INFO+ lines worth keeping in the JSON timeline (rebalances, readiness, phases).
INTERESTING = re.compile(
    r"group|hot path|home partition|summary writer|rebuil|snapshot|phase|ready|Ready|"
    r"Signal|Stopping\.\.\.|revok|assigned|heartbeat|Heartbeat|leav|Leav",
)
_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\] \[\d+\] \[(\w+)\] (.*)$")


@dataclass
class Timeline:
    """A worker log read back: milestones and rebuilds in seconds since the process
    started (first occurrence each, and every occurrence of the group joins)."""

    first: dict[str, float] = field(default_factory=dict)
    every: dict[str, list[float]] = field(default_factory=dict)
    rebuilds: list[dict[str, float]] = field(default_factory=list)
    lines: list[tuple[float, str]] = field(default_factory=list)
    #: group -> the generation of its last join (on Tansu the first is 0, and aiokafka
    #: leaves a group on stop only from generation 1 on)
    generations: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "first": self.first,
            "joins": {k: v for k, v in self.every.items() if "group" in k and len(v) > 0},
            "rebuilds": self.rebuilds,
            "generations": self.generations,
            "lines": [[round(t, 3), text] for t, text in self.lines],
        }


def log_timeline(
    log_path: Path, app_id: str, started_wall: float, max_lines: int = 400
) -> Timeline:
    """Milestones of one worker log; log times are local wall-clock times with
    milliseconds (Faust's format), turned into seconds since ``started_wall``."""
    compiled = [
        (m.label, re.compile(m.pattern.replace("{app}", re.escape(app_id)))) for m in MILESTONES
    ]
    timeline = Timeline()
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return timeline
    for raw in text.splitlines():
        match = _LINE.match(raw.strip())
        if not match:
            continue
        stamp, level, message = match.groups()
        when = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp() - started_wall
        for label, pattern in compiled:
            if pattern.search(message):
                timeline.first.setdefault(label, when)
                timeline.every.setdefault(label, []).append(when)
        joined = _JOINED.search(message)
        if joined:
            timeline.generations[joined.group(1)] = int(joined.group(2))
        rebuild = _REBUILD.search(message)
        if rebuild:
            partition, head, ids, seconds = rebuild.groups()
            timeline.rebuilds.append(
                {
                    "at_s": when,
                    "partition": int(partition),
                    "chain_head": int(head),
                    "ids": int(ids),
                    "seconds": float(seconds),
                }
            )
        if (
            level != "DEBUG"
            and INTERESTING.search(message)
            and "refresh" not in message
            and len(timeline.lines) < max_lines
        ):
            timeline.lines.append((when, message.strip()[:240]))
    return timeline
