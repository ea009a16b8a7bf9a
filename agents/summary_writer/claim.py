"""The summary writer's claim on the batch log (the protocol is streams/kafka/writer_claim.py).

* :func:`claim_summary_writer` runs before the worker starts (an after-topics step,
  agents/wiring.py, before anything touches the summary DB's positions): it takes a lock
  beside the summary DB (a second writer process on the same file, same host), appends a
  claim and reads the claims topic to its end. When another writer owns the log,
  :class:`SecondWriter` stops the worker with one line naming it.
* :class:`ClaimKeeper` is the running writer's side: a heartbeat every few seconds, the
  check that it still owns the log, and the release on a clean stop.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sqlite3
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError

from streams.kafka.broker import (
    BOUNDED_READ_WAIT_MS,
    TopicMismatch,
    groupless_consumer,
    kafka_client_kwargs,
)
from streams.kafka.writer_claim import (
    EXPIRY_SECONDS,
    Claimant,
    ClaimState,
    append_claim,
    read_claims,
)
from streams.settings import Settings

__all__ = ["ClaimKeeper", "SecondWriter", "claim_summary_writer", "summary_db_id"]

log = logging.getLogger(__name__)

#: the lock beside the summary DB, held for the process's life (the kernel drops it
#: whenever the process ends)
_held_locks: dict[Path, int] = {}


class SecondWriter(TopicMismatch):
    """Another summary writer owns the batch log (or this summary DB, on this host)."""


def summary_db_id(path: Path) -> str:
    with sqlite3.connect(path, timeout=60) as conn:
        (db_id,) = conn.execute("SELECT id FROM summary_db").fetchone()
    return str(db_id)


def _lock_db(path: Path) -> None:
    lock = path.with_name(path.name + ".writer.lock")
    if path in _held_locks:
        return
    fd = os.open(lock, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SecondWriter(
            f"summary DB {path} is in use by another summary writer on this host (lock"
            f" {lock}): run one writer per summary DB; other workers need SUMMARY_WRITER=false"
        ) from None
    _held_locks[path] = fd


class ClaimKeeper:
    """A writer's claim: appended, kept alive, checked, released (module docstring)."""

    def __init__(self, settings: Settings, claimant: Claimant) -> None:
        self.settings = settings
        self.claimant = claimant
        self.state = ClaimState()
        self._position = 0
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        #: one use of the clients at a time: a heartbeat still reading when the writer
        #: stops made ``stop()`` close the consumer under it (ConsumerStoppedError, and
        #: the worker exited 1 on SIGTERM)
        self._busy = asyncio.Lock()

    async def start(self) -> None:
        client = kafka_client_kwargs(self.settings)
        self._producer = AIOKafkaProducer(acks="all", **client)
        self._consumer = groupless_consumer(
            self.settings,
            fetch_max_wait_ms=BOUNDED_READ_WAIT_MS,
        )
        await self._producer.start()
        await self._consumer.start()

    async def stop(self) -> None:
        async with self._busy:
            for client in (self._producer, self._consumer):
                if client is not None:
                    await client.stop()
            self._producer = self._consumer = None

    async def say(self, kind: str) -> str | None:
        """Append ``kind`` (claim, heartbeat) and read on: None while this writer owns
        the log, else who does."""
        async with self._busy:
            return await self._say(kind)

    async def _say(self, kind: str) -> str | None:
        if self._producer is None or self._consumer is None:
            raise KafkaConnectionError("the claim's clients are stopped")
        await append_claim(self._producer, self.settings.writer_topic, kind, self.claimant)
        self._position = await read_claims(
            self._consumer, self.settings.writer_topic, self.state, self._position
        )
        owner = self.state.live_owner(int(time.time() * 1000))
        if owner is not None and owner.claimant == self.claimant.key:
            return None
        if owner is None:  # (our own record is the newest: never so; read again later)
            return "no live owner"
        age = (time.time() * 1000 - self.state.last_seen_ms) / 1000
        return (
            f"the batch log {self.settings.batch_log_topic} has another summary writer:"
            f" {owner.worker_id} (pid {owner.pid}, seen {age:.0f} s ago); run one writer"
            " per batch log (SUMMARY_WRITER=false on every other worker), or stop that one"
            f" first (its claim expires {EXPIRY_SECONDS:.0f} s after its last heartbeat)"
        )

    async def release(self) -> None:
        async with self._busy:
            if self._producer is None:
                return
            await append_claim(self._producer, self.settings.writer_topic, "release", self.claimant)


def claimant_of(settings: Settings) -> Claimant:
    return Claimant(settings.WORKER_ID, summary_db_id(settings.summary_db_path), os.getpid())


async def claim_summary_writer(settings: Settings) -> None:
    """An after-topics step (agents/wiring.py): lock the summary DB, claim the batch log; raise
    :class:`SecondWriter` when another writer has either."""
    if not settings.SUMMARY_WRITER:
        return
    _lock_db(settings.summary_db_path)
    keeper = ClaimKeeper(settings, claimant_of(settings))
    await keeper.start()
    try:
        other = await keeper.say("claim")
    finally:
        await keeper.stop()
    if other is not None:
        raise SecondWriter(other)


async def release_summary_writer(settings: Settings) -> None:
    """Give the claim back (a start-up refused after the claim, e.g. by the log guard)."""
    keeper = ClaimKeeper(settings, claimant_of(settings))
    await keeper.start()
    try:
        await keeper.release()
    finally:
        await keeper.stop()
