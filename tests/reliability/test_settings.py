"""Every setting, given a bad value, stops start-up with one line naming it (docs/contract.md §5).

Every case runs in process through :func:`load_settings` reading the environment. The
cases marked ``cli`` (one per kind of check, and every Kafka security one, the settings
that used to die late in aiokafka) also run through the real console script
(``python -m agents worker``) as a subprocess, which must exit 2 fast with exactly one
stderr line naming the setting and no traceback. The console script turns *any*
:class:`SettingsError` into that line, so the in-process cases carry the rest; running all
~65 through a subprocess costs ~0.7 s of CPU each, ~25 s on two cores. The subprocesses
run concurrently in one module fixture.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import certifi
import pytest
from aiokafka import AIOKafkaClient

from streams.kafka.broker import kafka_client_kwargs
from streams.settings import SASL_MECHANISMS, Settings, SettingsError, load_settings

REPO = Path(__file__).resolve().parents[2]
CLOSED_BROKER = "kafka://127.0.0.1:9"  # if a bad value slipped through: fails, differently
SECRET = "s3cr3t-VALUE-for-tests"

# docs/contract.md §5, by name (INFLUXDB_* spelled out from §2).
CONTRACT_SETTINGS = {
    "KAFKA_BROKER",
    "USAGE_TOPIC",
    "USAGE_TOPIC_PARTITIONS",
    "DATA_DIR",
    "SUMMARY_DB_PATH",
    "INFLUXDB_URL",
    "INFLUXDB_TOKEN",
    "INFLUXDB_ORG",
    "INFLUXDB_BUCKET",
    "INFLUXDB_DATABASE",
    "INFLUXDB_RETENTION_POLICY",
    "INFLUXDB_USERNAME",
    "INFLUXDB_PASSWORD",
    "USAGE_MARKUP_MULTIPLIER",
    "BUSINESS_TIMEZONE",
    "WINDOW_GRACE_SECONDS",
    "DEDUP_TTL_DAYS",
    "REFRESH_CRON",
    "NBP_API_URL",
    "OPENROUTER_API_URL",
    "WEB_PORT",
    "LEDGER_RETENTION_DAYS",
    "WORKER_ID",
    "RAW_RETENTION_DAYS",
    "SUMMARY_WRITER",
    "KAFKA_SECURITY_PROTOCOL",
    "KAFKA_SASL_MECHANISM",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD",
    "KAFKA_SSL_CAFILE",
    "BUDGET_WEBHOOK_URL",
    "STATEMENT_GRACE_DAYS",
}

# Placeholders replaced per test run: a regular file, a directory, a file that is not PEM.
FILE, DIRECTORY, NOT_PEM = "@file", "@dir", "@not-pem"
V2 = {"INFLUXDB_URL": "http://127.0.0.1:8086", "INFLUXDB_TOKEN": SECRET}
V2_FULL = {**V2, "INFLUXDB_ORG": "org", "INFLUXDB_BUCKET": "usage"}
V1 = {"INFLUXDB_URL": "http://127.0.0.1:8086", "INFLUXDB_DATABASE": "usage"}
SASL = {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "PLAIN"}


@dataclass(frozen=True)
class Case:
    name: str  # the setting the one line must name
    env: dict[str, str]
    cli: bool = False  # also through the console script

    @property
    def id(self) -> str:
        return f"{self.name}={'|'.join(repr(v)[1:-1][:24] for v in self.env.values())}"


CASES = [
    Case("WORKER_ID", {"WORKER_ID": "host one"}),
    Case("WORKER_ID", {"WORKER_ID": ""}, cli=True),
    Case("APP_ID", {"APP_ID": ""}),
    Case("APP_ID", {"APP_ID": "usage stream"}, cli=True),
    Case("KAFKA_BROKER", {"KAFKA_BROKER": "http://broker:9092"}, cli=True),
    Case("KAFKA_BROKER", {"KAFKA_BROKER": "kafka://broker:ninety"}),
    Case("KAFKA_BROKER", {"KAFKA_BROKER": "kafka://"}),
    Case("USAGE_TOPIC", {"USAGE_TOPIC": "usage events"}),
    Case("USAGE_TOPIC_PARTITIONS", {"USAGE_TOPIC_PARTITIONS": "0"}),
    Case("USAGE_TOPIC_PARTITIONS", {"USAGE_TOPIC_PARTITIONS": "four"}, cli=True),
    Case("KAFKA_REPLICATION_FACTOR", {"KAFKA_REPLICATION_FACTOR": "0"}),
    Case("KAFKA_SECURITY_PROTOCOL", {"KAFKA_SECURITY_PROTOCOL": "TLS"}, cli=True),
    Case(
        "KAFKA_SECURITY_PROTOCOL", {"KAFKA_SASL_MECHANISM": "PLAIN"}, cli=True
    ),  # SASL needs SASL_*
    Case("KAFKA_SASL_MECHANISM", {"KAFKA_SASL_MECHANISM": "MD5"}, cli=True),
    Case("KAFKA_SASL_MECHANISM", {**SASL, "KAFKA_SASL_MECHANISM": "GSSAPI"}),
    Case("KAFKA_SASL_MECHANISM", {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, cli=True),
    Case("KAFKA_SASL_USERNAME", {**SASL, "KAFKA_SASL_PASSWORD": SECRET}, cli=True),
    Case("KAFKA_SASL_USERNAME", {"KAFKA_SASL_USERNAME": "user\n"}),
    Case("KAFKA_SASL_PASSWORD", {**SASL, "KAFKA_SASL_USERNAME": "user"}, cli=True),
    Case("KAFKA_SASL_PASSWORD", {"KAFKA_SASL_PASSWORD": SECRET + "\n"}),
    Case(
        "KAFKA_SSL_CAFILE",
        {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "/no/ca.pem"},
        cli=True,
    ),
    Case(
        "KAFKA_SSL_CAFILE",
        {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": NOT_PEM},
        cli=True,
    ),
    Case("KAFKA_SSL_CAFILE", {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": DIRECTORY}),
    Case("KAFKA_SSL_CAFILE", {"KAFKA_SSL_CAFILE": certifi.where()}),  # TLS is off
    Case("KAFKA_SESSION_TIMEOUT_SECONDS", {"KAFKA_SESSION_TIMEOUT_SECONDS": "0"}),
    Case("KAFKA_SESSION_TIMEOUT_SECONDS", {"KAFKA_SESSION_TIMEOUT_SECONDS": "inf"}),
    Case("KAFKA_REBALANCE_TIMEOUT_SECONDS", {"KAFKA_REBALANCE_TIMEOUT_SECONDS": "-5"}),
    Case("KAFKA_HEARTBEAT_INTERVAL_SECONDS", {"KAFKA_HEARTBEAT_INTERVAL_SECONDS": "120"}, cli=True),
    Case("RECOVERY_CONSISTENCY_CHECK", {"RECOVERY_CONSISTENCY_CHECK": "maybe"}, cli=True),
    Case("KAFKA_PRODUCER_IDEMPOTENCE", {"KAFKA_PRODUCER_IDEMPOTENCE": "sometimes"}),
    Case("KAFKA_STATIC_MEMBERSHIP", {"KAFKA_STATIC_MEMBERSHIP": "always"}),
    Case("DATA_DIR", {"DATA_DIR": FILE}, cli=True),
    Case("DATA_DIR", {"DATA_DIR": ""}),
    Case("SUMMARY_DB_PATH", {"SUMMARY_DB_PATH": DIRECTORY}),
    Case("STATE_DIR", {"STATE_DIR": FILE}),
    Case("INFLUXDB_URL", {"INFLUXDB_URL": "influxdb:8086"}),
    Case("INFLUXDB_URL", {"INFLUXDB_URL": f"ftp://admin:{SECRET}@influxdb"}, cli=True),
    Case("INFLUXDB_TOKEN", {"INFLUXDB_URL": "http://127.0.0.1:8086"}),
    Case("INFLUXDB_TOKEN", {**V2_FULL, "INFLUXDB_TOKEN": SECRET + "\n"}, cli=True),
    Case("INFLUXDB_ORG", V2),
    Case("INFLUXDB_BUCKET", {**V2, "INFLUXDB_ORG": "org"}),
    Case("INFLUXDB_DATABASE", {"INFLUXDB_DATABASE": "usage\nstream"}),
    Case("INFLUXDB_RETENTION_POLICY", {**V1, "INFLUXDB_RETENTION_POLICY": "rp\r"}),
    Case("INFLUXDB_USERNAME", {**V1, "INFLUXDB_USERNAME": "ad:min"}),
    Case("INFLUXDB_PASSWORD", {**V1, "INFLUXDB_PASSWORD": SECRET}, cli=True),
    Case("INFLUXDB_PASSWORD", {**V1, "INFLUXDB_USERNAME": "u", "INFLUXDB_PASSWORD": "a\x1bb"}),
    Case("RAW_BATCH_SIZE", {"RAW_BATCH_SIZE": "0"}),
    Case("RAW_BATCH_SECONDS", {"RAW_BATCH_SECONDS": "0"}),
    Case("BATCH_MAX_EVENTS", {"BATCH_MAX_EVENTS": "0"}),
    Case("RAW_RETENTION_DAYS", {"RAW_RETENTION_DAYS": "-1"}),
    Case("RAW_RETENTION_DAYS", {"RAW_RETENTION_DAYS": "thirty"}),
    Case("USAGE_MARKUP_MULTIPLIER", {"USAGE_MARKUP_MULTIPLIER": "lots"}),
    Case("USAGE_MARKUP_MULTIPLIER", {"USAGE_MARKUP_MULTIPLIER": "-1.3"}),
    Case("USAGE_MARKUP_MULTIPLIER", {"USAGE_MARKUP_MULTIPLIER": "1e30"}),
    Case("BUSINESS_TIMEZONE", {"BUSINESS_TIMEZONE": "Mars/Olympus"}),
    Case("WINDOW_GRACE_SECONDS", {"WINDOW_GRACE_SECONDS": "-1"}),
    Case("WINDOW_GRACE_SECONDS", {"WINDOW_GRACE_SECONDS": "99999999999999"}),
    Case("DEDUP_TTL_DAYS", {"DEDUP_TTL_DAYS": "0"}),
    Case("DEDUP_TTL_DAYS", {"DEDUP_TTL_DAYS": "inf"}, cli=True),
    Case(
        "LEDGER_RETENTION_DAYS", {"LEDGER_RETENTION_DAYS": "3"}, cli=True
    ),  # below DEDUP_TTL_DAYS 7
    Case("ROLLUP_INTERVAL_SECONDS", {"ROLLUP_INTERVAL_SECONDS": "0"}),
    Case("REFRESH_CRON", {"REFRESH_CRON": "daily at 13"}),
    Case("NBP_API_URL", {"NBP_API_URL": "api.nbp.pl/api"}),
    Case("OPENROUTER_API_URL", {"OPENROUTER_API_URL": "ftp://openrouter.ai"}),
    Case("HTTP_TIMEOUT_SECONDS", {"HTTP_TIMEOUT_SECONDS": "nan"}),
    Case("REPLAY_MARGIN_HOURS", {"REPLAY_MARGIN_HOURS": "-1"}),
    Case("REPLAY_READERS", {"REPLAY_READERS": "-1"}),
    Case("REPLAY_READERS", {"REPLAY_READERS": "two"}),
    Case("WEB_PORT", {"WEB_PORT": "70000"}),
    Case("WEB_PORT", {"WEB_PORT": "http"}),
    Case("WEB_HOST", {"WEB_HOST": "not a host"}, cli=True),
    Case("SUMMARY_WRITER", {"SUMMARY_WRITER": "perhaps"}, cli=True),
    Case("STATEMENT_GRACE_DAYS", {"STATEMENT_GRACE_DAYS": "-1"}),
    Case("STATEMENT_GRACE_DAYS", {"STATEMENT_GRACE_DAYS": "3.5"}),
    Case("STATEMENT_GRACE_DAYS", {"STATEMENT_GRACE_DAYS": "9999"}, cli=True),
    # a webhook URL's path is a token: the message never shows it
    Case("BUDGET_WEBHOOK_URL", {"BUDGET_WEBHOOK_URL": f"hooks.example.com/{SECRET}"}, cli=True),
    Case("BUDGET_WEBHOOK_URL", {"BUDGET_WEBHOOK_URL": f"ftp://hooks.example.com/{SECRET}"}),
    Case("BUDGET_WEBHOOK_URL", {"BUDGET_WEBHOOK_URL": f"https://h:99999/{SECRET}"}),
    Case("BUDGET_WEBHOOK_URL", {"BUDGET_WEBHOOK_URL": f"https://h/{SECRET}\n"}),
]


def _pending(case: Case) -> bool:
    return case.name not in Settings.model_fields


def params(cases: list[Case]) -> list[object]:
    return [
        pytest.param(
            case,
            id=case.id,
            marks=pytest.mark.skipif(
                _pending(case), reason=f"{case.name} is not in streams/settings.py yet"
            ),
        )
        for case in cases
    ]


CLI_CASES = [case for case in CASES if case.cli]


def concrete(env: dict[str, str], root: Path) -> dict[str, str]:
    """Replace the placeholders with real paths under ``root``."""
    (root / "a-file").write_text("not a directory\n")
    (root / "a-dir").mkdir(exist_ok=True)
    (root / "not-a-ca.pem").write_text("-----BEGIN CERTIFICATE-----\nnonsense\n")
    paths = {
        FILE: str(root / "a-file"),
        DIRECTORY: str(root / "a-dir"),
        NOT_PEM: str(root / "not-a-ca.pem"),
    }
    return {key: paths.get(value, value) for key, value in env.items()}


def base_env(root: Path) -> dict[str, str]:
    """A clean environment: no setting inherited from the shell running the tests."""
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    return {
        **keep,
        "DATA_DIR": str(root / "data"),
        "KAFKA_BROKER": CLOSED_BROKER,
        "PYTHONUNBUFFERED": "1",
    }


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """``python -m agents worker`` once per case, all cases concurrently."""
    root = tmp_path_factory.mktemp("cli-settings")

    def run(case: Case) -> Run:
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "agents", "worker"],
            env={**base_env(root), **concrete(case.env, root)},
            capture_output=True,
            timeout=60,
            cwd=REPO,
        )
        return Run(
            result.returncode,
            result.stdout.decode(errors="replace"),
            result.stderr.decode(errors="replace"),
            time.monotonic() - started,
        )

    todo = [case for case in CLI_CASES if not _pending(case)]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(zip([c.id for c in todo], pool.map(run, todo), strict=True))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """The test process's environment without any setting, DATA_DIR in ``tmp_path``."""
    for name in list(os.environ):
        if name in Settings.model_fields or name.startswith(("KAFKA_", "INFLUXDB_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    yield tmp_path


@pytest.mark.parametrize("case", params(CASES))
def test_bad_value_is_one_line_naming_the_setting_in_process(
    case: Case, clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in concrete(case.env, clean_env).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    message = str(raised.value)
    assert message.startswith(f"invalid setting {case.name}: "), message
    assert "\n" not in message
    assert SECRET not in message


@pytest.mark.parametrize("case", params(CLI_CASES))
def test_bad_value_stops_the_worker_command_with_one_line(
    case: Case, cli_runs: dict[str, Run]
) -> None:
    run = cli_runs[case.id]
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(f"usage-stream: invalid setting {case.name}: "), lines[0]
    assert "Traceback" not in run.stderr + run.stdout
    assert SECRET not in run.stderr + run.stdout
    assert run.seconds < 10, f"took {run.seconds:.1f}s: got past the settings?"


def test_every_setting_has_a_bad_value_case() -> None:
    """A setting added without a case here fails this test (and so does a contract one)."""
    covered = {case.name for case in CASES}
    assert set(Settings.model_fields) - covered == set()
    assert CONTRACT_SETTINGS - covered == set()


@pytest.mark.parametrize(
    ("protocol", "mechanism"),
    [("sasl_ssl", "scram-sha-256"), (" SASL_PLAINTEXT ", "plain"), ("SASL_SSL", "SCRAM-SHA-512")],
)
async def test_valid_kafka_security_is_normalised_and_accepted_by_aiokafka(
    clean_env: Path, protocol: str, mechanism: str
) -> None:
    settings = load_settings(
        KAFKA_SECURITY_PROTOCOL=protocol,
        KAFKA_SASL_MECHANISM=mechanism,
        KAFKA_SASL_USERNAME="user",
        KAFKA_SASL_PASSWORD=SECRET,
        KAFKA_SSL_CAFILE=certifi.where() if "SSL" in protocol.upper() else "",
    )
    assert settings.KAFKA_SECURITY_PROTOCOL == protocol.strip().upper()
    assert settings.KAFKA_SASL_MECHANISM == mechanism.upper()
    assert settings.KAFKA_SASL_MECHANISM in SASL_MECHANISMS
    # aiokafka validates protocol, mechanism, credentials and TLS context in __init__
    client = AIOKafkaClient(**kafka_client_kwargs(settings))
    await client.close()


async def test_tls_without_sasl_and_plaintext_are_accepted(clean_env: Path) -> None:
    tls = load_settings(KAFKA_SECURITY_PROTOCOL="ssl", KAFKA_SSL_CAFILE=certifi.where())
    assert tls.KAFKA_SECURITY_PROTOCOL == "SSL"
    assert kafka_client_kwargs(tls)["ssl_context"] is not None
    await AIOKafkaClient(**kafka_client_kwargs(tls)).close()
    plain = load_settings()
    assert plain.KAFKA_SECURITY_PROTOCOL == "PLAINTEXT"
    assert "ssl_context" not in kafka_client_kwargs(plain)


def test_an_empty_optional_setting_is_unset(clean_env: Path) -> None:
    """``VAR=`` in an env file, or ``${VAR}`` of an unset variable in a compose file."""
    settings = load_settings(
        INFLUXDB_URL="", KAFKA_SASL_MECHANISM=" ", KAFKA_SSL_CAFILE="", SUMMARY_DB_PATH=""
    )
    assert settings.raw_sink_kind == "file"
    assert settings.KAFKA_SASL_MECHANISM is None and settings.KAFKA_SSL_CAFILE is None
    assert settings.summary_db_path == clean_env / "data" / "usage.db"


def test_a_message_starting_upper_case_still_names_its_setting(clean_env: Path) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(KAFKA_SECURITY_PROTOCOL="SSL", KAFKA_SSL_CAFILE="/CA/ROOT.PEM")
    assert str(raised.value) == "invalid setting KAFKA_SSL_CAFILE: /CA/ROOT.PEM: no such file"
