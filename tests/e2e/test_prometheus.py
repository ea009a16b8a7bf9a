"""A real Prometheus scrapes a real worker; the shipped config, rules and dashboard are valid."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import orjson
import pytest

from streams.broker import free_port
from streams.metrics import REGISTRY
from tests.harness import REPO, Stack, http_get, wait_for

DEPLOY = REPO / "deploy"


def binary(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed (apt-get install prometheus)"
    return path


def test_shipped_prometheus_config_and_rules_pass_promtool() -> None:
    for args in (
        ["check", "config", str(DEPLOY / "prometheus/prometheus.yml")],
        ["check", "rules", str(DEPLOY / "prometheus/alerts.yml")],
    ):
        result = subprocess.run([binary("promtool"), *args], capture_output=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_and_alerts_only_use_metrics_the_worker_exports() -> None:
    exported = {sample.name for metric in REGISTRY.collect() for sample in metric.samples} | {
        metric.name for metric in REGISTRY.collect()
    }
    texts = (DEPLOY / "prometheus/alerts.yml").read_text() + json.dumps(
        json.loads((DEPLOY / "grafana/dashboards/usage-stream.json").read_text())
    )
    used = set(re.findall(r"usage_stream_[a-z_]+", texts))
    assert used and used <= exported, used - exported


@pytest.fixture
def prometheus(tmp_path: Path):
    def start(target: str) -> str:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: usage-stream\n"
            f"    static_configs: [{{targets: ['{target}']}}]\n"
        )
        process = subprocess.Popen(
            [
                binary("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "prometheus.log").open("wb"),
        )
        processes.append(process)
        return f"http://127.0.0.1:{port}"

    processes: list[subprocess.Popen] = []
    yield start
    for process in processes:
        process.terminate()
        process.wait(30)


def test_prometheus_scrapes_the_worker(stack: Stack, prometheus) -> None:
    worker = stack.worker().start()
    worker.wait_assigned()
    stack.publish([orjson.dumps({"request_id": "p-1"}), b"not json"])  # two invalid events
    wait_for(
        lambda: worker.metrics().get("usage_stream_events_consumed_total") == 2, 60, "2 events"
    )
    url = prometheus(f"127.0.0.1:{worker.env['WEB_PORT']}")

    def query(expr: str) -> list:
        code, body = http_get(f"{url}/api/v1/query?query={urllib.parse.quote(expr)}")
        return orjson.loads(body)["data"]["result"] if code == 200 else []

    result = wait_for(
        lambda: query("usage_stream_events_consumed_total"), 60, "Prometheus to scrape"
    )
    assert float(result[0]["value"][1]) == 2
    invalid = query('usage_stream_events_invalid_total{reason="missing_field"}')
    assert float(invalid[0]["value"][1]) == 1
    assert float(query('up{job="usage-stream"}')[0]["value"][1]) == 1
