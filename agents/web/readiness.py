"""``GET /ready``'s answer, kept current in the background (docs/contract.md §6).

Why not probe per request: a probe of a frozen broker takes its whole timeout (the broker
still accepts TCP connections), and Kubernetes gives a readiness probe 1 s. So the
checks that talk to something (:func:`agents.web.health.broker_answers`, the summary DB's
write lock) run every :data:`PROBE_SECONDS` in this service, and ``/ready`` only reads
what they found plus the worker's own state: it answers in microseconds, always.

The answer names the worker's ``phase``:

* ``starting``: the services and the first broker check are not done yet;
* ``joining``: the hot path waits for the consumer group to assign it partitions (at
  start, and from a rebalance's revoke to the next assignment);
* ``rebuilding``: assigned home partitions whose state (the request ids seen) is being
  rebuilt; ``progress`` says which are done;
* ``consuming``: every assigned home partition is read, the broker answers, and on the
  summary writer the DB is writable and nothing holds the writer: the only 200;
* ``blocked``: something stops this worker from billing (``reasons``, one line each).

The summary writer is also not ready while it lags more than :data:`MAX_WRITER_LAG`
batch-log records behind: a writer that far behind (a restore, a long outage) bills
minutes late, and a load balancer or an operator should know.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any

import mode

from agents.hot_path.service import HotPath
from agents.summary_writer.writer import SummaryWriter
from agents.web.health import PROBE_TIMEOUT_SECONDS, broker_answers, summary_db_writable
from streams.settings import Settings
from tables.summary_db.connection import SharedSummaryDb

__all__ = ["MAX_WRITER_LAG", "PROBE_SECONDS", "Readiness"]

PROBE_SECONDS = 1.0
#: a broker whose last good answer is older than this is not answering (the check itself
#: hanging past its own timeout)
BROKER_STALE_SECONDS = 2 * PROBE_SECONDS + PROBE_TIMEOUT_SECONDS
#: batch-log records the summary writer may lag behind and still be ready
MAX_WRITER_LAG = 5_000


class Readiness(mode.Service):
    """The background checks and the answer (module docstring), about this worker's
    ``hot_path``, its summary ``writer`` (None where ``SUMMARY_WRITER`` is false) and
    the shared connection ``db`` (agents/wiring.py hands them over)."""

    def __init__(
        self,
        settings: Settings,
        hot_path: HotPath,
        writer: SummaryWriter | None,
        db: SharedSummaryDb,
    ) -> None:
        self.settings = settings
        self.hot_path = hot_path
        self.writer = writer
        self.db = db
        super().__init__()

    def __post_init__(self) -> None:
        self.broker_ok_at: float | None = None  # monotonic time of the last good answer
        self.broker_problem: str | None = "not checked yet"
        self.db_problem: str | None = None
        self.checked = False

    @mode.Service.task
    async def _probe(self) -> None:
        while not self.should_stop:
            broker, db = await asyncio.gather(broker_answers(self.settings), self._db_writable())
            if broker is None:
                self.broker_ok_at = time.monotonic()
            self.broker_problem, self.db_problem = broker, db
            self.checked = True
            await self.sleep(PROBE_SECONDS)

    async def _db_writable(self) -> str | None:
        path = self.settings.summary_db_path
        if not self.settings.SUMMARY_WRITER:  # this worker never opens it
            return None
        try:
            shared = await asyncio.wait_for(self.db.get(), PROBE_TIMEOUT_SECONDS)
        except (sqlite3.Error, OSError, TimeoutError) as error:
            return f"summary DB {path} not writable: {error!r}"
        own = (shared, self.writer.applier.opened if self.writer else None)
        return await summary_db_writable(path, own)

    def answer(self) -> tuple[bool, dict[str, Any]]:
        """``(ready, body)`` for ``/ready`` (module docstring)."""
        reasons: list[str] = []
        now = time.monotonic()
        if self.broker_problem is not None:
            reasons.append(self.broker_problem)
        elif self.broker_ok_at is None or now - self.broker_ok_at > BROKER_STALE_SECONDS:
            reasons.append("broker has not answered for several seconds")
        if self.db_problem:
            reasons.append(self.db_problem)
        pipeline = self.hot_path
        stuck = pipeline.not_ready_reason()
        if stuck:
            reasons.append(stuck)
        writer = self.writer
        if writer is not None:
            if writer.failing:
                reasons.append(f"summary writer failing: {writer.failing}")
            waiting = writer.waiting_reason()
            if waiting:
                reasons.append(waiting)
            if writer.lag > MAX_WRITER_LAG:
                reasons.append(
                    f"summary writer {writer.lag} batch-log records behind (over {MAX_WRITER_LAG})"
                )
        body: dict[str, Any] = {}
        writer_up = writer is None or writer.started
        if not self.checked or not writer_up:
            phase = "starting"
        elif not pipeline.consumer_started or not pipeline.joined:
            phase = "joining"
            body["since_seconds"] = round(now - pipeline.phase_started, 1)
        elif pipeline.rebuilding:
            phase = "rebuilding"
            assigned = pipeline.assigned_partitions()
            body["progress"] = {
                "assigned": assigned,
                "rebuilt": sorted(pipeline.owned),
                "rebuilding": sorted(pipeline.rebuilding),
            }
        elif reasons:
            phase = "blocked"
        else:
            phase = "consuming"
        body = {"ready": phase == "consuming", "phase": phase, **body}
        if reasons:
            body["reasons"] = reasons
        return phase == "consuming", body
