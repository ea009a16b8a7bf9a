"""The worker class (Faust's ``Worker`` setting) with Faust's terminal spinner switched off.

At log levels of WARN and above, Faust attaches a spinner handler and sets the root logger
to DEBUG so that the spinner turns on every message: every ``log.debug`` call in aiokafka
and Faust then builds a LogRecord for every Kafka message (measured: ~5 % of the worker's
CPU in the hot path). A service has no terminal to spin on anyway.
"""

from __future__ import annotations

import logging

import faust

__all__ = ["Worker"]


class Worker(faust.Worker):
    def _setup_spinner_handler(self, logger: logging.Logger, level: int) -> None:
        """No spinner: keep the root logger at the level the operator asked for."""
