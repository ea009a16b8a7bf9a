"""Real database servers for tests: InfluxDB 1.x (``influxd``) and VictoriaMetrics.

Each server runs on free localhost ports with temporary data directories and can be
stopped and started again on the *same* port and data (outage tests). A missing binary
raises :class:`ServerUnavailable` with a clear message; fixtures turn it into a test
failure, never a silent skip. Binaries default to the Debian packages' paths and can be
overridden with ``INFLUXD_BIN`` / ``VICTORIA_METRICS_BIN``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from streams.kafka.broker import free_port

__all__ = [
    "InfluxServer",
    "ServerUnavailable",
    "VictoriaMetricsServer",
    "free_port",
    "influxd_server",
    "victoria_metrics_server",
]

INFLUXD_BIN = os.environ.get("INFLUXD_BIN", "/usr/bin/influxd")
VICTORIA_METRICS_BIN = os.environ.get("VICTORIA_METRICS_BIN", "/usr/bin/victoria-metrics")
START_TIMEOUT_SECONDS = 30.0


class ServerUnavailable(RuntimeError):
    """The server binary is missing or the server did not come up."""


def _require_binary(path: str, package: str) -> str:
    resolved = shutil.which(path)
    if resolved is None:
        raise ServerUnavailable(
            f"{path} not found: install the Debian package {package!r} "
            f"(apt-get install {package}) or point the *_BIN environment variable at it"
        )
    return resolved


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """A tiny blocking HTTP call for test helpers: (status, body), never raises on 4xx/5xx."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


class _Process:
    """A server process with a log file, restartable with the same command line."""

    name = "server"

    def __init__(self, command: list[str], workdir: Path) -> None:
        self._command = command
        self._workdir = workdir
        self._log_path = workdir / f"{self.name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _ready(self) -> bool:
        raise NotImplementedError

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def start(self) -> None:
        """Start the process and wait until it answers its readiness probe."""
        if self.running:
            return
        with self._log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self._command, stdout=log, stderr=subprocess.STDOUT, cwd=self._workdir
            )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServerUnavailable(
                    f"{self.name} exited with {self._process.returncode} on start:\n"
                    + self.log_tail()
                )
            try:
                if self._ready():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise ServerUnavailable(
            f"{self.name} not ready after {START_TIMEOUT_SECONDS} s:\n" + self.log_tail()
        )

    def stop(self) -> None:
        """Stop the process gracefully (SIGTERM, then SIGKILL after 10 s)."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        self._process = None


class InfluxServer(_Process):
    """``influxd`` (1.x) with a temporary config, meta, data and WAL directory."""

    name = "influxd"

    def __init__(self, workdir: Path, *, auth: tuple[str, str] | None = None) -> None:
        """``auth``: enable authentication with this admin (user, password)."""
        binary = _require_binary(INFLUXD_BIN, "influxdb")
        self.auth = auth
        self.port = free_port()
        self.rpc_port = free_port()
        config = workdir / "influxdb.conf"
        config.write_text(
            f"""\
reporting-disabled = true
bind-address = "127.0.0.1:{self.rpc_port}"

[meta]
  dir = "{workdir / "meta"}"

[data]
  dir = "{workdir / "data"}"
  wal-dir = "{workdir / "wal"}"
  wal-fsync-delay = "0s"
  query-log-enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{self.port}"
  log-enabled = false
  auth-enabled = {"true" if auth else "false"}

[monitor]
  store-enabled = false

[continuous_queries]
  enabled = false

[logging]
  level = "warn"
