"""A real Prometheus scrapes a real worker; the shipped config, rules and dashboard are valid."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest
import yaml
from aiokafka import AIOKafkaConsumer

from streams.kafka.broker import free_port
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
    import streams.sinks.shipper  # noqa: F401 - registers the spool's metrics, as the worker does

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


# The consumer lag alerts -------------------------------------------------------------------

ALERTS = DEPLOY / "prometheus/alerts.yml"
THRESHOLD = "100000"  # UsageStreamConsumerLagHigh's messages, in both of its terms


def alert_rule(name: str) -> dict:
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    (rule,) = [rule for rule in rules if rule.get("alert") == name]
    return rule


def humanize(value: float) -> str:
    """Prometheus' ``humanize`` template function for values >= 1 (what the alerts use)."""
    for prefix in ("", "k", "M", "G", "T"):
        if abs(value) < 1000:
            return f"{value:.4g}{prefix}"
        value /= 1000
    return f"{value:.4g}P"


def lag_series(topic: str, instance: str, partition: int, values: Sequence[float]) -> dict:
    labels = f'job="usage-stream", instance="{instance}", topic="{topic}", partition="{partition}"'
    return {
        "series": f"usage_stream_consumer_lag{{{labels}}}",
        "values": " ".join(str(int(v)) for v in values),
    }


def consumed_series(instance: str, values: Sequence[float]) -> dict:
    return {
        "series": "usage_stream_events_consumed_total"
        f'{{job="usage-stream", instance="{instance}"}}',
        "values": " ".join(str(int(v)) for v in values),
    }


def lag_high(topic: str, value: float) -> dict:
    return {
        "exp_labels": {"severity": "warning", "topic": topic},
        "exp_annotations": {
            "summary": f"usage-stream is {humanize(value)} messages behind on {topic}"
            " and not catching up"
        },
    }


def stalled(instance: str, topic: str, value: float) -> dict:
    return {
        "exp_labels": {"severity": "warning", "instance": instance, "topic": topic},
        "exp_annotations": {
            "summary": f"usage-stream {instance} has {value:g} messages waiting on {topic}"
            " and recorded none for 15 min"
        },
    }


MINUTES = 121  # two hours of 1-minute samples per scenario


def scenario(
    name: str,
    lags: dict[tuple[str, str, int], Sequence[float]],
    consumed: dict[str, Sequence[float]],
    expect: dict[int, tuple[list[dict], list[dict]]],
) -> dict:
    """One promtool test: the series, and at each minute the firing LagHigh and Stalled
    alerts (a minute missing from ``expect`` is not checked)."""
    checks = []
    for minute, (high, stall) in expect.items():
        checks.append(
            {
                "eval_time": f"{minute}m",
                "alertname": "UsageStreamConsumerLagHigh",
                "exp_alerts": high,
            }
        )
        checks.append(
            {
                "eval_time": f"{minute}m",
                "alertname": "UsageStreamConsumerStalled",
                "exp_alerts": stall,
            }
        )
    return {
        "name": name,
        "interval": "1m",
        "input_series": [lag_series(*key, values) for key, values in lags.items()]
        + [consumed_series(instance, values) for instance, values in consumed.items()],
        "alert_rule_test": checks,
    }


def rule_tests() -> dict:
    """Lag shapes an operator meets, and which of them must page."""
    topic = "usage-events"
    partitions = [("w1:6066", 0), ("w1:6066", 1), ("w2:6066", 2), ("w2:6066", 3)]
    busy_consumed = {i: [m * 600_000 for m in range(MINUTES)] for i in ("w1:6066", "w2:6066")}
    idle_consumed = {i: [5_000_000] * MINUTES for i in ("w1:6066", "w2:6066")}

    def per_partition(shape) -> dict[tuple[str, str, int], list[float]]:
        return {
            (topic, instance, p): [shape(m, p) for m in range(MINUTES)]
            for instance, p in partitions
        }

    def busy(m: int, p: int) -> float:  # a few batches in flight, a burst at minute 60
        return 40_000 if m in (60, 61) else (m * 7919 + p * 104_729) % 20_001

    slow_drain = 4 * (1_000_000 - 100 * 30)  # at minute 30
    return {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            scenario(
                "healthy busy workers: lag bounded by batches in flight, a 2-minute burst",
                per_partition(busy),
                busy_consumed,
                {m: ([], []) for m in (5, 15, 30, 61, 62, 70, 90, 120)},
            ),
            scenario(
                "idle and caught up",
                per_partition(lambda m, p: 0),
                idle_consumed,
                {m: ([], []) for m in (15, 60, 120)},
            ),
            scenario(
                "stuck backlog (SQLite or the raw files failing): flat, nothing recorded",
                per_partition(lambda m, p: 50_000),
                idle_consumed,
                {
                    3: ([], []),
                    30: (
                        [lag_high(topic, 200_000)],
                        [stalled("w1:6066", topic, 100_000), stalled("w2:6066", topic, 100_000)],
                    ),
                },
            ),
            scenario(
                "ingest outpaces the workers: lag grows",
                per_partition(lambda m, p: 400 * m),
                busy_consumed,
                {50: ([], []), 90: ([lag_high(topic, 4 * 400 * 90)], [])},
            ),
            scenario(
                "backlog after an outage, 8M draining steadily for 20 minutes",
                per_partition(lambda m, p: max(0, 2_000_000 - 100_000 * m)),
                busy_consumed,
                {m: ([], []) for m in (5, 12, 15, 19, 30, 60)},
            ),
            scenario(
                "backlog draining too slowly to be gone within the hour",
                per_partition(lambda m, p: 1_000_000 - 100 * m),
                {i: [m * 200 for m in range(MINUTES)] for i in ("w1:6066", "w2:6066")},
                {30: ([lag_high(topic, slow_drain)], [])},
            ),
            scenario(
                "per topic: 60k on each of two topics is not 120k behind",
                {
                    (name, "w1:6066", p): [30_000] * MINUTES
                    for name in ("usage-a", "usage-b")
                    for p in (0, 1)
                },
                {"w1:6066": [m * 600_000 for m in range(MINUTES)]},
                {m: ([], []) for m in (30, 90)},
            ),
            scenario(
                "a small lag that never moves: a stuck worker, not a big backlog",
                {(topic, "w1:6066", 2): [3] * MINUTES},
                {"w1:6066": [1_234] * MINUTES},
                {3: ([], []), 30: ([], [stalled("w1:6066", topic, 3)])},
            ),
        ],
    }


