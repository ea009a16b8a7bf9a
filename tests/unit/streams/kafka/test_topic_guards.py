"""streams/kafka/topic_guards.py: the topic configs the guarantees need."""

from __future__ import annotations

import pytest

from streams.kafka.topic_guards import DAY_MS, check_topic_configs, topic_configs
from streams.settings import Settings


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("APP_ID", "app")
    monkeypatch.setenv("USAGE_TOPIC", "usage")
    monkeypatch.setenv("LEDGER_RETENTION_DAYS", "7")
    return Settings()


def checks(settings: Settings, reported: dict) -> set[tuple[str, str, bool]]:
    return {(p.topic, p.check, p.fatal) for p in check_topic_configs(settings, reported)}


def test_what_the_worker_creates_passes_its_own_checks(settings: Settings) -> None:
    assert check_topic_configs(settings, topic_configs(settings)) == []
    assert int(topic_configs(settings)["usage"]["retention.ms"]) == 8 * DAY_MS


def test_dead_letters_outlive_the_usage_topic(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A month by default, and never less than the usage topic: a replay reads the
    workers' conflict verdicts back from the dead letters."""
    assert int(topic_configs(settings)["usage-dlq"]["retention.ms"]) == 30 * DAY_MS
    monkeypatch.setenv("LEDGER_RETENTION_DAYS", "60")
    longer = Settings()
    assert int(topic_configs(longer)["usage-dlq"]["retention.ms"]) == 61 * DAY_MS
    assert (
        topic_configs(longer)["usage-dlq"]["retention.ms"]
        == (topic_configs(longer)["usage"]["retention.ms"])
    )


def test_dead_letters_kept_less_than_the_ledger_are_a_warning(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay of an older date needs the workers' conflict verdicts: a dead-letter topic
    that keeps fewer days than LEDGER_RETENTION_DAYS is named, without stopping the
    worker (Apache Kafka's 7-day default covers the default ledger)."""
    kafka_default = {"usage-dlq": {"retention.ms": str(7 * DAY_MS)}}
    assert checks(settings, kafka_default) == set()
    monkeypatch.setenv("LEDGER_RETENTION_DAYS", "30")
    assert checks(Settings(), kafka_default) == {("usage-dlq", "retention_ms", False)}


def test_a_broker_that_reports_nothing_is_taken_at_its_defaults(settings: Settings) -> None:
    assert check_topic_configs(settings, {}) == []


def test_apache_kafkas_seven_day_default_covers_the_default_ledger(settings: Settings) -> None:
    kafka_default = {"retention.ms": str(7 * DAY_MS), "cleanup.policy": "delete"}
    assert check_topic_configs(settings, {"usage": kafka_default}) == []


def test_each_weak_setting_is_named(settings: Settings) -> None:
    reported = {
        "usage": {"cleanup.policy": "compact,delete", "retention.ms": str(DAY_MS)},
        "app-rerouted": {"retention.bytes": "1000000"},
        "app-batch-log": {"retention.ms": str(30 * DAY_MS), "cleanup.policy": "compact"},
    }
    assert checks(settings, reported) == {
        ("usage", "cleanup_policy", True),
        ("usage", "retention_ms", True),
        ("app-rerouted", "retention_bytes", False),
        ("app-batch-log", "retention_ms", True),
        ("app-batch-log", "cleanup_policy", True),
    }
    (message,) = [
        p.message
        for p in check_topic_configs(settings, reported)
        if p.check == "retention_ms" and p.topic == "usage"
    ]
    assert "LEDGER_RETENTION_DAYS=7" in message and str(7 * DAY_MS) in message
