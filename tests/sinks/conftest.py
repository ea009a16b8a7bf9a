"""Fixtures for the raw sink tests: real influxd / VictoriaMetrics servers and points."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import pytest

from streams.sinks.lineprotocol import RawPoint

try:
    from tests.servers import (
        InfluxServer,
        ServerUnavailable,
        VictoriaMetricsServer,
        influxd_server,
        victoria_metrics_server,
    )
except ModuleNotFoundError:  # pragma: no cover - tests/ not a package: tests/ is on sys.path
    from servers import (  # type: ignore[no-redef]
        InfluxServer,
        ServerUnavailable,
        VictoriaMetricsServer,
        influxd_server,
        victoria_metrics_server,
    )

S = TypeVar("S")

#: 2026-11-20T10:11:12.123Z
EVENT_MS = 1_795_169_472_123


def _serve(manager: AbstractContextManager[S]) -> Iterator[S]:
    """Enter a server context manager, turning a missing binary into a clear failure."""
    try:
        server = manager.__enter__()
    except ServerUnavailable as error:
        pytest.fail(str(error), pytrace=False)
    try:
        yield server
    finally:
        manager.__exit__(None, None, None)


@pytest.fixture(scope="session")
def influxd() -> Iterator[InfluxServer]:
    """One influxd for the session; tests use their own database (``influx_db``)."""
    yield from _serve(influxd_server())


@pytest.fixture
def private_influxd() -> Iterator[InfluxServer]:
    """An influxd of the test's own, which it may stop and restart."""
    yield from _serve(influxd_server())


@pytest.fixture(scope="session")
def victoria_metrics() -> Iterator[VictoriaMetricsServer]:
    yield from _serve(victoria_metrics_server())


@pytest.fixture
def influx_db(influxd: InfluxServer) -> str:
    """A fresh database on the shared influxd."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    influxd.create_database(name)
    return name


_counter = itertools.count()


@pytest.fixture
def make_point() -> Callable[..., RawPoint]:
    """Build a :class:`RawPoint` with sensible defaults and a unique request_id."""

    def make(**overrides: Any) -> RawPoint:
        values: dict[str, Any] = {
            "request_id": f"req-{uuid.uuid4().hex[:8]}-{next(_counter)}",
            "client_org_id": "org-1",
            "user_id": "user-1",
            "model": "openai/gpt-4o-mini",
            "input_tokens": 120,
            "output_tokens": 45,
            "cost_nano": 218_700,
            "markup_cost_nano": 284_310,
            "event_ms": EVENT_MS,
        }
        values.update(overrides)
        return RawPoint(**values)

    return make


def metric(name: str) -> float:
    """Current value of a metric sample in the app registry (0.0 when absent)."""
    from streams.metrics import REGISTRY

    return REGISTRY.get_sample_value(name) or 0.0