def test_lag_alerts_fire_on_backlogs_only(tmp_path: Path) -> None:
    """promtool's rule unit tests: Prometheus' own rule engine over modelled series."""
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(yaml.safe_dump(rule_tests(), sort_keys=False))
    result = subprocess.run(
        [binary("promtool"), "test", "rules", str(tests)], capture_output=True, timeout=120
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


# The budget alerts -------------------------------------------------------------------------


def budget_rule_tests() -> dict:
    """A client crossing its budget, one staying under it, and webhooks that fail for a
    moment (a restart of the receiver) or for good."""
    instance = 'job="usage-stream", instance="w1:6066"'

    def ratio(client: str, values: Sequence[float]) -> dict:
        return {
            "series": f'usage_stream_budget_used_ratio{{{instance}, client_org_id="{client}"}}',
            "values": " ".join(f"{v:g}" for v in values),
        }

    def undelivered(values: Sequence[int]) -> dict:
        return {
            "series": f"usage_stream_budget_alerts_undelivered{{{instance}}}",
            "values": " ".join(str(v) for v in values),
        }

    def exceeded(client: str, percent: str) -> dict:
        return {
            "exp_labels": {
                "severity": "info",
                "job": "usage-stream",
                "instance": "w1:6066",
                "client_org_id": client,
            },
            "exp_annotations": {
                "summary": f"client {client} has used {percent} of its monthly budget"
            },
        }

    def failing(count: int) -> dict:
        return {
            "exp_labels": {"severity": "warning", "job": "usage-stream", "instance": "w1:6066"},
            "exp_annotations": {
                "summary": f"{count} budget alerts not delivered for 15 min on w1:6066:"
                " the webhook fails"
            },
        }

    def checks(name: str, expect: dict[int, list[dict]]) -> list[dict]:
        return [
            {"eval_time": f"{minute}m", "alertname": name, "exp_alerts": alerts}
            for minute, alerts in expect.items()
        ]

    spend = [min(m / 40, 1.25) for m in range(MINUTES)]  # 100 % at minute 40
    return {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "name": "one client over its budget, one under",
                "interval": "1m",
                "input_series": [ratio("org-a", spend), ratio("org-b", [0.5] * MINUTES)],
                "alert_rule_test": checks(
                    "UsageStreamBudgetExceeded",
                    {39: [], 40: [exceeded("org-a", "100%")], 90: [exceeded("org-a", "125%")]},
                ),
            },
            {
                "name": "a receiver restarting for 5 minutes, then one down for good",
                "interval": "1m",
                "input_series": [
                    undelivered([0] * 10 + [1] * 5 + [0] * 15 + [2] * (MINUTES - 30)),
                ],
                "alert_rule_test": checks(
                    "UsageStreamBudgetWebhookFailing",
                    {14: [], 20: [], 44: [], 46: [failing(2)], 120: [failing(2)]},
                ),
            },
        ],
    }


