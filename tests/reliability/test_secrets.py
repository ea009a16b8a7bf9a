"""Secrets never leak: not in logs, HTTP answers, CLI errors, nor the settings' repr.

``KAFKA_SASL_PASSWORD``, ``INFLUXDB_PASSWORD`` and ``INFLUXDB_TOKEN`` are set to
distinctive values on a real worker (black box: a process, its log and its HTTP port)
whose raw sink keeps failing against a real influxd with authentication on (401 with a
wrong password on the v1 API; 404 on the v2 API, which influxd 1.x does not have), so
the error paths that format requests and responses are the ones exercised. SASL cannot
run against the test broker, so the worker keeps ``PLAINTEXT`` with the SASL password
set. Everything captured is searched for the secrets, raw and in the encodings an HTTP
client would put them in (basic auth base64, URL quoting).
"""

from __future__ import annotations

import base64
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from streams.kafka.broker import free_port
from streams.settings import load_settings
from tests.harness import REPO, Stack, Worker, http_get, wait_for
from tests.servers import InfluxServer, ServerUnavailable, influxd_server

SASL_PASSWORD = "sasl-Pw-7f3c9e1d/+="
INFLUX_PASSWORD = "influx-Pw-2b8a6d4e/+="
INFLUX_TOKEN = "influx-Tok-9c1e5a7f/+="
SECRETS = (SASL_PASSWORD, INFLUX_PASSWORD, INFLUX_TOKEN)
INFLUX_USER = "admin"

SECRET_ENV = {
    "KAFKA_SASL_USERNAME": "gateway",
    "KAFKA_SASL_PASSWORD": SASL_PASSWORD,  # PLAINTEXT, no mechanism: set but unused
    "INFLUXDB_TOKEN": INFLUX_TOKEN,
    "INFLUXDB_PASSWORD": INFLUX_PASSWORD,
    "INFLUXDB_USERNAME": INFLUX_USER,
}


def secret_forms() -> set[str]:
    """Each secret as it could appear: raw, URL-quoted, base64 alone or as basic auth."""
    forms: set[str] = set()
    for secret in SECRETS:
        forms |= {secret, urllib.parse.quote(secret), urllib.parse.quote_plus(secret)}
        forms.add(base64.b64encode(secret.encode()).decode().rstrip("="))
        for user in (INFLUX_USER, SECRET_ENV["KAFKA_SASL_USERNAME"]):
            forms.add(base64.b64encode(f"{user}:{secret}".encode()).decode().rstrip("="))
    return forms


def leaked(where: str, text: str | bytes) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return [f"{where}: {form!r}" for form in sorted(secret_forms()) if form in text]


@dataclass
class DebugWorker(Worker):
    """The harness's worker at ``--loglevel debug``: what an operator turns on to debug
    exactly these failures, and the level most likely to print a request or a config."""

    def start(self) -> DebugWorker:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agents", "worker", "--loglevel", "debug"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        return self


def event(request_id: str, timestamp_ms: int) -> bytes:
    return orjson.dumps(
        {
            "request_id": request_id,
            "client_org_id": "org-1",
            "user_id": "user-1",
            "model": "openai/gpt-4o-mini",
            "input_tokens": 7,
            "output_tokens": 3,
            "cost_usd": "0.25",
            "timestamp": timestamp_ms,
        }
    )


def metric(worker: Worker, name: str) -> float:
    try:
        return worker.metrics().get(name, 0.0)
    except AssertionError:  # /metrics not answering yet
        return 0.0


def capture_http(worker: Worker, day: str) -> dict[str, bytes]:
    """Every endpoint's body, and a missing page's."""
    paths = [
        "/health",
        "/ready",
        "/status",
        "/metrics",
        f"/usage?client_org_id=org-1&from={day}&to={day}",
        "/no-such-page",
    ]
    return {path: http_get(worker.web + path, timeout=15)[1] for path in paths}


def wait_healthy(worker: Worker) -> None:
    def healthy() -> bool:
        if not worker.alive():
            pytest.fail(f"worker died:\n{worker.log_tail()}")
        return http_get(worker.web + "/health")[0] == 200

    wait_for(healthy, 90, "the worker's /health")


def stop_all(workers: list[Worker], timeout: float = 15.0) -> None:
    """SIGTERM all at once (the shutdown's log lines count too), SIGKILL what still runs.

    A worker whose raw sink keeps failing may not finish its shutdown: not this test's
    subject, so it is killed after ``timeout``."""
    for worker in workers:
        assert worker.process is not None
        worker.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for worker in workers:
        assert worker.process is not None
        try:
            worker.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()


@pytest.fixture
def influxd_with_auth() -> Iterator[InfluxServer]:
    """influxd with authentication on; the worker is never given the right password."""
    manager = influxd_server(auth=(INFLUX_USER, "the-right-password"))
    try:
        server = manager.__enter__()
    except ServerUnavailable as error:  # a missing binary fails the test, never skips it
        pytest.fail(str(error), pytrace=False)
    try:
        server.create_database("usage")
        yield server
    finally:
        manager.__exit__(None, None, None)


