"""Repeated Kafka client log lines are summarised, other lines pass untouched."""

from __future__ import annotations

import logging

import pytest

from streams.log_throttle import RepeatThrottle, throttle_kafka_client_logs


def test_a_repeated_template_passes_once_per_interval_with_a_count() -> None:
    now = [0.0]
    throttle = RepeatThrottle(interval=30, clock=lambda: now[0])

    def record(msg: str, name: str = "aiokafka.conn") -> logging.LogRecord:
        return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, ("x",), None)

    assert throttle.filter(record("Unable connect to %s"))
    held = [throttle.filter(record("Unable connect to %s")) for _ in range(148)]
    assert not any(held)
    assert throttle.filter(record("Other problem %s"))  # another template passes
    assert throttle.filter(record("Unable connect to %s", "aiokafka.cluster"))  # other logger
    now[0] = 31.0
    summary = record("Unable connect to %s")
    assert throttle.filter(summary)
    assert summary.getMessage() == "Unable connect to x (and 148 more like it in the last 30 s)"


def test_attached_to_every_aiokafka_module_logger(caplog: pytest.LogCaptureFixture) -> None:
    import aiokafka.conn  # noqa: F401 - creates the module's logger

    throttle_kafka_client_logs(interval=60)
    logger = logging.getLogger("aiokafka.conn")
    with caplog.at_level(logging.ERROR, logger="aiokafka.conn"):
        for _ in range(50):
            logger.error("Unable connect to node with id %s", 1)
    assert len(caplog.records) == 1
    for name in ("aiokafka.conn", "aiokafka"):
        filters = logging.getLogger(name).filters
        assert sum(isinstance(f, RepeatThrottle) for f in filters) == 1
    throttle_kafka_client_logs(interval=60)  # idempotent
    assert sum(isinstance(f, RepeatThrottle) for f in logger.filters) == 1
