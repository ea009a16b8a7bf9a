"""12-factor settings: the only module that reads the environment (docs/contract.md §5).

A bad value stops start-up with :class:`SettingsError`, whose message is one line
naming the offending environment variable. Everything that would otherwise fail later,
deep in aiokafka, Faust or a sink with a traceback naming no setting, is checked here:
Kafka security (protocol, SASL mechanism and its credentials, a loadable CA file),
topic names, URLs, hosts, paths that exist as the wrong kind of file, non-finite or
out-of-range numbers, control characters in names and credentials. Messages never
contain the value of a secret.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import os
import re
import socket
import ssl
from decimal import Decimal, InvalidOperation
from pathlib import Path
from urllib.parse import urlparse
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "SASL_MECHANISMS",
    "SECURITY_PROTOCOLS",
    "Settings",
    "SettingsError",
    "get_settings",
    "load_settings",
    "webhook_url_problem",
]

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
# What the worker can use with a username and password alone (faust.SASLCredentials and
# aiokafka's sasl_plain_*): GSSAPI needs Kerberos (faust.GSSAPICredentials + the gssapi
# package) and OAUTHBEARER a token provider callback, neither of which is configurable.
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # Kafka's legal topic characters
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_WORKER_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_BROKER_SCHEMES = ("kafka", "aiokafka")  # Faust's aiokafka transport
_KAFKA_MAX_SECONDS = 2_147_483  # Kafka carries these timeouts as int32 milliseconds
_MAX_DAYS = 36_500  # a century: more is a typo; date arithmetic stays in range
# An empty value of these is the same as unset.
_OPTIONAL = (
    "KAFKA_SASL_MECHANISM",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD",
    "KAFKA_SSL_CAFILE",
    "SUMMARY_DB_PATH",
    "STATE_DIR",
    "INFLUXDB_URL",
    "INFLUXDB_TOKEN",
    "INFLUXDB_ORG",
    "INFLUXDB_BUCKET",
    "INFLUXDB_DATABASE",
    "INFLUXDB_RETENTION_POLICY",
    "INFLUXDB_USERNAME",
    "INFLUXDB_PASSWORD",
    "LEDGER_RETENTION_DAYS",
    "BUDGET_WEBHOOK_URL",
)
_NAMED_MESSAGE = re.compile(r"^[A-Z][A-Z0-9_]*: ")
# Up to the *last* "@": a password may hold "/" (unquoted in a broken URL) or "@".
_URL_USERINFO = re.compile(r"(?<=://).*@")


class SettingsError(ValueError):
    """A setting from the environment is invalid; ``str()`` is one line naming it."""


class Settings(BaseSettings):
    """Every knob of the worker, CLI and sinks. Field names are the env variable names."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=True)

    # Kafka
    APP_ID: str = Field("usage-stream", min_length=1)  # consumer group and internal topic prefix
    #: a stable name per worker (default the host name): its static group membership
    #: where the broker supports it, and who holds the summary writer's claim
    WORKER_ID: str = Field(default_factory=socket.gethostname, min_length=1, max_length=128)
    KAFKA_BROKER: str = "kafka://localhost:9092"
    USAGE_TOPIC: str = "usage-events"
    USAGE_TOPIC_PARTITIONS: int = Field(4, ge=1, le=10_000)
    KAFKA_REPLICATION_FACTOR: int = Field(1, ge=1)  # for the topics the worker creates
    KAFKA_SECURITY_PROTOCOL: str = "PLAINTEXT"
    KAFKA_SASL_MECHANISM: str | None = None
    KAFKA_SASL_USERNAME: str | None = None
    KAFKA_SASL_PASSWORD: SecretStr | None = None
    KAFKA_SSL_CAFILE: Path | None = None
    # The hot path's consumer-group timing. A 10 s session: a dead worker's partitions move
    # within ~10 s (a restart with its WORKER_ID replaces it at once, static membership);
    # nothing blocks the event loop for long (rebuilds run outside the rebalance
    # callback), so heartbeats keep going. Tansu answers a group's first JoinGroup after
    # half the session timeout (30 s with 60 s), Apache Kafka after
    # group.initial.rebalance.delay.ms (3 s) for an empty group.
    KAFKA_SESSION_TIMEOUT_SECONDS: float = Field(10.0, gt=0)
    KAFKA_REBALANCE_TIMEOUT_SECONDS: float = Field(60.0, gt=0)
    KAFKA_HEARTBEAT_INTERVAL_SECONDS: float = Field(3.0, gt=0)
    # Faust refuses to start when a table's persisted offset is past the changelog's end
    # offset. Keep it on for Apache Kafka; Tansu reports wrong end offsets, so the embedded
    # stack and the tests turn it off (local RocksDB state is complete there anyway).
    RECOVERY_CONSISTENCY_CHECK: bool = True
    # Off by default: the local broker (Tansu) cannot initialise aiokafka producer ids.
    KAFKA_PRODUCER_IDEMPOTENCE: bool = False
    #: the hot path as a static group member (KIP-345, its WORKER_ID as the instance id):
    #: a worker restarted after a crash takes its own place at once. Off for the bundled
    #: test broker (Tansu 0.6): a static member that dies while others join wedges the
    #: group there (no assignment ever completes; docs/operations.md)
    KAFKA_STATIC_MEMBERSHIP: bool = True

    # Scale-out: the one worker that applies every worker's aggregates to the summary DB.
    # Workers with false never open it (they need no shared filesystem).
    SUMMARY_WRITER: bool = True

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
    # Records per hot-path batch (one SQLite transaction): the ledger's random inserts
    # cost per dirtied page, so larger batches amortise them (README, Performance).
    BATCH_MAX_EVENTS: int = Field(50_000, ge=1, le=500_000)
    RAW_BATCH_SECONDS: float = Field(1.0, gt=0)
    # Raw line-protocol files: gzipped once their UTC day is over, deleted after this many
    # days (0 keeps them for ever).
    RAW_RETENTION_DAYS: int = Field(30, ge=0)

    # Billing
    USAGE_MARKUP_MULTIPLIER: Decimal = Decimal("1.3")
    BUSINESS_TIMEZONE: str = "Europe/Warsaw"
    WINDOW_GRACE_SECONDS: int = Field(3600, ge=0)
    DEDUP_TTL_DAYS: float = Field(7, gt=0)  # fractions allowed (tests use seconds)
    # How far back a worker that takes a home partition reads request ids from the topics
    # (and the retention the usage and rerouted topics are created with, plus a day);
    # unset = DEDUP_TTL_DAYS.
    LEDGER_RETENTION_DAYS: float | None = Field(None, gt=0)
    ROLLUP_INTERVAL_SECONDS: float = Field(5.0, gt=0)
    # A month's statement closes this many days after its last day
    # (tables/summary_db/statements.py).
    STATEMENT_GRACE_DAYS: int = Field(3, ge=0, le=366)
    # Where budget alerts are POSTed when a budget names no webhook of its own. A secret:
    # webhook URLs carry their token in the path; only the host is ever logged.
    BUDGET_WEBHOOK_URL: SecretStr | None = None

    # Reference data
    REFRESH_CRON: str = "0 13 * * *"
    NBP_API_URL: str = "https://api.nbp.pl/api"
    OPENROUTER_API_URL: str = "https://openrouter.ai/api/v1"
    HTTP_TIMEOUT_SECONDS: float = Field(10.0, gt=0)

    # Replay: how far before local midnight of the date a replay starts reading.
    REPLAY_MARGIN_HOURS: int = Field(24, ge=0)
    # Replay: reader processes, each reading a group of home partitions (0: one per CPU;
    # never more than the usage topic has partitions).
    REPLAY_READERS: int = Field(0, ge=0, le=64)

    # HTTP
    WEB_PORT: int = Field(6066, ge=1, le=65535)
    WEB_HOST: str = "0.0.0.0"

    @field_validator(*_OPTIONAL, mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `VAR=` in an env file or `${VAR}` of an unset variable in a compose file
        return None if isinstance(value, str) and not value.strip() else value

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
            if parsed.scheme not in _BROKER_SCHEMES:
                raise ValueError(f"not a kafka:// URL: {url!r}")
            if not parsed.hostname:
                raise ValueError(f"not a broker URL: {url!r}")
            try:
                parsed.port  # noqa: B018 - raises on a bad port
            except ValueError:
                raise ValueError(f"bad port in {url!r}") from None
        return value

    @field_validator("INFLUXDB_URL", "NBP_API_URL", "OPENROUTER_API_URL")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parsed = urlparse(value)
        shown = _URL_USERINFO.sub("***@", value)  # never echo a password in the URL
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"must be an http(s) URL, got {shown!r}")
        try:
            parsed.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError(f"bad port in {shown!r}") from None
        return value.rstrip("/")

    @field_validator(
        "KAFKA_SESSION_TIMEOUT_SECONDS",
        "KAFKA_REBALANCE_TIMEOUT_SECONDS",
        "KAFKA_HEARTBEAT_INTERVAL_SECONDS",
        "RAW_BATCH_SECONDS",
        "DEDUP_TTL_DAYS",
        "LEDGER_RETENTION_DAYS",
        "ROLLUP_INTERVAL_SECONDS",
        "HTTP_TIMEOUT_SECONDS",
    )
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        # "inf" passes gt=0 and later overflows int(seconds * 1000) or a timedelta
        if value is not None and not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        return value

    @field_validator(
        "KAFKA_SESSION_TIMEOUT_SECONDS",
        "KAFKA_REBALANCE_TIMEOUT_SECONDS",
        "KAFKA_HEARTBEAT_INTERVAL_SECONDS",
    )
    @classmethod
    def _kafka_int32_ms(cls, value: float) -> float:
        if value > _KAFKA_MAX_SECONDS:
            raise ValueError(f"must be at most {_KAFKA_MAX_SECONDS} s, got {value}")
        return value

    @field_validator("DEDUP_TTL_DAYS", "LEDGER_RETENTION_DAYS", "RAW_RETENTION_DAYS")
    @classmethod
    def _at_most_a_century(cls, value: float | None) -> float | None:
        if value is not None and value > _MAX_DAYS:
            raise ValueError(f"must be at most {_MAX_DAYS} days, got {value}")
        return value

    @field_validator("WINDOW_GRACE_SECONDS")
    @classmethod
    def _grace_at_most_a_year(cls, value: int) -> int:
        if value > 366 * 86_400:
            raise ValueError(f"must be at most {366 * 86_400} s (a year), got {value}")
        return value

    @field_validator("REPLAY_MARGIN_HOURS")
    @classmethod
    def _margin_at_most_a_year(cls, value: int) -> int:
        if value > 366 * 24:
            raise ValueError(f"must be at most {366 * 24} hours (a year), got {value}")
        return value

    @field_validator("USAGE_MARKUP_MULTIPLIER")
    @classmethod
    def _sane_multiplier(cls, value: Decimal) -> Decimal:
        # nano-USD sums are SQLite int64: a runaway multiplier would overflow a day's row
        if value > 1000:
            raise ValueError(f"must be at most 1000, got {value}")
        return value

    @field_validator("APP_ID", "USAGE_TOPIC")
    @classmethod
    def _topic_name(cls, value: str, info: ValidationInfo) -> str:
        # APP_ID prefixes internal topic names; USAGE_TOPIC gets "-dlq" appended
        longest = 200 if info.field_name == "APP_ID" else 245
        if not _TOPIC_NAME.fullmatch(value) or len(value) > longest:
            raise ValueError(
                f"must be 1-{longest} of the characters A-Z a-z 0-9 . _ - "
                f"(a Kafka topic name), got {value!r}"
            )
        return value

    @field_validator("KAFKA_SECURITY_PROTOCOL", mode="before")
    @classmethod
    def _security_protocol(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        protocol = value.strip().upper()
        if protocol not in SECURITY_PROTOCOLS:
            raise ValueError(f"must be one of {', '.join(SECURITY_PROTOCOLS)}, got {value!r}")
        return protocol

    @field_validator("KAFKA_SASL_MECHANISM", mode="before")
    @classmethod
    def _sasl_mechanism(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        mechanism = value.strip().upper()
        if not mechanism:  # pydantic runs this before-validator ahead of _empty_is_unset
            return None
        if mechanism in ("GSSAPI", "OAUTHBEARER"):
            raise ValueError(
                f"{mechanism} is not supported (it needs Kerberos or an OAuth token "
                f"provider); use one of {', '.join(SASL_MECHANISMS)}"
            )
        if mechanism not in SASL_MECHANISMS:
            raise ValueError(f"must be one of {', '.join(SASL_MECHANISMS)}, got {value!r}")
        return mechanism

    @field_validator(
        "KAFKA_SASL_USERNAME",
        "INFLUXDB_USERNAME",
        "INFLUXDB_ORG",
        "INFLUXDB_BUCKET",
        "INFLUXDB_DATABASE",
        "INFLUXDB_RETENTION_POLICY",
    )
    @classmethod
    def _printable(cls, value: str | None, info: ValidationInfo) -> str | None:
        # they end up in HTTP headers, URLs and the raw files' header comment lines
        if value is None:
            return None
        if _CONTROL.search(value):
            raise ValueError("must not contain control characters (a stray newline?)")
        if info.field_name == "INFLUXDB_USERNAME" and ":" in value:
            raise ValueError("must not contain ':' (HTTP basic auth)")
        return value

    @field_validator("WORKER_ID")
    @classmethod
    def _worker_id(cls, value: str) -> str:
        if not _WORKER_ID.fullmatch(value):
            raise ValueError(
                f"must be 1-128 of the characters A-Z a-z 0-9 . _ - (a host name), got {value!r}"
            )
        return value

    @field_validator("BUDGET_WEBHOOK_URL")
    @classmethod
    def _webhook_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        problem = webhook_url_problem(value.get_secret_value())
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("KAFKA_SASL_PASSWORD", "INFLUXDB_PASSWORD", "INFLUXDB_TOKEN")
    @classmethod
    def _secret(cls, value: SecretStr | None) -> SecretStr | None:
        # A trailing newline (a secret read from a file) would make the HTTP client raise
        # "Invalid header value b'Token <secret>\n'": the secret in a log line. Never
        # echo the value here.
        if value is not None and _CONTROL.search(value.get_secret_value()):
            raise ValueError("must not contain control characters (a stray newline?)")
        return value

    @field_validator("KAFKA_SSL_CAFILE")
    @classmethod
    def _loadable_cafile(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if not value.is_file():
            raise ValueError(
                f"{value}: no such file" if not value.exists() else f"{value}: not a file"
            )
        try:
            ssl.create_default_context(cafile=str(value))
        except ssl.SSLError as error:
            reason = error.reason or str(error).splitlines()[0]
            raise ValueError(f"{value}: not a PEM CA certificate file ({reason})") from None
        except OSError as error:
            raise ValueError(f"{value}: {error.strerror or error}") from None
        return value

    @field_validator("DATA_DIR", mode="before")
    @classmethod
    def _non_empty_path(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("DATA_DIR", "STATE_DIR")
    @classmethod
    def _not_a_file(cls, value: Path | None) -> Path | None:
        if value is not None and value.exists() and not value.is_dir():
            raise ValueError(f"{value} exists and is not a directory")
        return value

    @field_validator("SUMMARY_DB_PATH")
    @classmethod
    def _not_a_directory(cls, value: Path | None) -> Path | None:
        if value is not None and value.is_dir():
            raise ValueError(f"{value} is a directory, not a database file")
        return value

    @field_validator("WEB_HOST")
    @classmethod
    def _bindable_host(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            labels = value.removesuffix(".").split(".")
            if len(value) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
                raise ValueError(f"not an IP address or host name: {value!r}") from None
        return value

    @model_validator(mode="after")
    def _kafka_security(self) -> Settings:
        protocol, mechanism = self.KAFKA_SECURITY_PROTOCOL, self.KAFKA_SASL_MECHANISM
        if protocol.startswith("SASL_") and not mechanism:
            raise ValueError(
                f"KAFKA_SASL_MECHANISM: required with KAFKA_SECURITY_PROTOCOL={protocol} "
                f"(one of {', '.join(SASL_MECHANISMS)})"
            )
        if mechanism and not protocol.startswith("SASL_"):
            raise ValueError(
                f"KAFKA_SECURITY_PROTOCOL: must be SASL_PLAINTEXT or SASL_SSL when "
                f"KAFKA_SASL_MECHANISM is set, got {protocol}"
            )
        if mechanism and not self.KAFKA_SASL_USERNAME:
            raise ValueError(f"KAFKA_SASL_USERNAME: required by KAFKA_SASL_MECHANISM={mechanism}")
        if mechanism and not self.KAFKA_SASL_PASSWORD:
            raise ValueError(f"KAFKA_SASL_PASSWORD: required by KAFKA_SASL_MECHANISM={mechanism}")
        if self.KAFKA_SSL_CAFILE is not None and not protocol.endswith("SSL"):
            raise ValueError(
                f"KAFKA_SSL_CAFILE: set, but KAFKA_SECURITY_PROTOCOL={protocol} does not use "
                "TLS (SSL or SASL_SSL)"
            )
        if self.KAFKA_HEARTBEAT_INTERVAL_SECONDS >= self.KAFKA_SESSION_TIMEOUT_SECONDS:
            raise ValueError(
                "KAFKA_HEARTBEAT_INTERVAL_SECONDS: must be lower than "
                f"KAFKA_SESSION_TIMEOUT_SECONDS ({self.KAFKA_SESSION_TIMEOUT_SECONDS})"
            )
        return self

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
        if (
            self.raw_sink_kind == "influxdb-v1"
            and self.INFLUXDB_PASSWORD is not None
            and not self.INFLUXDB_USERNAME
            and not urlparse(self.INFLUXDB_URL or "").username
        ):  # the v1 writer sends basic auth only with a user name
            raise ValueError("INFLUXDB_PASSWORD: set without INFLUXDB_USERNAME")
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
    def replay_readers(self) -> int:
        """Reader processes a replay may start (``REPLAY_READERS``, 0: the CPUs this
        process may run on)."""
        return self.REPLAY_READERS or len(os.sched_getaffinity(0)) or 1

    @property
    def rerouted_topic(self) -> str:
        """Valid events moved to their home partition (streams/model/partitioning.py)."""
        return f"{self.APP_ID}-rerouted"

    @property
    def batch_log_topic(self) -> str:
        """Per home partition, the chain of batches and their sums (streams/kafka/batch_log.py)."""
        return f"{self.APP_ID}-batch-log"

    @property
    def writer_topic(self) -> str:
        """The summary writer's claim and heartbeats: one writer per batch log
        (streams/kafka/writer_claim.py)."""
        return f"{self.APP_ID}-writer"

    @property
    def replays_topic(self) -> str:
        """Every replay's result, so a summary writer on a restored or new summary DB
        completes a replay whose fences it meets (agents/replay/results.py)."""
        return f"{self.APP_ID}-replays"

    @property
    def prices_topic(self) -> str:
        """The latest model prices, published by the summary writer for every worker."""
        return f"{self.APP_ID}-prices"

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


MAX_WEBHOOK_URL_CHARS = 2048


def webhook_url_problem(url: str) -> str | None:
    """None for a usable webhook URL (http or https, a host, a valid port, no control
    characters, at most 2048 characters), else the reason, which never echoes the URL:
    its path may hold a token."""
    if len(url) > MAX_WEBHOOK_URL_CHARS:
        return f"must be at most {MAX_WEBHOOK_URL_CHARS} characters"
    if _CONTROL.search(url) or " " in url:
        return "must not contain spaces or control characters"
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return "must be an http(s) URL with a host"
    try:
        parsed.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return "has a bad port"
    return None


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    name = ".".join(str(part) for part in first["loc"]) or "settings"
    message = " ".join(first["msg"].removeprefix("Value error, ").split())  # one line
    # A model validator (no location) names its setting itself: "NAME: reason". A field
    # message that merely starts with something upper-case (a path) must not pass for one.
    if not first["loc"] and _NAMED_MESSAGE.match(message):
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