def test_worker_logs_and_http_never_show_a_secret(
    stack: Stack, influxd_with_auth: InfluxServer
) -> None:
    common = {**stack.env, **SECRET_ENV, "INFLUXDB_URL": influxd_with_auth.url}
    # InfluxDB 1.x API with a wrong password: every write is a 401
    v1 = DebugWorker(
        {**common, "INFLUXDB_DATABASE": "usage", "WEB_PORT": str(free_port())},
        stack.root / "worker-v1.log",
    )
    # InfluxDB v2 API with the token, against a server without it: every write is a 404.
    # Its own consumer group and data, so both read every event at the same time.
    v2 = Worker(
        {
            **common,
            "INFLUXDB_ORG": "org",
            "INFLUXDB_BUCKET": "usage",
            "APP_ID": stack.env["APP_ID"] + "-v2",
            "DATA_DIR": str(stack.root / "data-v2"),
            "WEB_PORT": str(free_port()),
        },
        stack.root / "worker-v2.log",
    )
    workers = {"v1": v1, "v2": v2}
    stack.workers += [v1, v2]  # killed by the fixture if anything below fails
    for worker in workers.values():
        worker.start()
    for worker in workers.values():
        wait_healthy(worker)

    now_ms = int(time.time() * 1000)
    ids = [f"secret-{i}" for i in range(5)]
    stack.publish(
        [event(request_id, now_ms + i) for i, request_id in enumerate(ids)] + [b"{not json"],
        keys=[request_id.encode() for request_id in ids] + [b"bad"],
    )
    for worker in workers.values():
        wait_for(
            lambda w=worker: metric(w, "usage_stream_raw_write_errors_total") >= 2,
            120,
            "the raw sink to fail twice",
        )
    day = time.strftime("%Y-%m-%d", time.gmtime(now_ms / 1000))
    captured = {name: capture_http(worker, day) for name, worker in workers.items()}
    stop_all(list(workers.values()))
    for name, worker in workers.items():
        captured[name]["log"] = worker.log_path.read_bytes()

    # the errors did happen, and were logged: otherwise nothing was tested
    assert b"HTTP 401" in captured["v1"]["log"]
    assert b"HTTP 404" in captured["v2"]["log"]
    found = [
        leak
        for name, texts in captured.items()
        for where, text in texts.items()
        for leak in leaked(f"{name} {where}", text)
    ]
    assert found == []


def test_failing_commands_print_no_secret(stack: Stack, tmp_path: Path) -> None:
    env = {**SECRET_ENV, "HTTP_TIMEOUT_SECONDS": "2"}
    closed = {"KAFKA_BROKER": "kafka://127.0.0.1:9"}
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    commands: dict[str, tuple[list[str], dict[str, str]]] = {
        "replay bad date": (["replay", "--date", "2026-02-30"], env),
        "replay closed broker": (["replay", "--date", "2026-11-20"], {**env, **closed}),
        "replay empty date": (["replay", "--date", "2020-01-01"], env),
        "refresh closed APIs": (["refresh"], env),
        "worker closed broker": (["worker"], {**env, **closed}),
        "worker unwritable DB": (
            ["worker"],
            {**env, "SUMMARY_DB_PATH": str(not_a_dir / "usage.db")},
        ),
        "publish missing file": (["publish", str(tmp_path / "nope.jsonl")], env),
        "report bad month": (["report", "--month", "2026-13"], env),
        # settings errors whose values hold a secret
        "token with newline": (["worker"], {**env, "INFLUXDB_TOKEN": INFLUX_TOKEN + "\n"}),
        "password in a bad URL": (
            ["worker"],
            {**env, "INFLUXDB_URL": f"ftp://{INFLUX_USER}:{INFLUX_PASSWORD}@influx:8086"},
        ),
        "SASL without user": (
            ["worker"],
            {
                **env,
                "KAFKA_SASL_USERNAME": "",
                "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "KAFKA_SASL_MECHANISM": "PLAIN",
            },
        ),
    }
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {
            name: pool.submit(stack.cli, *args, **cmd_env)
            for name, (args, cmd_env) in commands.items()
        }
        runs = {name: future.result() for name, future in futures.items()}

    succeeded = [name for name, run in runs.items() if run.returncode == 0]
    assert succeeded == [], "these commands were expected to fail"
    found = [leak for name, run in runs.items() for leak in leaked(name, run.stdout + run.stderr)]
    assert found == []
    for name in ("token with newline", "password in a bad URL", "SASL without user"):
        (line,) = runs[name].stderr.decode().strip().splitlines()
        assert line.startswith("usage-stream: invalid setting "), (name, line)


def test_settings_repr_str_and_dump_hide_secrets(tmp_path: Path) -> None:
    settings = load_settings(
        DATA_DIR=tmp_path,
        KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
        KAFKA_SASL_USERNAME="gateway",
        KAFKA_SASL_PASSWORD=SASL_PASSWORD,
        INFLUXDB_URL="http://influx:8086",
        INFLUXDB_DATABASE="usage",
        INFLUXDB_USERNAME=INFLUX_USER,
        INFLUXDB_PASSWORD=INFLUX_PASSWORD,
        INFLUXDB_TOKEN=INFLUX_TOKEN,
    )
    shown = {
        "repr": repr(settings),
        "str": str(settings),
        "format": f"{settings}",
        "dump": repr(settings.model_dump()),
        "json": settings.model_dump_json(),
    }
    assert [leak for where, text in shown.items() for leak in leaked(where, text)] == []
    # and the values are really there, for the clients that need them
    assert settings.KAFKA_SASL_PASSWORD is not None
    assert settings.KAFKA_SASL_PASSWORD.get_secret_value() == SASL_PASSWORD
    assert "**********" in shown["repr"]
