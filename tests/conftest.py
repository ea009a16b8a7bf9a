"""Real components for the tests: the Tansu broker and ``usage-stream worker`` processes.

The broker runs once per session (in memory); every test gets its own topic, consumer
group (``APP_ID``), data directory and web port, so tests never see each other's data.
That isolation is what lets the suite run in parallel (pytest-xdist, ``TEST_WORKERS=4 bash
deploy/local/test.sh``): each xdist worker process is a session of its own, with its own
broker.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.kafka.broker import EmbeddedBroker, free_port
from tests.harness import Stack

_ids = itertools.count(1)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log) as running:
        yield running


@pytest.fixture
def stack(broker: EmbeddedBroker, tmp_path: Path) -> Iterator[Stack]:
    test_id = f"t{os.getpid()}-{next(_ids)}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("INFLUXDB_", "KAFKA_"))},
        "APP_ID": f"usage-stream-{test_id}",
        "KAFKA_BROKER": broker.url,
        "USAGE_TOPIC": f"usage-events-{test_id}",
        "USAGE_TOPIC_PARTITIONS": "4",
        "DATA_DIR": str(tmp_path / "data"),
        "WEB_PORT": str(free_port()),
        # Tansu answers a group's first JoinGroup after half the session timeout (5 s a
        # join here, two joins a worker start). 6 s saved ~4 s a start, but it also packs
        # the rebalances after a SIGKILL closer (the dead member expires before the new
        # ones have joined), and one run of tests/scale lost 187 events of a partition
        # kept across two quick rebalances: kept at 10 s until that is understood.
        "KAFKA_SESSION_TIMEOUT_SECONDS": "10",
        "KAFKA_REBALANCE_TIMEOUT_SECONDS": "10",
        "KAFKA_HEARTBEAT_INTERVAL_SECONDS": "1",
        "ROLLUP_INTERVAL_SECONDS": "0.5",
        "RECOVERY_CONSISTENCY_CHECK": "false",  # Tansu's end offsets are wrong
        "KAFKA_STATIC_MEMBERSHIP": "false",  # wedges Tansu groups (streams/settings.py)
        "RAW_BATCH_SECONDS": "0.2",
        # unreachable reference APIs: no test may depend on the internet
        "NBP_API_URL": "http://127.0.0.1:9/api",
        "OPENROUTER_API_URL": "http://127.0.0.1:9/api/v1",
        "PYTHONUNBUFFERED": "1",
    }
    created = Stack(broker, tmp_path, env)
    yield created
    for worker in created.workers:
        if worker.alive():
            worker.kill()
