"""Readiness probes behind ``GET /ready`` (docs/contract.md §6).

``/ready`` answers 200 only when the worker can do its job right now: the broker answers
a real request, the hot path is not stuck retrying a stage, and on the summary writer the
summary DB takes a write lock, the writer is not failing and no replay's fence holds it.
Each probe returns None when fine, else a one-line reason for the 503 body.

* **Broker**: a TCP connect is not enough: a frozen (SIGSTOPped) or wedged broker still
  completes the handshake from the kernel's backlog and then never answers. The probe
  bootstraps a fresh aiokafka client (ApiVersions + Metadata requests, with the worker's
  security settings) and gives it ``timeout`` seconds in total.
* **Summary DB**: a fresh connection takes SQLite's write lock (``BEGIN IMMEDIATE``) and
  releases it at once, waiting at most ``timeout`` seconds. When the lock is not obtained
  and one of the worker's own connections is inside a transaction (a big batch or a
  rollup merge holds it for seconds), the worker is busy, not blocked: ready. Otherwise
  another process (or another worker sharing the DB) holds it, and the reason names the
  DB file. A full disk does not stop this probe (taking and dropping a lock writes
  nothing); the summary writer's failing transaction reports it. Workers with
  ``SUMMARY_WRITER=false`` have no summary DB and skip this probe.
* **Hot path**: :meth:`agents.hot_path.service.HotPath.not_ready_reason`: a stage (prepare,
  commit, fetch, rebuild) failing and retrying, or the raw file sink failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Protocol

from aiokafka import AIOKafkaClient
from aiokafka.errors import KafkaError

from streams.kafka.broker import kafka_client_kwargs
from streams.settings import Settings

__all__ = ["broker_answers", "own_transaction_open", "summary_db_writable"]

PROBE_TIMEOUT_SECONDS = 2.0


class Transactional(Protocol):
    """A connection that tells whether it is inside a transaction (``sqlite3`` and
    ``aiosqlite`` connections both do)."""

    @property
    def in_transaction(self) -> bool: ...


async def broker_answers(settings: Settings, timeout: float = PROBE_TIMEOUT_SECONDS) -> str | None:
    """None when a bootstrap broker answers ApiVersions and Metadata within ``timeout``."""
    client = AIOKafkaClient(
        **kafka_client_kwargs(settings),
        client_id="usage-stream-ready",
        request_timeout_ms=int(timeout * 1000),
        retry_backoff_ms=100,
    )
    servers = ",".join(settings.broker_bootstrap())
    try:
        await asyncio.wait_for(client.bootstrap(), timeout)
    except TimeoutError:
        return f"broker {servers} does not answer (no Metadata response within {timeout:.0f} s)"
    except (KafkaError, OSError) as error:
        return f"broker {servers} unreachable: {type(error).__name__}: {error}"
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), timeout)
    return None


def _take_write_lock(path: Path, timeout: float) -> None:
    """Take and release the write lock on a fresh connection (never the worker's own:
    its long transaction would make the probe itself wait)."""
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def own_transaction_open(*connections: Transactional | None) -> bool:
    """True when one of the worker's own connections is inside a transaction right now
    (``in_transaction`` is a flag read, safe from any thread)."""
    for conn in connections:
        if conn is None:
            continue
        with contextlib.suppress(sqlite3.Error, ValueError, AttributeError):
            if conn.in_transaction:
                return True
    return False


async def summary_db_writable(
    path: Path,
    own: tuple[Transactional | None, ...] = (),
    timeout: float = PROBE_TIMEOUT_SECONDS,
) -> str | None:
    """None when the summary DB takes the write lock within ``timeout`` (or the worker's
    own connections ``own`` hold it), else the reason, naming the file."""
    try:
        await asyncio.to_thread(_take_write_lock, path, timeout)
    except sqlite3.OperationalError as error:
        if "locked" in str(error) or "busy" in str(error):
            if own_transaction_open(*own):
                return None  # our own batch or rollup holds it: busy, not blocked
            return (
                f"summary DB {path} is locked by another writer "
                f"(write lock not obtained within {timeout:.0f} s)"
            )
        return f"summary DB {path} not writable: {error}"
    except (sqlite3.Error, OSError) as error:
        return f"summary DB {path} not writable: {error}"
    return None
