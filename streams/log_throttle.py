"""Repeated log lines of the Kafka client, summarised instead of flooding the log.

While a broker refuses connections, aiokafka logs every reconnect and metadata retry at
ERROR: about 150 lines a second here, ~1,000 for a six-second outage, which buries the
worker's own one-line-per-condition reports. :class:`RepeatThrottle` lets the first line
of each message template through, then at most one per ``interval`` seconds, carrying how
many were held back ("(and 148 more like it in the last 30 s)"). Nothing else changes:
other loggers, other templates and the first occurrence always pass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["RepeatThrottle", "throttle_kafka_client_logs"]

#: the client's loggers whose retries repeat during an outage
KAFKA_CLIENT_LOGGERS = ("aiokafka", "kafka")


class RepeatThrottle(logging.Filter):
    """Pass each message template once per ``interval`` seconds, counting the rest."""

    def __init__(self, interval: float = 30.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.interval = interval
        self.clock = clock
        self._last: dict[tuple[str, int, object], float] = {}
        self._held: dict[tuple[str, int, object], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.msg)
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            record.msg = f"{record.msg} (and {held} more like it in the last {self.interval:.0f} s)"
        if len(self._last) > 10_000:  # templates are few; guard against formatted messages
            self._last.clear()
        return True


def throttle_kafka_client_logs(interval: float = 30.0) -> RepeatThrottle:
    """Attach one :class:`RepeatThrottle` to every Kafka client logger (idempotent).

    A logger's filters do not apply to its children's records, and aiokafka logs through
    one logger per module (``aiokafka.conn``, ``aiokafka.cluster``, …), so the filter goes
    on each of them: call this after the client is imported."""
    throttle = RepeatThrottle(interval)
    names = [
        name
        for name in logging.root.manager.loggerDict
        if name.split(".", 1)[0] in KAFKA_CLIENT_LOGGERS
    ]
    for name in {*KAFKA_CLIENT_LOGGERS, *names}:
        logger = logging.getLogger(name)
        for existing in list(logger.filters):
            if isinstance(existing, RepeatThrottle):
                logger.removeFilter(existing)
        logger.addFilter(throttle)
    return throttle
