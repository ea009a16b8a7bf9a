"""12-factor settings: the only module that reads the environment (CONTRACT §5).

A bad value stops start-up with :class:`SettingsError`, whose message is one line
naming the offending environment variable.
"""

from __future__ import annotations

import functools
from decimal import Decimal, InvalidOperation
from pathlib import Path
from urllib.parse import urlparse
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "SettingsError", "get_settings", "load_settings"]


class SettingsError(ValueError):
    """A setting from the environment is invalid; ``str()`` is one line naming it."""


class Settings(BaseSettings):
    """Every knob of the worker, CLI and sinks. Field names are the env variable names."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=True)

    # Kafka
    APP_ID: str = Field("usage-stream", min_length=1)  # consumer group and internal topic prefix
    KAFKA_BROKER: str = "kafka://localhost:9092"
    USAGE_TOPIC: str = "usage-events"
    USAGE_TOPIC_PARTITIONS: int = Field(4, ge=1, le=10_000)
    KAFKA_REPLICATION_FACTOR: int = Field(1, ge=1)  # for the topics the worker creates
    KAFKA_SECURITY_PROTOCOL: str = "PLAINTEXT"
    KAFKA_SASL_MECHANISM: str | None = None
    KAFKA_SASL_USERNAME: str | None = None
    KAFKA_SASL_PASSWORD: SecretStr | None = None
    KAFKA_SSL_CAFILE: Path | None = None
    # Consumer-group timing; the Faust defaults (60 s) make every join take ~30 s on Tansu.
    KAFKA_SESSION_TIMEOUT_SECONDS: float = Field(60.0, gt=0)
    KAFKA_REBALANCE_TIMEOUT_SECONDS: float = Field(60.0, gt=0)
    KAFKA_HEARTBEAT_INTERVAL_SECONDS: float = Field(3.0, gt=0)
    # Faust refuses to start when a table's persisted offset is past the changelog's end
    # offset. Keep it on for Apache Kafka; Tansu reports wrong end offsets, so the embedded
    # stack and the tests turn it off (local RocksDB state is complete there anyway).
    RECOVERY_CONSISTENCY_CHECK: bool = True
    # Off by default: the local broker (Tansu) cannot initialise aiokafka producer ids.
    KAFKA_PRODUCER_IDEMPOTENCE: bool = False

    # Storage
    DATA_DIR: Path = Path("./data")
    SUMMARY_DB_PATH: Path | None = None
    # Faust's local table state (RocksDB). One per worker process: RocksDB is single-writer.
    STATE_DIR: Path | None = None

    # Raw sink (InfluxDB v2 when INFLUXDB_URL only, v1 when INFLUXDB_DATABASE is set too)
    INFLUXDB_URL: str | None = None
    INFLUXDB_TOKEN: SecretStr | None = None
    INFLUXDB_ORG: str | None = None
    INFLUXDB_BUCKET: str | None = None
    INFLUXDB_DATABASE: str | None = None
    INFLUXDB_RETENTION_POLICY: str | None = None
    INFLUXDB_USERNAME: str | None = None
    INFLUXDB_PASSWORD: SecretStr | None = None
    RAW_BATCH_SIZE: int = Field(5000, ge=1, le=100_000)
    RAW_BATCH_SECONDS: float = Field(1.0, gt=0)
    # Raw line-protocol files: gzipped once their UTC day is over, deleted after this many
    # days (0 keeps them for ever).
    RAW_RETENTION_DAYS: int = Field(30, ge=0)

    # Billing
    USAGE_MARKUP_MULTIPLIER: Decimal = Decimal("1.3")
    BUSINESS_TIMEZONE: str = "Europe/Warsaw"
    WINDOW_GRACE_SECONDS: int = Field(3600, ge=0)
    DEDUP_TTL_DAYS: float = Field(7, gt=0)  # fractions allowed (tests use seconds)
    # Per-event rows (the ledger that deduplicates and lets a late or replayed day be
    # corrected) are pruned after this many days; unset = DEDUP_TTL_DAYS.
    LEDGER_RETENTION_DAYS: float | None = Field(None, gt=0)
    ROLLUP_INTERVAL_SECONDS: float = Field(5.0, gt=0)

    # Reference data
    REFRESH_CRON: str = "0 13 * * *"
    NBP_API_URL: str = "https://api.nbp.pl/api"
    OPENROUTER_API_URL: str = "https://openrouter.ai/api/v1"
    HTTP_TIMEOUT_SECONDS: float = Field(10.0, gt=0)

    # Replay: how far before local midnight of the date a replay starts reading.
    REPLAY_MARGIN_HOURS: int = Field(24, ge=0)

    # HTTP
    WEB_PORT: int = Field(6066, ge=1, le=65535)
    WEB_HOST: str = "0.0.0.0"

    @field_validator("USAGE_MARKUP_MULTIPLIER", mode="before")
    @classmethod
    def _exact_multiplier(cls, value: object) -> Decimal:
        try:
            multiplier = Decimal(str(value))
        except InvalidOperation:
            raise ValueError("not a decimal number") from None
        if not multiplier.is_finite() or multiplier < 0:
            raise ValueError("must be a finite decimal >= 0")
        return multiplier

    @field_validator("BUSINESS_TIMEZONE")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA time zone {value!r}") from None
        return value

    @field_validator("REFRESH_CRON")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        if not croniter.is_valid(value):
            raise ValueError(f"not a valid crontab expression: {value!r}")
        return value

    @field_validator("KAFKA_BROKER")
    @classmethod
    def _broker_urls(cls, value: str) -> str:
        for url in value.split(";"):
            parsed = urlparse(url if "://" in url else f"kafka://{url}")
            if not parsed.hostname:
                raise ValueError(f"not a broker URL: {url!r}")
        return value

    @field_validator("INFLUXDB_URL", "NBP_API_URL", "OPENROUTER_API_URL")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and urlparse(value).scheme not in ("http", "https"):
            raise ValueError(f"must be an http(s) URL, got {value!r}")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _retention_covers_dedupe(self) -> Settings:
        if self.LEDGER_RETENTION_DAYS is not None and (
            self.LEDGER_RETENTION_DAYS < self.DEDUP_TTL_DAYS
        ):
            raise ValueError(
                "LEDGER_RETENTION_DAYS: must be >= DEDUP_TTL_DAYS "
                f"({self.DEDUP_TTL_DAYS}), got {self.LEDGER_RETENTION_DAYS}"
            )
        return self

    @model_validator(mode="after")
    def _influx_complete(self) -> Settings:
        if self.INFLUXDB_URL and not self.INFLUXDB_DATABASE:
            for name in ("INFLUXDB_TOKEN", "INFLUXDB_ORG", "INFLUXDB_BUCKET"):
                if not getattr(self, name):
                    raise ValueError(f"{name}: required for the InfluxDB v2 API (INFLUXDB_URL set)")
        return self

    # Derived values -----------------------------------------------------------------

    @property
    def summary_db_path(self) -> Path:
        return self.SUMMARY_DB_PATH or self.DATA_DIR / "usage.db"

    @property
    def state_dir(self) -> Path:
        """Defaults to ``DATA_DIR/faust-<WEB_PORT>``: workers on one host differ in port."""
        return self.STATE_DIR or self.DATA_DIR / f"faust-{self.WEB_PORT}"

    @property
    def ledger_retention_days(self) -> float:
        """How long per-event rows (and so deduplication) last: never below the TTL."""
        return self.LEDGER_RETENTION_DAYS or self.DEDUP_TTL_DAYS

    @property
    def raw_dir(self) -> Path:
        return self.DATA_DIR / "raw"

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.BUSINESS_TIMEZONE)

    @property
    def dlq_topic(self) -> str:
        return f"{self.USAGE_TOPIC}-dlq"

    @property
    def raw_sink_kind(self) -> str:
        if not self.INFLUXDB_URL:
            return "file"
        return "influxdb-v1" if self.INFLUXDB_DATABASE else "influxdb-v2"

    def broker_bootstrap(self) -> list[str]:
        """``host:port`` list for plain aiokafka clients."""
        servers = []
        for url in self.KAFKA_BROKER.split(";"):
            parsed = urlparse(url if "://" in url else f"kafka://{url}")
            servers.append(f"{parsed.hostname}:{parsed.port or 9092}")
        return servers


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    name = ".".join(str(part) for part in first["loc"]) or "settings"
    message = first["msg"].removeprefix("Value error, ")
    if ":" in message and message.split(":", 1)[0].isupper():
        return f"invalid setting {message}"
    return f"invalid setting {name}: {message}"


def load_settings(**overrides: object) -> Settings:
    """Read the environment (and ``overrides``), raising a one-line :class:`SettingsError`."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise SettingsError(_one_line(error)) from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
