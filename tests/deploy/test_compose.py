"""docker-compose stack, Dockerfile, Prometheus rules and the Grafana dashboard, offline.

No container engine runs here, so every name these files use is checked against the project:
compose against the Compose Specification schema (check-jsonschema's vendored copy), commands
against the CLI's argparse parser, variables against what the app reads, PromQL with a real
PromQL parser (promql-parser), metric names against what finflow/metrics.py registers, and the
Dockerfile with hadolint and BuildKit's parser (the ``dockerfile`` package).
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dockerfile
import prometheus_client
import promql_parser
import pytest
import yaml

from finflow.settings import from_env
from tests.deploy.contract import (
    COUNTERS,
    GAUGES,
    HISTOGRAMS,
    PENDING_COMMANDS,
    PENDING_VARIABLES,
    PROMETHEUS_SERIES,
    QUERYABLE,
    ROOT,
    app_variables,
    cli_commands,
    unknown_variables,
)

COMPOSE_FILE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "finflow.json"
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "15s", "$__range": "1h"}

Service = dict[str, Any]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return spec


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Service]:
    result: dict[str, Service] = compose["services"]
    return result


def finflow_services(services: dict[str, Service]) -> dict[str, Service]:
    """The services that run the project's image."""
    return {n: s for n, s in services.items() if "build" in s}


def environment(service: Service) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping"
    return {k: "" if v is None else str(v) for k, v in env.items()}


def selectors(expr: str) -> set[str]:
    """Metric names a PromQL expression selects, from its syntax tree."""
    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)


def venv_tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, (
        f"{name} is not installed in {Path(sys.executable).parent} (pip install -e .[dev])"
    )
    return found


# --- compose -------------------------------------------------------------------------------


def test_compose_matches_the_compose_spec(tmp_path: Path) -> None:
    check = venv_tool("check-jsonschema")
    result = run(check, "--builtin-schema", "vendor.compose-spec", COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("    healthcheck:", "    healthchek:", 1))
    assert run(check, "--builtin-schema", "vendor.compose-spec", broken).returncode != 0


def test_compose_commands_exist(services: dict[str, Service]) -> None:
    commands = cli_commands()
    used = set()
    for name, service in finflow_services(services).items():
        argv = service.get("command", ["worker"])
        assert isinstance(argv, list), f"{name}: command as a list"
        used.add(argv[0])
        if argv[0] in commands:
            try:
                commands[argv[0]].parse_args(argv[1:])
            except SystemExit:
                pytest.fail(f"{name}: `finflow {' '.join(argv)}` does not parse")
        else:
            assert argv[0] in PENDING_COMMANDS, f"{name}: `finflow {argv[0]}` does not exist"
    assert {"worker", "loadgen", "migrate", "api"} <= used


def test_pending_commands_are_still_pending() -> None:
    implemented = PENDING_COMMANDS & set(cli_commands())
    assert not implemented, f"now implemented, remove from PENDING_COMMANDS: {implemented}"


def test_compose_variables_are_read_by_the_app(services: dict[str, Service]) -> None:
    names = {n for s in services.values() for n in environment(s) if n.startswith("FINFLOW_")}
    assert names
    assert unknown_variables(names) == set()


def interpolate_compose(value: str) -> str:
    """Compose's ``${NAME:-default}`` interpolation with no variable set on the host."""
    return re.sub(r"\$\{[A-Z0-9_]+(?::?-([^}]*))?\}", lambda m: m[1] or "", value)


def test_the_app_accepts_the_compose_settings(services: dict[str, Service]) -> None:
    for name, service in finflow_services(services).items():
        env = {k: interpolate_compose(v) for k, v in environment(service).items()}
        settings = from_env(env)
        assert settings.broker_flavor == "kafka", name
        assert settings.api_tokens == ()


def test_pending_variables_are_still_pending() -> None:
    read = PENDING_VARIABLES & app_variables()
    assert not read, f"the app reads them now, remove from PENDING_VARIABLES: {read}"


def test_compose_dependencies(services: dict[str, Service]) -> None:
    one_shot = {n for n, s in services.items() if s.get("restart") == "no"}
    for name, service in services.items():
        health = service.get("healthcheck", {})
        if name not in one_shot:
            assert health.get("test"), f"{name}: no healthcheck"
            assert not health.get("disable"), f"{name}: healthcheck disabled"
        for dep, how in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = how["condition"]
            if condition == "service_healthy":
                assert dep not in one_shot
            else:
                assert condition == "service_completed_successfully"
                assert dep in one_shot, f"{name} waits for {dep} to exit, which it never does"


