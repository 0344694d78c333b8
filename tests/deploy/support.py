"""Test support for deploy/: Debian's Prometheus binaries, a throwaway Prometheus on loopback, and the
PromQL expressions of the dashboard and the alert rules (read from the files, never duplicated).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.service.support import free_port, stop

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
COMPOSE_PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
SCRAPE_JOB = "hydra-serve"  # the job name the alerts select (up{job="hydra-serve"})


def require_binary(name: str) -> str:
    """Path of a Debian `prometheus` package binary; a missing one fails the test (never a skip)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"`{name}` not found on PATH. tests/deploy need Debian's `prometheus` package (it brings "
            "`prometheus` and `promtool`): run `make system-deps` (as root: apt-get install prometheus).",
            pytrace=False,
        )
    return path


# ---- expressions -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expression:
    where: str  # file and panel / rule, for failure messages
    promql: str


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows nest their panels


def dashboard_expressions(path: Path) -> list[Expression]:
    """Every PromQL query of a dashboard: panel targets and query variables (label_values(metric, l) →
    the metric selector, which is what Grafana sends to Prometheus)."""
    dashboard = json.loads(path.read_text())
    out: list[Expression] = []
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append(
                    Expression(f"{path.name}: panel {panel['title']!r} {target['refId']}", target["expr"])
                )
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"\s*label_values\((.+),\s*\w+\)\s*", query)
        out.append(
            Expression(f"{path.name}: variable ${variable['name']}", match.group(1) if match else query)
        )
    return out


def alert_rules(path: Path = ALERTS) -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def rule_expressions(path: Path = ALERTS) -> list[Expression]:
    return [
        Expression(f"{path.name}: {rule.get('alert') or rule.get('record')}", rule["expr"])
        for rule in alert_rules(path)
    ]


def substitute_grafana_variables(promql: str, rate_interval: str) -> str:
    """What Grafana would send with every model selected ($model → .*)."""
    return (
        promql.replace("$__rate_interval", rate_interval)
        .replace("$__interval", rate_interval)
        .replace("$model", ".*")
    )


_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(\s*bool\b)?")


def comparisons_as_bool(promql: str) -> str:
    """Turn every filtering comparison into a `bool` comparison (outside label matchers and strings).

    An alert expression returns nothing while its alert is quiet; with `bool` it returns 0/1 for every
    series it compares instead, so "it returns data" proves the series exist and the query is valid.
    """
    out: list[str] = []
    depth = 0
    i = 0
    while i < len(promql):
        ch = promql[i]
        if ch in "\"'`":  # copy a string literal verbatim
            end = i + 1
            while end < len(promql) and promql[end] != ch:
                end += 2 if promql[end] == "\\" else 1
            out.append(promql[i : end + 1])
            i = end + 1
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif depth == 0:
            match = _COMPARISON.match(promql, i)
            if match:
                out.append(f"{match.group(1)} bool")
                i = match.end()
                continue
        out.append(ch)
        i += 1
    return "".join(out)


# ---- a Prometheus on loopback ------------------------------------------------------------------------


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query through the HTTP API; raises with Prometheus' error text on a bad query."""
        params: dict[str, str] = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        response = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=10)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"query failed ({response.status_code}): {body.get('error')}\n{promql}")
        data = body["data"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.url}{path}", timeout=10)
        response.raise_for_status()
        return response.json()["data"]

    def wait_for_scrapes(self, target_url: str, count: int = 2, timeout: float = 15.0) -> float:
        """Block until `count` scrapes of the target that started after this call have succeeded.

        Returns the time then: the latest sample at or before it reflects everything the target did
        before the call, so counters queried at that time (and `offset` back to an earlier such time)
        bound a phase of traffic exactly."""
        start = time.time()
        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        while time.monotonic() < deadline:
            for target in self.get("/api/v1/targets")["activeTargets"]:
                if target["scrapeUrl"].startswith(target_url) and target["health"] == "up":
                    last = target["lastScrape"]
                    if _parse_rfc3339(last) > start:
                        seen.add(last)
            if len(seen) >= count:
                return time.time()
            time.sleep(0.2)
        raise AssertionError(
            f"Prometheus did not scrape {target_url} {count} times in {timeout}s:\n{self.log()}"
        )


def _parse_rfc3339(stamp: str) -> float:
    from datetime import datetime

    # Go prints nanoseconds; Python parses microseconds at most
    stamp = re.sub(r"(\.\d{6})\d+", r"\1", stamp).replace("Z", "+00:00")
    return datetime.fromisoformat(stamp).timestamp()


def prometheus_config(target: str, rule_files: list[Path], interval: str = "1s") -> dict[str, Any]:
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {"job_name": SCRAPE_JOB, "metrics_path": "/metrics", "static_configs": [{"targets": [target]}]}
        ],
    }


@contextlib.contextmanager
def running_prometheus(config: dict[str, Any], timeout: float = 20.0) -> Iterator[Prometheus]:
    """Debian's prometheus on a free 127.0.0.1 port with a throwaway TSDB; killed on exit."""
    binary = require_binary("prometheus")
    with tempfile.TemporaryDirectory(prefix="hydra-prometheus-") as tmp:
        workdir = Path(tmp)
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        port = free_port()
        log_path = workdir / "prometheus.log"
        with log_path.open("wb") as sink:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        prometheus = Prometheus(f"http://127.0.0.1:{port}", process, log_path)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise AssertionError(f"prometheus exited with {process.returncode}:\n{prometheus.log()}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{prometheus.url}/-/ready", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise AssertionError(f"prometheus not ready after {timeout}s:\n{prometheus.log()}")
                time.sleep(0.1)
            yield prometheus
        finally:
            stop(process, timeout=10)
