"""Failing stages retried forever, and reported once: shared by the hot path
(agents/hot_path/service.py) and the summary writer (agents/summary_writer/writer.py).

Neither may skip what it is working on (a batch, a group of batch-log records): a full
disk, a locked database or a frozen broker stalls it, with backoff, until it goes away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["ConditionLog", "reported", "until_done"]

T = TypeVar("T")


def reported(error: BaseException) -> BaseException:
    """The error worth reporting: on a full disk (SQLITE_FULL) or an I/O error SQLite
    rolls the transaction back itself, so a ``ROLLBACK`` then fails with
    "cannot rollback - no transaction is active", and the real error (``database or disk
    is full``) is only that exception's ``__context__``."""
    while "no transaction is active" in str(error) and error.__context__ is not None:
        error = error.__context__
    return error


class ConditionLog:
    """One log line when a condition starts, a summary at most every ``repeat_seconds``
    while it lasts, one line when it ends.

    The hot path and the summary writer retry a failing stage forever (every 1-8 s), the
    fetch loop every second; a line per attempt would bury the one that says what is
    wrong (a full disk, a locked database, a frozen broker) under hundreds of copies. A
    condition is identified by a name (``"commit"``, ``"fetch"``...); a different error
    text for the same name is the same condition (the error of the latest attempt is kept
    for the summary).
    """

    def __init__(
        self, logger: logging.Logger, who: str = "hot path", repeat_seconds: float = 60.0
    ) -> None:
        self.log = logger
        self.who = who
        self.repeat_seconds = repeat_seconds
        # name -> [first failure (monotonic), last summary (monotonic), attempts, error]
        self._active: dict[str, list[Any]] = {}

    def failed(self, name: str, message: str, error: object, level: int = logging.ERROR) -> None:
        """An attempt failed: log it if the condition is new, or summarise once a while."""
        now = time.monotonic()
        state = self._active.get(name)
        if state is None:
            self._active[name] = [now, now, 1, str(error)]
            self.log.log(level, "%s: %s: %s (retrying; reported once)", self.who, message, error)
            return
        state[2] += 1
        state[3] = str(error)
        if now - state[1] >= self.repeat_seconds:
            state[1] = now
            self.log.log(
                level,
                "%s: %s: still failing after %d attempts in %.0f s: %s",
                self.who,
                message,
                state[2],
                now - state[0],
                error,
            )

    def recovered(self, name: str, message: str) -> None:
        """An attempt succeeded: close the condition (one line, only if it was open)."""
        state = self._active.pop(name, None)
        if state is not None:
            self.log.warning(
                "%s: %s: recovered after %d failed attempts in %.0f s",
                self.who,
                message,
                state[2],
                time.monotonic() - state[0],
            )

    def active(self) -> dict[str, str]:
        """Open conditions: name -> the latest error text."""
        return {name: state[3] for name, state in self._active.items()}


async def until_done(
    conditions: ConditionLog,
    name: str,
    message: str,
    step: Callable[[], Awaitable[T]],
    errors: tuple[type[BaseException], ...],
    max_delay: float = 8.0,
) -> T:
    """``await step()`` until it succeeds; ``errors`` are reported once (``conditions``)
    and retried after 1, 2, 4... up to ``max_delay`` seconds; anything else propagates."""
    delay = 1.0
    while True:
        try:
            result = await step()
        except errors as error:
            conditions.failed(name, message, reported(error))
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
        else:
            conditions.recovered(name, message)
            return result