def test_workers(services: dict[str, Service]) -> None:
    workers = {
        n: s for n, s in finflow_services(services).items() if s.get("command") == ["worker"]
    }
    assert len(workers) == 2
    urls, volumes = set(), set()
    for name, service in workers.items():
        env = environment(service)
        assert env["FINFLOW_ADVERTISED_URL"] == f"http://{name}:{env['FINFLOW_WEB_PORT']}"
        assert service["hostname"] == name
        assert env["FINFLOW_BROKER_FLAVOR"] == "kafka"
        (mount,) = [v for v in service["volumes"] if v.endswith(":" + env["FINFLOW_DATA_DIR"])]
        urls.add(env["FINFLOW_ADVERTISED_URL"])
        volumes.add(mount.split(":")[0])
        deps = service["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
    assert len(urls) == len(volumes) == 2


def test_kafka_listeners_and_topics(services: dict[str, Service]) -> None:
    kafka = services["kafka"]["environment"]
    listeners = dict(x.split("://") for x in kafka["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert listeners["HOST"] == "localhost:9092"
    assert "127.0.0.1:9092:9092" in services["kafka"]["ports"]
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    for service in finflow_services(services).values():
        env = environment(service)
        assert env["FINFLOW_BROKER_URL"] == f"kafka://{listeners['INTERNAL']}"
        script = " ".join(services["kafka-init"]["command"])
        assert f"--partitions {env['FINFLOW_TOPIC_PARTITIONS']}" in script
    assert services["loadgen"]["profiles"] == ["load"]


def test_bind_mounts_exist(services: dict[str, Service]) -> None:
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), source


# --- Dockerfile ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def instructions() -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(ROOT / "Dockerfile")))


def test_dockerfile_lints_clean() -> None:
    result = run(venv_tool("hadolint"), "--no-color", ROOT / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_the_console_script(instructions: list[dockerfile.Command]) -> None:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    scripts = setup["options.entry_points"]["console_scripts"].strip().splitlines()
    script = scripts[0].split("=")[0].strip()
    stages = [i for i, c in enumerate(instructions) if c.cmd == "FROM"]
    assert len(stages) >= 2, "multi-stage build"
    runtime = instructions[stages[-1] :]
    last = {c.cmd: c for c in runtime}
    assert last["ENTRYPOINT"].json
    assert list(last["ENTRYPOINT"].value) == [script]
    assert last["CMD"].json
    assert list(last["CMD"].value) == ["worker"]
    assert "worker" in cli_commands()
    user = last["USER"].value[0].split(":")[0]
    assert user not in {"root", "0"}
    assert "/var/lib/finflow" in last["VOLUME"].value
    assert any("/healthz" in part for part in last["HEALTHCHECK"].value)
    copies = [c for c in runtime if c.cmd == "COPY"]
    assert all(c.flags == ("--from=builder",) for c in copies), "runtime only takes the venv"
    for command in instructions:
        if command.cmd == "RUN":
            assert "[dev]" not in " ".join(command.value), "no dev dependencies in the image"


def test_dockerfile_base_image(instructions: list[dockerfile.Command]) -> None:
    (arg,) = [c for c in instructions if c.cmd == "ARG" and c.value[0].startswith("PYTHON_IMAGE")]
    assert arg.value[0].split("=", 1)[1].startswith("python:3.11-slim")
    froms = [c.value[0] for c in instructions if c.cmd == "FROM"]
    assert froms == ["${PYTHON_IMAGE}"] * len(froms)


def test_dockerignore_keeps_what_the_build_copies(instructions: list[dockerfile.Command]) -> None:
    kept = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for command in instructions:
        if command.cmd == "COPY" and not command.flags:
            sources = command.value[:-1]
            assert set(sources) <= kept, sources
            assert all((ROOT / s).exists() for s in sources)


# --- Prometheus ----------------------------------------------------------------------------


def alert_rules() -> Iterator[dict[str, Any]]:
    spec = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for group in spec["groups"]:
        assert group["name"]
        assert group["rules"]
        yield from group["rules"]


def test_alert_rules_parse_and_use_known_metrics() -> None:
    names = []
    used: set[str] = set()
    for rule in alert_rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        names.append(rule["alert"])
        metrics = selectors(rule["expr"])
        assert metrics, rule["alert"]
        assert metrics <= QUERYABLE | PROMETHEUS_SERIES, f"{rule['alert']}: {metrics}"
        used |= metrics
        if "for" in rule:
            promql_parser.parse_duration(rule["for"])
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
    assert len(names) == len(set(names))
    required = {
        "finflow_consumer_lag",  # lag
        "finflow_transactions_rejected_total",  # dead-letter rate
        "finflow_http_requests_total",  # error rate
        "finflow_ready",  # readiness
        "up",  # down
        "finflow_sink_errors_total",  # sink errors
    }
    assert required <= used


def test_prometheus_scrapes_the_compose_services(services: dict[str, Service]) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    mounts = dict(
        reversed(v.split(":")[:2]) for v in services["prometheus"]["volumes"] if v.startswith(".")
    )
    for rule_file in config["rule_files"]:
        assert (ROOT / mounts[rule_file]).resolve() == DEPLOY / "prometheus" / "alerts.yml"
    targets = {
        t
        for job in config["scrape_configs"]
        if job["job_name"].startswith("finflow-")
        for static in job["static_configs"]
        for t in static["targets"]
    }
    expected = {
        f"{name}:{environment(s)['FINFLOW_WEB_PORT']}"
        for name, s in finflow_services(services).items()
        if "healthcheck" in s and not s["healthcheck"].get("disable")
    }
    assert targets == expected
    assert all(j.get("metrics_path", "/metrics") == "/metrics" for j in config["scrape_configs"])


# --- Grafana -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panel_targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


def interpolate(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def test_dashboard_queries_use_known_metrics(dashboard: dict[str, Any]) -> None:
    used: set[str] = set()
    for panel, target in panel_targets(dashboard):
        metrics = selectors(interpolate(target["expr"]))
        assert metrics <= QUERYABLE, f"{panel['title']}: {metrics - QUERYABLE}"
        used |= metrics
    required = QUERYABLE - {f"{h}_{s}" for h in HISTOGRAMS for s in ("sum", "count")}
    assert required - used == set(), "metrics without a panel"


def test_dashboard_percentiles(dashboard: dict[str, Any]) -> None:
    def quantiles(metric: str) -> set[float]:
        found: set[float] = set()

        def visit(node: object) -> None:
            if (
                isinstance(node, promql_parser.Call)
                and node.func.name == "histogram_quantile"
                and f"{metric}_bucket" in selectors(str(node.args[1]))
            ):
                found.add(float(str(node.args[0])))

        for _, target in panel_targets(dashboard):
            promql_parser.walk(promql_parser.parse(interpolate(target["expr"])), visit)
        return found

    assert quantiles("finflow_produce_to_apply_seconds") == {0.5, 0.95, 0.99}
    assert quantiles("finflow_sink_batch_seconds") == {0.5, 0.95, 0.99}
    assert quantiles("finflow_http_request_seconds")


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"]
    assert dashboard["title"]
    for panel, target in panel_targets(dashboard):
        assert panel["datasource"]["uid"] == target["datasource"]["uid"] == source["uid"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
    (variable,) = dashboard["templating"]["list"]
    assert variable["datasource"]["uid"] == source["uid"]
    assert "finflow_ready" in variable["definition"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "finflow.yml").read_text())[
        "providers"
    ]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"


def test_grafana_mounts_its_provisioning(services: dict[str, Service]) -> None:
    mounts = {
        target: (ROOT / source).resolve()
        for source, target, *_ in (v.split(":") for v in services["grafana"]["volumes"])
        if source.startswith(".")
    }
    assert mounts["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
    assert mounts["/etc/grafana/dashboards"] == DASHBOARD.parent
    source = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    port = services["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert source["url"] == f"http://prometheus:{port}"


# --- the metric list against the app -------------------------------------------------------


def exported() -> dict[str, str]:
    """Metric names finflow/metrics.py registers, as exposed, with their types."""
    import finflow.metrics  # noqa: F401 - registers the metrics

    result = {}
    for family in prometheus_client.REGISTRY.collect():
        suffix: Callable[[str], str] = {"counter": lambda n: n + "_total"}.get(
            family.type, lambda n: n
        )
        result[suffix(family.name)] = family.type
    return result


def test_listed_metrics_are_exported_by_the_app() -> None:
    types = exported()
    for name in COUNTERS:
        assert types.get(name) == "counter", name
    for name in GAUGES:
        assert types.get(name) == "gauge", name
    for name in HISTOGRAMS:
        assert types.get(name) == "histogram", name
