"""Dockerfile, docker-compose.yml and Grafana provisioning, checked without a Docker engine: hadolint,
the compose-spec JSON schema, and the cross-references between the files (mount paths, service
names, ports, datasource uid) that no schema sees."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.metrics import ServiceMetrics
from service.monitoring import MonitoringMetrics
from tests.deploy.support import (
    COMPOSE_PROMETHEUS_CONFIG,
    DASHBOARDS,
    DEPLOY,
    REPO_ROOT,
    dashboard_expressions,
    rule_expressions,
)

DOCKERFILE = REPO_ROOT / "Dockerfile"
# what both server stages run (user, /models, the wheel, the no-torch check): the build stage puts it
# in /wheels beside the wheel
INSTALL_SCRIPT = REPO_ROOT / "deploy" / "image" / "install-service.sh"
COMPOSE = REPO_ROOT / "docker-compose.yml"
GRAFANA = DEPLOY / "grafana"
VENV_BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(VENV_BIN)) or shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` not found: install the dev extra (pip install -e '.[dev]')", pytrace=False)
    return path


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("hadolint"), str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def stages(dockerfile: str) -> dict[str, str]:
    """Stage name → its instructions (the text from its FROM up to the next FROM)."""
    parts = re.split(r"^(?=FROM\s)", dockerfile, flags=re.MULTILINE)
    out: dict[str, str] = {}
    for part in parts:
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", part, flags=re.IGNORECASE)
        if match:
            out[match.group(1)] = part
    return out


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


# ---- Dockerfile ------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install numpy\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # `latest` tag
    assert "DL3003" in result.stdout  # cd instead of WORKDIR


def test_dockerfile_targets() -> None:
    text = DOCKERFILE.read_text()
    found = stages(text)
    assert set(found) >= {"build", "runtime-cpu", "bundled", "gpu", "cpu"}
    assert list(found)[-1] == "cpu", "the default target (last stage) must be the model-free CPU image"
    for name in ("runtime-cpu", "gpu"):
        stage = found[name]
        assert re.search(r"^USER\s+10001", stage, re.MULTILINE), f"{name} must run as non-root 10001"
        assert "HEALTHCHECK" in stage and "/v2/health/ready" in stage, name
        assert 'ENTRYPOINT ["hydra-serve"]' in stage, name
        assert re.search(r"^EXPOSE 8000 8081$", stage, re.MULTILINE) and "HYDRA_GRPC_PORT=8081" in stage, name
    # both server stages install through the one script, which the build stage ships with the wheel
    script = INSTALL_SCRIPT.read_text()
    assert "COPY deploy/image/install-service.sh /wheels/" in found["build"]
    assert re.search(r"^RUN sh /wheels/install-service\.sh$", found["runtime-cpu"], re.MULTILINE)
    # it creates the user the stages switch to, uid and gid 10001
    assert "groupadd --system --gid 10001 hydra" in script and "useradd --system --uid 10001" in script
    # no torch anywhere, and a build-time guard that fails if it sneaks in
    assert not re.search(r"pip install[^\n]*torch", text + script)
    assert "find_spec('torch') is not None" in script
    # GPU: onnxruntime swapped for the gpu extra, the wheel without its (CPU) dependencies
    assert "nvidia/cuda" in text and "cudnn-runtime" in text
    assert "requirements-gpu.txt" in found["gpu"]
    assert re.search(r"^RUN sh /wheels/install-service\.sh --no-deps$", found["gpu"], re.MULTILINE)
    assert 'pip install --no-cache-dir "$@" /wheels/hydra_serve-*.whl' in script  # the flags reach pip
    assert "'optional-dependencies']['gpu']" in found["build"]
    assert "COPY models/ /models/" in found["bundled"]


def test_dockerignore_admits_what_the_build_copies() -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for stage in stages(DOCKERFILE.read_text()).values():
        for line in re.findall(r"^COPY\s+(?!--from)(.+)$", stage, re.MULTILINE):
            *sources, _dest = line.split()
            for source in sources:
                assert source.rstrip("/") in allowed, f"{source} is copied but excluded by .dockerignore"
                assert (REPO_ROOT / source).exists(), source


# ---- docker-compose.yml ----------------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec() -> None:
    result = subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_mounts_only_deploy_and_wires_services_together() -> None:
    spec = compose()
    services = spec["services"]
    assert set(services) == {"hydra-serve", "prometheus", "grafana"}
    mounts: dict[str, str] = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/")):  # a bind mount, not a named volume
                assert source.startswith("./deploy/"), f"{name} mounts {source} from outside deploy/"
                assert (REPO_ROOT / source).exists(), f"{name} mounts missing {source}"
                mounts[target] = source
    # the service image target exists and is the one bundling models/
    assert services["hydra-serve"]["build"]["target"] in stages(DOCKERFILE.read_text())
    # Prometheus scrapes the service by its compose name and port and loads the rules
    assert mounts["/etc/prometheus"] == "./deploy/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    prometheus = yaml.safe_load(COMPOSE_PROMETHEUS_CONFIG.read_text())
    assert prometheus["rule_files"] == ["alerts.yml"]
    targets = [
        t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    ]
    assert "hydra-serve:8000" in targets
    assert "8000:8000" in services["hydra-serve"]["ports"]
    assert "8081:8081" in services["hydra-serve"]["ports"]  # gRPC
    # Grafana: provisioning and dashboards mounted where the provisioning files say
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "hydra-serve.yaml").read_text())
    dashboard_path = providers["providers"][0]["options"]["path"]
    assert mounts[dashboard_path] == "./deploy/grafana/dashboards"
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    (prom_ds,) = datasource["datasources"]
    assert prom_ds["url"] == "http://prometheus:9090"
    assert prom_ds["type"] == "prometheus" and prom_ds["uid"]


def test_dashboard_has_fixed_uid_and_uses_the_provisioned_datasource() -> None:
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    uid = datasource["datasources"][0]["uid"]
    dashboard = json.loads((DASHBOARDS / "hydra-serve.json").read_text())
    assert dashboard["uid"] == "hydra-serve-overview"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 15
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, panel["title"]
    kinds = {p["type"] for p in panels}
    assert "heatmap" in kinds  # the p-value distribution over time


def _served_sample_names() -> set[str]:
    """Every sample name the service can export (a histogram's _bucket/_sum/_count, a counter's _total)."""
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "gauge": ("",)}
    names = set()
    metrics = ServiceMetrics()
    MonitoringMetrics.of(metrics)  # the drift and shadow families (service/monitoring.py)
    for family in metrics.registry.collect():
        names |= {family.name + suffix for suffix in suffixes[family.type]}
    return names


def test_dashboard_and_alerts_read_only_metrics_the_service_exports() -> None:
    served = _served_sample_names()
    expressions = dashboard_expressions(DASHBOARDS / "hydra-serve.json") + rule_expressions()
    unknown = {
        f"{e.where}: {name}"
        for e in expressions
        for name in re.findall(r"\bhydra_\w+", e.promql)
        if name not in served
    }
    assert not unknown, sorted(unknown)
    # the density panel: p50 / p95 of the body density (A, B) and of the input typicality (C, D)
    density = {e.where.rsplit(" ", 1)[1]: e.promql for e in expressions if "'Feature density'" in e.where}
    assert sorted(density) == ["A", "B", "C", "D"], density
    for ref, metric, quantile in (
        ("A", "hydra_density_score_bucket", "0.5"),
        ("B", "hydra_density_score_bucket", "0.95"),
        ("C", "hydra_input_density_score_bucket", "0.5"),
        ("D", "hydra_input_density_score_bucket", "0.95"),
    ):
        assert re.findall(r"\bhydra_\w+", density[ref]) == [metric], (ref, density[ref])
        assert density[ref].startswith(f"histogram_quantile({quantile}, sum by (model, version, le)"), ref


def test_dashboard_panels_do_not_overlap() -> None:
    dashboard = json.loads((DASHBOARDS / "hydra-serve.json").read_text())
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
