"""The Helm chart, rendered by Helm's own engine (helm-python-sdk) and validated offline.

Core objects are validated with kubernetes-validate --strict against the Kubernetes
``KUBE_VERSION`` OpenAPI schemas. KEDA's ScaledObject/TriggerAuthentication and the Prometheus
Operator's ServiceMonitor are CRDs those schemas lack: they are validated against pydantic
models generated from the projects' own CRD schemas (cloudcoil-models-keda,
cloudcoil-models-prometheus-operator), which enforce required fields and types. The models
ignore unknown fields, so the test also requires that a round trip through a model keeps every
field (an unknown or misspelt field is dropped, and that fails like ``--strict`` does).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject, TriggerAuthentication
from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor
from mode.services import Service
from pydantic import BaseModel

from finflow.settings import from_env
from tests.deploy.contract import PENDING_COMMANDS, ROOT, cli_commands, unknown_variables

CHART = ROOT / "helm" / "finflow"
KUBE_VERSION = "1.37.0"
RELEASE, NAMESPACE = "ff", "payments"
CASES = ("default", *sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").iterdir()))
CRD_MODELS: dict[tuple[str, str], type[BaseModel]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): ScaledObject,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): TriggerAuthentication,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ServiceMonitor,
}
SA_SL = {"SCRAM-SHA-512": "scram_sha512", "SCRAM-SHA-256": "scram_sha256", "PLAIN": "plaintext"}

Manifest = dict[str, Any]


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


def case_values(case: str) -> dict[str, Any]:
    if case == "default":
        return {}
    values: dict[str, Any] = yaml.safe_load((CHART / "ci" / f"{case}-values.yaml").read_text())
    return values


def render(chart: helm_python.Chart, values: dict[str, Any]) -> list[Manifest]:
    """Every object the chart renders for ``values`` (hooks included)."""
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def of_kind(docs: list[Manifest], kind: str) -> list[Manifest]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Manifest], kind: str, component: str | None = None) -> Manifest:
    found = [
        d
        for d in of_kind(docs, kind)
        if component is None
        or d["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"expected one {kind} ({component}), got {len(found)}"
    return found[0]


def env_of(container: Manifest) -> dict[str, Manifest]:
    return {e["name"]: e for e in container.get("env", [])}


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion of an env value against earlier variables."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), text)


def containers(doc: Manifest) -> list[Manifest]:
    spec = doc["spec"]["template"]["spec"] if doc["kind"] != "Pod" else doc["spec"]
    result: list[Manifest] = spec["containers"] + spec.get("initContainers", [])
    return result


@pytest.mark.parametrize("case", CASES)
def test_values_match_schema(chart: helm_python.Chart, case: str) -> None:
    merged = chart.merge_values(case_values(case))
    chart.validate_schema(merged)
    schema = chart.schema
    assert schema is not None
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(merged)


@pytest.mark.parametrize(
    ("bad", "where"),
    [
        ({"autoscaling": {"mode": "both"}}, "/autoscaling/mode"),
        ({"kafka": {"securityProtocol": "SASL_SSL"}}, "/kafka/sasl/mechanism"),
        ({"kafka": {"tls": {"caSecret": "ca"}}}, "/kafka/tls/caSecret"),
        ({"config": {"FINFLOW_ADVERTISED_URL": "http://x"}}, "FINFLOW_ADVERTISED_URL"),
        ({"kafka": {"partitions": 0}}, "/kafka/partitions"),
        ({"kafka": {"bootstrapServers": "kafka://k:9092"}}, "/kafka/bootstrapServers"),
    ],
)
def test_schema_rejects(chart: helm_python.Chart, bad: dict[str, Any], where: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(where)):
        chart.validate_schema(chart.merge_values(bad))


@pytest.mark.parametrize("case", CASES)
def test_lint_is_clean(case: str) -> None:
    report = helm_python.lint(
        CHART, case_values(case), strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}"
    )
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


@pytest.mark.parametrize("case", CASES)
def test_manifests_are_valid(chart: helm_python.Chart, case: str) -> None:
    docs = render(chart, case_values(case))
    assert docs
    for doc in docs:
        model = CRD_MODELS.get((doc["apiVersion"], doc["kind"]))
        if model is None:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        else:
            parsed = model.model_validate(doc)
            kept = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
            assert kept == doc, f"{doc['kind']}: fields outside the CRD schema"


def test_strict_validation_is_strict() -> None:
    """The validators above do reject unknown fields (guards against a silent no-op)."""
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 1}], "bogus": 1},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(svc, KUBE_VERSION, strict=True)
    so = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "x"},
        "spec": {"scaleTargetRef": {"name": "x"}, "triggers": [], "maxReplicas": 3},
    }
    kept = ScaledObject.model_validate(so).model_dump(by_alias=True, exclude_unset=True)
    assert kept != so
    with pytest.raises(ValueError, match="triggers"):
        ScaledObject.model_validate({**so, "spec": {"scaleTargetRef": {"name": "x"}}})


@pytest.mark.parametrize("case", CASES)
def test_at_most_one_autoscaler(chart: helm_python.Chart, case: str) -> None:
    values = chart.merge_values(case_values(case))
    docs = render(chart, case_values(case))
    keda, hpa = of_kind(docs, "ScaledObject"), of_kind(docs, "HorizontalPodAutoscaler")
    mode = values["autoscaling"]["mode"]
    assert (len(keda), len(hpa)) == {"none": (0, 0), "keda": (1, 0), "hpa": (0, 1)}[mode]
    sts = one(docs, "StatefulSet")
    # An autoscaler owns the replica count; `helm upgrade` must not reset it.
    assert ("replicas" in sts["spec"]) == (mode == "none")


def test_autoscaling_modes_cover_keda_and_hpa() -> None:
    modes = {case_values(c).get("autoscaling", {}).get("mode", "none") for c in CASES}
    assert {"none", "keda", "hpa"} <= modes


@pytest.mark.parametrize("case", CASES)
def test_autoscalers_stop_at_the_partition_count(chart: helm_python.Chart, case: str) -> None:
    values = chart.merge_values(case_values(case))
    partitions = values["kafka"]["partitions"]
    sts = one(render(chart, case_values(case)), "StatefulSet")
    for doc in render(chart, case_values(case)):
        if doc["kind"] == "ScaledObject":
            assert doc["spec"]["maxReplicaCount"] == partitions
            assert doc["spec"]["minReplicaCount"] <= partitions
            target = doc["spec"]["scaleTargetRef"]
        elif doc["kind"] == "HorizontalPodAutoscaler":
            assert doc["spec"]["maxReplicas"] == partitions
            target = doc["spec"]["scaleTargetRef"]
        else:
            continue
        assert target == {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "name": sts["metadata"]["name"],
        }


def test_keda_scales_on_the_consumer_group_lag(chart: helm_python.Chart) -> None:
    values = chart.merge_values(case_values("keda"))
    docs = render(chart, case_values("keda"))
    (trigger,) = one(docs, "ScaledObject")["spec"]["triggers"]
    env = env_of(containers(one(docs, "StatefulSet"))[0])
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == env["FINFLOW_APP_ID"]["value"] == values["appId"]
    assert meta["topic"] == "transactions"
    assert meta["bootstrapServers"] == env["FINFLOW_BROKER_URL"]["value"]
    assert meta["allowIdleConsumers"] == "false"
    assert int(meta["lagThreshold"]) == values["autoscaling"]["keda"]["lagThreshold"]
    assert "authenticationRef" not in trigger


def test_keda_authenticates_like_the_workers(chart: helm_python.Chart) -> None:
    values = chart.merge_values(case_values("tls"))
    docs = render(chart, case_values("tls"))
    (trigger,) = one(docs, "ScaledObject")["spec"]["triggers"]
    assert trigger["metadata"]["sasl"] == SA_SL[values["kafka"]["sasl"]["mechanism"]]
    assert trigger["metadata"]["tls"] == "enable"
    auth = one(docs, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    keys = values["secretKeys"]
    client = values["kafka"]["tls"]["clientCertSecret"]
    assert refs == {
        "username": (values["existingSecret"], keys["kafkaSaslUsername"]),
        "password": (values["existingSecret"], keys["kafkaSaslPassword"]),
        "ca": (values["kafka"]["tls"]["caSecret"], values["kafka"]["tls"]["caKey"]),
        "cert": (client, "tls.crt"),
        "key": (client, "tls.key"),
    }


@pytest.mark.parametrize("case", CASES)
def test_each_worker_advertises_its_own_url(chart: helm_python.Chart, case: str) -> None:
    values = chart.merge_values(case_values(case))
    docs = render(chart, case_values(case))
    sts = one(docs, "StatefulSet")
    name = sts["metadata"]["name"]
    headless = [s for s in of_kind(docs, "Service") if s["spec"].get("clusterIP") == "None"]
    assert [s["metadata"]["name"] for s in headless] == [sts["spec"]["serviceName"]]
    assert headless[0]["spec"]["publishNotReadyAddresses"] is True
    assert (
        headless[0]["spec"]["selector"].items()
        <= sts["spec"]["template"]["metadata"]["labels"].items()
    )
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    (worker,) = containers(sts)
    port = worker["ports"][0]["containerPort"]
    urls = []
    for ordinal in range(values["kafka"]["partitions"]):
        env: dict[str, str] = {}
        for var in worker["env"]:
            field = var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
            if field == "metadata.name":
                env[var["name"]] = f"{name}-{ordinal}"
            elif field == "metadata.namespace":
                env[var["name"]] = NAMESPACE
            elif "value" in var:
                env[var["name"]] = expand(var["value"], env)
        urls.append(env["FINFLOW_ADVERTISED_URL"])
        host = f"{name}-{ordinal}.{sts['spec']['serviceName']}.{NAMESPACE}.svc.cluster.local"
        assert env["FINFLOW_ADVERTISED_URL"] == f"http://{host}:{port}"
        assert env["FINFLOW_WEB_PORT"] == str(port)
    assert len(set(urls)) == len(urls)


@pytest.mark.parametrize("case", CASES)
def test_workers_run_locked_down(chart: helm_python.Chart, case: str) -> None:
    docs = render(chart, case_values(case))
    for doc in of_kind(docs, "StatefulSet") + of_kind(docs, "Deployment") + of_kind(docs, "Job"):
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        volumes = {v["name"] for v in pod.get("volumes", [])} | {
            t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])
        }
        for container in containers(doc):
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["capabilities"]["drop"] == ["ALL"]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert {"/tmp", "/var/lib/finflow"} <= mounts.keys()
            assert set(mounts.values()) <= volumes
            assert env_of(container)["FINFLOW_DATA_DIR"]["value"] == "/var/lib/finflow"
            assert "resources" in container


@pytest.mark.parametrize("case", CASES)
def test_worker_probes_and_shutdown(chart: helm_python.Chart, case: str) -> None:
    docs = render(chart, case_values(case))
    sts = one(docs, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # mode gives every service this long to stop before it gives up on it.
    assert pod["terminationGracePeriodSeconds"] > Service.shutdown_timeout
    claims = {t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates", [])}
    assert claims == {"data"}
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("case", CASES)
def test_migrate_runs_as_a_hook_before_the_workers(chart: helm_python.Chart, case: str) -> None:
    docs = render(chart, case_values(case))
    job = one(docs, "Job", "migrate")
    hooks = set(job["metadata"]["annotations"]["helm.sh/hook"].split(","))
    assert hooks == {"pre-install", "pre-upgrade"}
    assert containers(job)[0]["args"] == ["migrate"]
    assert "serviceAccountName" not in job["spec"]["template"]["spec"]
    for secret in of_kind(docs, "Secret"):
        weight = int(secret["metadata"]["annotations"]["helm.sh/hook-weight"])
        assert weight < int(job["metadata"]["annotations"]["helm.sh/hook-weight"])


@pytest.mark.parametrize("case", CASES)
def test_credentials_come_from_one_secret(chart: helm_python.Chart, case: str) -> None:
    values = chart.merge_values(case_values(case))
    docs = render(chart, case_values(case))
    secrets = of_kind(docs, "Secret")
    if values["existingSecret"]:
        assert secrets == []
        expected = values["existingSecret"]
    else:
        expected = one(docs, "Secret")["metadata"]["name"]
    for doc in of_kind(docs, "StatefulSet") + of_kind(docs, "Deployment") + of_kind(docs, "Job"):
        for container in containers(doc):
            env = env_of(container)
            for name in ("FINFLOW_DATABASE_URL", "FINFLOW_REDIS_URL", "FINFLOW_API_TOKENS"):
                assert env[name]["valueFrom"]["secretKeyRef"]["name"] == expected
                assert "value" not in env[name]


def mounted_secret(sts: Manifest, container: Manifest, path: str) -> tuple[str, str]:
    """(Secret name, key) of the file ``path`` in ``container``, which must be read-only."""
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    assert mount["readOnly"] is True
    volumes = sts["spec"]["template"]["spec"]["volumes"]
    secret = next(v for v in volumes if v["name"] == mount["name"])["secret"]
    name = path.removeprefix(mount["mountPath"] + "/")
    (item,) = [i for i in secret["items"] if i["path"] == name]
    return secret["secretName"], item["key"]


def test_kafka_tls_and_sasl(chart: helm_python.Chart) -> None:
    values = chart.merge_values(case_values("tls"))
    docs = render(chart, case_values("tls"))
    sts = one(docs, "StatefulSet")
    (worker,) = containers(sts)
    env = env_of(worker)
    assert env["FINFLOW_BROKER_SECURITY_PROTOCOL"]["value"] == "SASL_SSL"
    assert env["FINFLOW_BROKER_SASL_MECHANISM"]["value"] == "SCRAM-SHA-512"
    for var, key in (("USERNAME", "kafkaSaslUsername"), ("PASSWORD", "kafkaSaslPassword")):
        ref = env[f"FINFLOW_BROKER_SASL_{var}"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": values["existingSecret"], "key": values["secretKeys"][key]}
    tls = values["kafka"]["tls"]
    files = {v: env[f"FINFLOW_BROKER_SSL_{v}"]["value"] for v in ("CAFILE", "CERTFILE", "KEYFILE")}
    assert mounted_secret(sts, worker, files["CAFILE"]) == (tls["caSecret"], tls["caKey"])
    assert mounted_secret(sts, worker, files["CERTFILE"]) == (tls["clientCertSecret"], "tls.crt")
    assert mounted_secret(sts, worker, files["KEYFILE"]) == (tls["clientCertSecret"], "tls.key")
    plain = env_of(containers(one(render(chart, {}), "StatefulSet"))[0])
    assert not {n for n in plain if n.startswith(("FINFLOW_BROKER_SASL", "FINFLOW_BROKER_SSL"))}


def pod_env(
    doc: Manifest, container: Manifest, values: dict[str, Any], tmp: Path
) -> dict[str, str]:
    """The environment Kubernetes would give ``container``, with sample secrets, and mounted
    secret files replaced by sample files under ``tmp``."""
    samples = {
        "databaseUrl": "postgresql://finflow:pw@db:5432/finflow",
        "redisUrl": "redis://redis:6379/0",
        "apiTokens": "token-a,token-b",
        "kafkaSaslUsername": "finflow",
        "kafkaSaslPassword": "pw",
    }
    by_key = {values["secretKeys"][k]: v for k, v in samples.items()}
    fields = {"metadata.name": f"{doc['metadata']['name']}-0", "metadata.namespace": NAMESPACE}
    env: dict[str, str] = {}
    for var in container["env"]:
        source = var.get("valueFrom", {})
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
        elif "secretKeyRef" in source:
            env[var["name"]] = by_key[source["secretKeyRef"]["key"]]
        else:
            env[var["name"]] = fields[source["fieldRef"]["fieldPath"]]
    for mount in container["volumeMounts"]:
        if mount["mountPath"].startswith("/etc/finflow/"):
            for name, value in env.items():
                if value.startswith(mount["mountPath"] + "/"):
                    local = tmp / value.lstrip("/")
                    local.parent.mkdir(parents=True, exist_ok=True)
                    local.write_text("sample\n")
                    env[name] = str(local)
    return env


@pytest.mark.parametrize("case", CASES)
def test_the_app_accepts_the_rendered_settings(
    chart: helm_python.Chart, case: str, tmp_path: Path
) -> None:
    values = chart.merge_values(case_values(case))
    for doc in render(chart, case_values(case)):
        if doc["kind"] in {"StatefulSet", "Deployment", "Job"}:
            for container in containers(doc):
                settings = from_env(pod_env(doc, container, values, tmp_path))
                assert settings.topic_partitions == values["kafka"]["partitions"]
                assert settings.topic_replication == values["kafka"]["replication"]
                assert settings.broker_security.protocol == values["kafka"]["securityProtocol"]
                if doc["kind"] == "StatefulSet":
                    assert settings.web_url.startswith(f"http://{doc['metadata']['name']}-0.")


@pytest.mark.parametrize("case", CASES)
def test_service_monitor_and_network_policy(chart: helm_python.Chart, case: str) -> None:
    values = chart.merge_values(case_values(case))
    docs = render(chart, case_values(case))
    monitors = of_kind(docs, "ServiceMonitor")
    assert len(monitors) == int(values["serviceMonitor"]["enabled"])
    for monitor in monitors:
        selector = monitor["spec"]["selector"]["matchLabels"]
        scraped = [
            s
            for s in of_kind(docs, "Service")
            if selector.items() <= s["metadata"]["labels"].items()
        ]
        assert any(s["spec"].get("clusterIP") == "None" for s in scraped)
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["path"] == "/metrics"
            assert all(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in scraped)
    policy = one(docs, "NetworkPolicy")
    assert (
        policy["spec"]["podSelector"]["matchLabels"].items()
        <= one(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"].items()
    )
    assert ("Egress" in policy["spec"]["policyTypes"]) == bool(values["networkPolicy"]["egress"])


@pytest.mark.parametrize("case", CASES)
def test_read_api_is_a_toggle(chart: helm_python.Chart, case: str) -> None:
    values = chart.merge_values(case_values(case))
    docs = render(chart, case_values(case))
    apis = [d for d in of_kind(docs, "Deployment") if containers(d)[0]["args"] == ["api"]]
    assert len(apis) == int(values["api"]["enabled"])


@pytest.mark.parametrize("case", CASES)
def test_commands_and_variables_exist(chart: helm_python.Chart, case: str) -> None:
    subcommands = set(cli_commands())
    names: set[str] = set()
    for doc in render(chart, case_values(case)):
        if doc["kind"] not in {"StatefulSet", "Deployment", "Job"}:
            continue
        for container in containers(doc):
            assert "command" not in container, "the image's ENTRYPOINT is `finflow`"
            assert container["args"][0] in subcommands | PENDING_COMMANDS
            names.update(n for n in env_of(container) if n.startswith("FINFLOW_"))
    assert unknown_variables(names) == set()