def test_budget_alerts_fire_on_spend_and_on_webhooks_failing_for_long(tmp_path: Path) -> None:
    tests = tmp_path / "budget_alerts_test.yml"
    tests.write_text(yaml.safe_dump(budget_rule_tests(), sort_keys=False))
    result = subprocess.run(
        [binary("promtool"), "test", "rules", str(tests)], capture_output=True, timeout=120
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def backlog_events(prefix: str, count: int) -> list[bytes]:
    return [
        orjson.dumps(
            {
                "request_id": f"{prefix}-{i}",
                "client_org_id": "org-1",
                "user_id": "user-1",
                "model": "openai/gpt-4o-mini",
                "input_tokens": 5,
                "output_tokens": 1,
                "cost_usd": "0.001",
                "timestamp": 1_795_169_472_000 + i,
            }
        )
        for i in range(count)
    ]


def test_lag_of_a_real_backlog_only_covers_the_source_topic(stack: Stack, prometheus) -> None:
    """A real backlog: events published while the worker is stopped; it restarts with its
    raw files unwritable (``DATA_DIR/raw`` is a file: a broken disk), so nothing can be
    recorded. The lag is exactly the backlog, on the source topic's partitions only
    (and no Faust topic exists: Faust runs no Kafka client, streams/app.py); the alert
    expressions (threshold scaled down to the test's backlog) hold on the real scrape;
    once the directory is
    back the backlog drains and the lag falls to 0, in the worker and in Prometheus."""
    backlog = 4_000
    worker = stack.worker().start()
    worker.wait_assigned()
    assert worker.stop() == 0
    leader = f"{stack.env['APP_ID']}-control-__assignor-__leader"
    assert leader not in asyncio.run(topics(stack)), "Faust joins no group, has no topic"
    stack.publish(backlog_events("stopped", backlog), partitions=[i % 4 for i in range(backlog)])
    raw = Path(stack.env["DATA_DIR"]) / "raw"
    shutil.rmtree(raw, ignore_errors=True)
    raw.write_text("not a directory: raw points cannot be written")
    worker.start().wait_assigned()
    url = prometheus(f"127.0.0.1:{worker.env['WEB_PORT']}")

    def query(expr: str) -> list:
        code, body = http_get(f"{url}/api/v1/query?query={urllib.parse.quote(expr)}")
        assert code == 200, body
        return orjson.loads(body)["data"]["result"]

    def lag_series(total: int) -> dict[str, float] | None:
        """The worker's lag series, once they add up to ``total``."""
        lag = {k: v for k, v in worker.metrics().items() if "consumer_lag" in k}
        return lag if lag and sum(lag.values()) == total else None

    source = {f"usage_stream_consumer_lag{{partition={p},topic={stack.topic}}}" for p in range(4)}
    held = wait_for(lambda: lag_series(backlog), 60, "the backlog in consumer_lag")
    assert held == dict.fromkeys(source, backlog / 4)
    assert worker.metrics()["usage_stream_events_consumed_total"] == 0
    assert worker.status()["consumer_lag"] == {f"{stack.topic}/{p}": backlog // 4 for p in range(4)}

    by_topic = wait_for(
        lambda: (
            (r := query("sum by (topic) (usage_stream_consumer_lag)"))
            and float(r[0]["value"][1]) == backlog
            and r
        ),
        60,
        "Prometheus to scrape the backlog",
    )
    assert [s["metric"] for s in by_topic] == [{"topic": stack.topic}]
    assert {s["metric"]["topic"] for s in query("usage_stream_consumer_lag")} == {stack.topic}
    high = alert_rule("UsageStreamConsumerLagHigh")["expr"]
    assert high.count(THRESHOLD) == 2
    scaled = high.replace(THRESHOLD, str(backlog // 2))
    firing = wait_for(lambda: query(scaled), 30, "the lag alert's expression to hold")
    assert [s["metric"] for s in firing] == [{"topic": stack.topic}]
    stall = alert_rule("UsageStreamConsumerStalled")["expr"]
    (stalled_now,) = wait_for(lambda: query(stall), 30, "the stall alert's expression to hold")
    assert stalled_now["metric"]["topic"] == stack.topic
    assert float(stalled_now["value"][1]) == backlog

    raw.unlink()  # the disk is back: the backlog drains
    wait_for(
        lambda: worker.metrics().get("usage_stream_events_consumed_total") == backlog,
        60,
        "the backlog recorded",
    )
    drained = wait_for(lambda: lag_series(0), 30, "the lag to fall to 0")
    assert set(drained) == source
    wait_for(
        lambda: float(query("sum(usage_stream_consumer_lag)")[0]["value"][1]) == 0,
        30,
        "Prometheus to see the lag at 0",
    )
    assert query(scaled) == [] and query(stall) == []
    peak = query("max_over_time(sum(usage_stream_consumer_lag)[5m:1s])")
    assert float(peak[0]["value"][1]) == backlog  # it rose to the backlog, then fell to 0
    assert {s["metric"]["topic"] for s in query("usage_stream_consumer_lag")} == {stack.topic}


async def topics(stack: Stack) -> set[str]:
    consumer = AIOKafkaConsumer(bootstrap_servers=f"127.0.0.1:{stack.broker.port}")
    await consumer.start()
    try:
        return await consumer.topics()
    finally:
        await consumer.stop()
