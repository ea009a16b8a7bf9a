"""The worker class (Faust's ``Worker`` setting): no terminal spinner, a bounded stop
that does not linger.

* No spinner: at log levels of WARN and above, Faust attaches a spinner handler and sets
  the root logger to DEBUG so that the spinner turns on every message: every
  ``log.debug`` call in aiokafka and Faust then builds a LogRecord for every Kafka message
  (measured: ~5 % of the worker's CPU in the hot path). A service has no terminal.
* A stop that ends: a worker told to stop (SIGTERM, SIGINT) exits within
  :data:`STOP_DEADLINE_SECONDS` whatever the broker, InfluxDB or a rebuild are doing.
  Each service bounds its own stop; should the whole still hang (a client waiting on a
  frozen broker), the process exits anyway. Nothing is lost that way: a batch not
  appended to the batch log is read again by whoever owns its partition next, and raw
  points and dead letters are at-least-once (tests/reliability/test_stops.py).
* No idle second at the end: once every service has stopped, mode's worker runs the
  loop one more second (``_sentinel_task``) before it closes it, on every stop. That was
  most of a clean stop (1.15 s of it in bench/transitions.py's SIGTERM restart, whose
  target is 10 s in all). The services' own stops have been awaited by then (the hot
  path's last batch, snapshots, LeaveGroup, the writer's apply); a short tick still lets
  the callbacks their closes scheduled (transports' ``connection_lost``) run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading

import faust

__all__ = ["STOP_DEADLINE_SECONDS", "Worker"]

log = logging.getLogger(__name__)

#: from the stop signal to the process's exit, at most (Kubernetes' default grace is 30 s;
#: usage-stream dev waits 12 s before it kills)
STOP_DEADLINE_SECONDS = 9.0
#: the loop's last run before it is closed (mode's is 1 s; module docstring)
LAST_TICK_SECONDS = 0.1


class Worker(faust.Worker):
    def _setup_spinner_handler(self, logger: logging.Logger, level: int) -> None:
        """No spinner: keep the root logger at the level the operator asked for."""

    def _schedule_shutdown(self, signal: signal.Signals) -> None:
        if not self._signal_stop_time:
            deadline = threading.Timer(STOP_DEADLINE_SECONDS, _exit_now)
            deadline.daemon = True
            deadline.start()
        super()._schedule_shutdown(signal)

    async def _sentinel_task(self) -> None:
        """The loop's last run before mode closes it (module docstring)."""
        await asyncio.sleep(LAST_TICK_SECONDS)


def _exit_now() -> None:
    """The stop outlasted its deadline: exit without waiting for the rest (module
    docstring). Exit 0: nothing is lost, the stop was asked for."""
    log.warning(
        "worker: the stop took over %.0f s (a peer not answering); exiting now:"
        " nothing is lost, unappended batches are read again by the next owner",
        STOP_DEADLINE_SECONDS,
    )
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    os._exit(0)
