"""The Faust app: it hosts the services (the hot path, the summary writer, the web views,
timers and tasks) and the Faust CLI's commands. :func:`make_app` makes one with nothing
on it; the console script (:func:`agents.main.main`) makes the process's app and hands it
to :func:`agents.wiring.wire`, which registers every service, page, timer, task and
command in one place. There is no module-level app for a module to register itself on
when imported. The app runs no Faust agent, table or Kafka client of its own
(:class:`ServicesBoot`).

Importing this module reads the settings (:data:`settings`, from
:func:`streams.settings.get_settings`, the same object for the whole process); the
console script turns a bad setting into a one-line error (:func:`streams.cli.begin`)
before this module is imported.
"""

from __future__ import annotations

import faust
from faust.app.base import BootStrategy
from faust.auth import SSLCredentials
from faust.types.auth import SASLMechanism

from streams.kafka.broker import kafka_ssl_context
from streams.settings import Settings, get_settings

__all__ = ["UsageStreamApp", "make_app", "settings"]

settings: Settings = get_settings()


def _credentials(settings: Settings) -> object | None:
    ssl_context = kafka_ssl_context(settings)
    if settings.KAFKA_SASL_MECHANISM:
        password = settings.KAFKA_SASL_PASSWORD
        return faust.SASLCredentials(
            username=settings.KAFKA_SASL_USERNAME,
            password=password.get_secret_value() if password else None,
            mechanism=SASLMechanism(settings.KAFKA_SASL_MECHANISM),
            ssl_context=ssl_context,
        )
    return SSLCredentials(ssl_context) if ssl_context is not None else None


class ServicesBoot(BootStrategy):
    """Faust starts its web server, timers, tasks and our services, and no Kafka client
    of its own.

    Why: nothing here uses Faust's consumer or producer. The hot path reads the usage
    topic with its own batched consumer (agents/hot_path/service.py), the summary writer the
    batch log, and they produce with their own producers. Faust's consumer would still
    join a consumer group of its own (``APP_ID-control``) to elect a leader nobody asks
    for, and Faust starts the app's services only after that join: 30 s of every start
    on the test broker, a rebalance of that group on every start and stop."""

    enable_kafka = False


class UsageStreamApp(faust.App):
    BootStrategy = ServicesBoot


def make_app(settings: Settings) -> UsageStreamApp:
    """An app with nothing registered on it yet (:func:`agents.wiring.wire` does that)."""
    return UsageStreamApp(
        # (the name: Faust's app id; no consumer group uses it, see ServicesBoot)
        f"{settings.APP_ID}-control",
        broker=settings.KAFKA_BROKER,
        broker_credentials=_credentials(settings),
        datadir=str(settings.state_dir),
        origin="streams",
        web_port=settings.WEB_PORT,
        web_bind=settings.WEB_HOST,
        web_host=settings.WEB_HOST,
        topic_partitions=settings.USAGE_TOPIC_PARTITIONS,
        topic_replication_factor=settings.KAFKA_REPLICATION_FACTOR,
        broker_session_timeout=settings.KAFKA_SESSION_TIMEOUT_SECONDS,
        broker_rebalance_timeout=settings.KAFKA_REBALANCE_TIMEOUT_SECONDS,
        broker_heartbeat_interval=settings.KAFKA_HEARTBEAT_INTERVAL_SECONDS,
        producer_enable_idempotence=settings.KAFKA_PRODUCER_IDEMPOTENCE,
        consumer_auto_offset_reset="earliest",
        processing_guarantee="at_least_once",
        recovery_consistency_check=settings.RECOVERY_CONSISTENCY_CHECK,
        timezone=settings.tz,
        Worker="streams.worker:Worker",
    )