"""
        )
        super().__init__([binary, "-config", str(config)], workdir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        return http("GET", self.url + "/ping")[0] == 204

    def start(self) -> None:
        super().start()
        if self.auth:  # allowed without credentials while no user exists; idempotent
            user, password = self.auth
            q = f"CREATE USER \"{user}\" WITH PASSWORD '{password}' WITH ALL PRIVILEGES"
            http("POST", f"{self.url}/query?{urllib.parse.urlencode({'q': q})}")

    def _headers(self) -> dict[str, str]:
        if not self.auth:
            return {}
        token = base64.b64encode(":".join(self.auth).encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def write(self, db: str, body: bytes) -> tuple[int, bytes]:
        """POST line protocol to ``/write?db=..&precision=ns``."""
        query = urllib.parse.urlencode({"db": db, "precision": "ns"})
        return http("POST", f"{self.url}/write?{query}", body, self._headers())

    def query(self, q: str, db: str | None = None, method: str = "GET") -> list[dict[str, Any]]:
        """Run InfluxQL (``epoch=ns``); return the ``series`` of the first statement."""
        params = {"q": q, "epoch": "ns"}
        if db:
            params["db"] = db
        url = f"{self.url}/query?{urllib.parse.urlencode(params)}"
        status, body = http(method, url, headers=self._headers())
        result = json.loads(body)
        if status != 200 or "error" in result or "error" in result["results"][0]:
            raise AssertionError(f"InfluxQL {q!r} failed: HTTP {status} {body[:300]!r}")
        return list(result["results"][0].get("series", []))

    def create_database(self, db: str) -> None:
        self.query(f'CREATE DATABASE "{db}"', method="POST")

    def rows(self, db: str, q: str = "SELECT * FROM usage_tracking") -> list[dict[str, Any]]:
        """Query rows as dicts (column -> value), all series concatenated."""
        rows: list[dict[str, Any]] = []
        for series in self.query(q, db):
            for values in series["values"]:
                rows.append(dict(zip(series["columns"], values, strict=True)))
        return rows


class VictoriaMetricsServer(_Process):
    """Single-node ``victoria-metrics`` with a temporary storage directory."""

    name = "victoria-metrics"

    def __init__(self, workdir: Path) -> None:
        binary = _require_binary(VICTORIA_METRICS_BIN, "victoria-metrics")
        self.port = free_port()
        super().__init__(
            [
                binary,
                f"-storageDataPath={workdir / 'storage'}",
                f"-httpListenAddr=127.0.0.1:{self.port}",
                "-retentionPeriod=100y",
                "-loggerLevel=WARN",
            ],
            workdir,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        return http("GET", self.url + "/health")[0] == 200

    def export(
        self,
        match: str = '{__name__=~"usage_tracking_.*"}',
        *,
        min_series: int = 1,
        timeout: float = 10.0,
    ) -> list[dict[str, Any]]:
        """Export matching series (``/api/v1/export`` JSON lines), polling until at least
        ``min_series`` are visible (new series become searchable after about a second)."""
        params = urllib.parse.urlencode({"match[]": match, "start": "0"})
        deadline = time.monotonic() + timeout
        while True:
            http("GET", self.url + "/internal/force_flush")
            status, body = http("GET", f"{self.url}/api/v1/export?{params}")
            if status != 200:
                raise AssertionError(f"export failed: HTTP {status} {body[:300]!r}")
            series = [json.loads(line) for line in body.splitlines() if line.strip()]
            if len(series) >= min_series or time.monotonic() > deadline:
                return series
            time.sleep(0.1)


@contextmanager
def influxd_server(*, auth: tuple[str, str] | None = None) -> Iterator[InfluxServer]:
    """A running ``influxd`` on free ports; stopped and its directories removed at exit."""
    with tempfile.TemporaryDirectory(prefix="influxd-") as tmp:
        server = InfluxServer(Path(tmp), auth=auth)
        server.start()
        try:
            yield server
        finally:
            server.stop()


@contextmanager
def victoria_metrics_server() -> Iterator[VictoriaMetricsServer]:
    """A running VictoriaMetrics on a free port; stopped and its storage removed at exit."""
    with tempfile.TemporaryDirectory(prefix="victoria-metrics-") as tmp:
        server = VictoriaMetricsServer(Path(tmp))
        server.start()
        try:
            yield server
        finally:
            server.stop()
