"""The monitoring path end to end: a real server, Debian's Prometheus scraping it every 500 ms with our
alert rules loaded, in-distribution then OOD traffic, then every PromQL expression of the dashboard and
of alerts.yml evaluated through Prometheus' HTTP API, the drift alarm (HydraInputDrift) and the shadow
teacher's fidelity (HydraShadowFidelityLow) included.

Phases are bounded by scrapes (`wait_for_scrapes`), so counters read at the phase boundaries hold
exactly that phase's traffic.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest

from tests.deploy.support import (
    ALERTS,
    DASHBOARDS,
    Expression,
    Prometheus,
    alert_rules,
    comparisons_as_bool,
    dashboard_expressions,
    prometheus_config,
    rule_expressions,
    running_prometheus,
    substitute_grafana_variables,
)
from tests.service.support import (
    ReferenceModel,
    Server,
    build_test_repository,
    calibration_inputs,
    make_classifier,
    running_server,
    write_model,
)

pytestmark = pytest.mark.timeout(150)

ROWS_PER_PHASE = 1000
ROWS_PER_REQUEST = 25
OOD_SHIFT = 8.0  # features ~ N(8, 1): far outside the N(0, 1) the models were calibrated on
# dens_clf: a schema-2 package (density and input-density outputs, combined OOD score), so the
# density panel has data
TASKS = {"clf": "classification", "reg": "regression", "dens_clf": "classification"}
ALPHA = {"clf": 0.05, "reg": 0.1, "dens_clf": 0.05}  # the default_alpha of the test manifests
DASHBOARD = DASHBOARDS / "hydra-serve.json"
FLAG_RATE_PANEL = "OOD flag rate vs alpha"
DENSITY_PANEL = "Feature density"
SCRAPE_INTERVAL_S = 0.5
API_KEY = "e2e-test-key"  # repository load/unload exist only with a key


@dataclass
class Phases:
    prometheus: Prometheus
    server: Server
    repository: Path
    rows: dict[str, dict[str, np.ndarray]]  # phase -> model -> rows sent
    start: float  # before any inference traffic
    id_end: float  # after the ID phase, before the OOD phase
    ood_end: float  # after the OOD phase


def _phase_rows(seed: int) -> dict[str, dict[str, np.ndarray]]:
    rows: dict[str, dict[str, np.ndarray]] = {"id": {}, "ood": {}}
    for name, task in TASKS.items():
        rows["id"][name] = calibration_inputs(task, ROWS_PER_PHASE, seed=seed)  # same law, other draw
        ood = calibration_inputs(task, ROWS_PER_PHASE, seed=seed + 1) + np.float32(OOD_SHIFT)
        rows["ood"][name] = ood.astype(np.float32)
    return rows


def _send(client: httpx.Client, name: str, rows: np.ndarray) -> None:
    for chunk in np.array_split(rows, len(rows) // ROWS_PER_REQUEST):
        response = client.post(f"/v1/models/{name}:predict", json={"instances": chunk.tolist()})
        assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def phases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Phases]:
    repository = build_test_repository(tmp_path_factory.mktemp("models"))
    write_model(repository, "dens_clf", 1, "classification", density=True)
    # shadow teachers: for clf an unrelated classifier (low fidelity: HydraShadowFidelityLow), for
    # dens_clf the student's own graph (fidelity 1); reg has none
    onnx.save(make_classifier(seed=5), repository / "clf" / "1" / "ensemble.onnx")
    shutil.copy(repository / "dens_clf" / "1" / "model.onnx", repository / "dens_clf" / "1" / "ensemble.onnx")
    rows = _phase_rows(seed=7)

    with running_server(repository, api_key=API_KEY, shadow_fraction="1.0", shadow_max_busy="1.0") as server:
        target = server.url.removeprefix("http://")
        interval = f"{round(SCRAPE_INTERVAL_S * 1000)}ms"  # Prometheus takes no "0.5s"
        config = prometheus_config(target, rule_files=[ALERTS], interval=interval)
        headers = {"X-API-Key": API_KEY}
        with (
            running_prometheus(config) as prometheus,
            httpx.Client(base_url=server.url, timeout=10, headers=headers) as client,
        ):
            start = prometheus.wait_for_scrapes(server.url)
            # a model version that cannot load: the load-failure counter (and its alert) must have data
            broken = repository / "broken" / "1"
            broken.mkdir(parents=True)
            (broken / "manifest.json").write_text("{not json")
            (broken / "model.onnx").write_bytes(b"not an onnx graph")
            assert client.post("/v2/repository/models/broken/load").status_code >= 400
            for name in TASKS:
                _send(client, name, rows["id"][name])
            # client errors, so the 4xx series exist (and must not count as server errors)
            assert client.post("/v1/models/clf:predict", json={"instances": [[1.0, 2.0]]}).status_code == 400
            assert client.post("/v1/models/nope:predict", json={"instances": [[1.0]]}).status_code == 404
            id_end = prometheus.wait_for_scrapes(server.url)
            for name in TASKS:
                _send(client, name, rows["ood"][name])
            ood_end = prometheus.wait_for_scrapes(server.url)
            yield Phases(prometheus, server, repository, rows, start, id_end, ood_end)


def _panel_expression(title: str, ref_id: str = "A") -> str:
    for expression in dashboard_expressions(DASHBOARD):
        if expression.where.endswith(f"panel {title!r} {ref_id}"):
            return expression.promql
    raise AssertionError(f"dashboard has no panel {title!r} target {ref_id}")


def _by_model(result: list[dict[str, object]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for sample in result:
        metric = sample["metric"]
        value = sample["value"]
        assert isinstance(metric, dict) and isinstance(value, list)
        out[str(metric["model"])] = float(value[1])
    return out


def _window(seconds: float) -> str:
    return f"{int(seconds * 1000)}ms"


def _per_phase(phases: Phases, panel_promql: str) -> tuple[dict[str, float], dict[str, float]]:
    """A dashboard query by model over each phase (its range variable = the phase), at the phase's end:
    (ID phase, OOD phase)."""
    # rate() needs the last sample before the phase too: reach back 1.5 scrape intervals further (the
    # scrape before that one is older than the phase boundary's two awaited scrapes, see Phases)
    reach = SCRAPE_INTERVAL_S * 1.5
    bounds = ((phases.start, phases.id_end), (phases.id_end, phases.ood_end))
    id_values, ood_values = (
        _by_model(
            phases.prometheus.query(
                substitute_grafana_variables(panel_promql, _window(end - begin + reach)), at=end
            )
        )
        for begin, end in bounds
    )
    return id_values, ood_values


def _alert_models(prometheus: Prometheus, name: str) -> set[str]:
    return {
        a["labels"]["model"]
        for a in prometheus.get("/api/v1/alerts")["alerts"]
        if a["labels"]["alertname"] == name
    }


def _wait_for_alert(prometheus: Prometheus, name: str, models: set[str]) -> set[str]:
    """The models alert `name` is pending or firing for, once they are `models` or after 10 s."""
    deadline = time.monotonic() + 10
    while (alerted := _alert_models(prometheus, name)) != models and time.monotonic() < deadline:
        time.sleep(0.25)
    return alerted


def test_every_dashboard_expression_returns_data(phases: Phases) -> None:
    expressions = dashboard_expressions(DASHBOARD)
    assert len(expressions) >= 20
    empty = []
    for expression in expressions:
        promql = substitute_grafana_variables(expression.promql, "1m")
        if not phases.prometheus.query(promql, at=phases.ood_end):
            empty.append(f"{expression.where}: {promql}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def test_every_alert_expression_returns_data(phases: Phases) -> None:
    expressions: list[Expression] = rule_expressions()
    assert {e.where.split(": ")[1] for e in expressions} == {r["alert"] for r in alert_rules()}
    empty = []
    for expression in expressions:
        promql = comparisons_as_bool(expression.promql)
        if not phases.prometheus.query(promql, at=phases.ood_end):
            empty.append(f"{expression.where}: {promql}")
    assert not empty, "alert expressions without data:\n" + "\n".join(empty)


def test_prometheus_loaded_every_rule_healthy(phases: Phases) -> None:
    groups = phases.prometheus.get("/api/v1/rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]


def test_prometheus_counts_every_row_and_flag(phases: Phases) -> None:
    """Counters read through Prometheus at the phase boundaries equal what was sent and flagged."""
    bounds = {"id": (phases.start, phases.id_end), "ood": (phases.id_end, phases.ood_end)}
    for phase, (begin, end) in bounds.items():
        window = _window(end - begin)
        predictions = _by_model(
            phases.prometheus.query(
                f"sum by (model) (hydra_predictions_total - hydra_predictions_total offset {window})", at=end
            )
        )
        flagged = _by_model(
            phases.prometheus.query(
                f"sum by (model) (hydra_ood_flagged_total - hydra_ood_flagged_total offset {window})", at=end
            )
        )
        for name in TASKS:
            rows = phases.rows[phase][name]
            expected = int(ReferenceModel(phases.repository / name / "1").answer(rows)["ood_flag"].sum())
            assert predictions[name] == len(rows), (phase, name)
            # the server runs other batch sizes than the reference: allow a float32 tie to flip a row
            assert abs(flagged[name] - expected) <= 2, (phase, name, flagged[name], expected)


def test_flag_rate_is_alpha_on_id_traffic_and_far_above_on_ood(phases: Phases) -> None:
    """The dashboard's own flag-rate query: about α on ID traffic, clearly above α on OOD traffic."""
    id_rate, ood_rate = _per_phase(phases, _panel_expression(FLAG_RATE_PANEL))
    alpha_promql = substitute_grafana_variables(_panel_expression(FLAG_RATE_PANEL, "B"), "1m")
    alpha = _by_model(phases.prometheus.query(alpha_promql, at=phases.ood_end))
    for name, expected_alpha in ALPHA.items():
        assert alpha[name] == pytest.approx(expected_alpha)
        # conformal guarantee: ≤ α in expectation; a 200-score calibration set moves it by ~±0.015
        assert abs(id_rate[name] - expected_alpha) <= 0.03, (name, id_rate[name])
        # (rate() extrapolates the two counters a little differently at the window's left edge)
        assert ood_rate[name] >= max(5 * expected_alpha, 0.5), (name, ood_rate[name])


@pytest.mark.parametrize(
    ("ref_id", "id_range"),
    [
        ("A", (1.0, 100.0)),  # body density: a 16-wide body, ID distances near its width
        ("C", (2.0, 20.0)),  # input typicality: ~ χ²_8 on ID rows, median ≈ 7.3
    ],
)
def test_density_panel_rises_by_orders_of_magnitude_on_ood_traffic(
    phases: Phases, ref_id: str, id_range: tuple[float, float]
) -> None:
    """The density panel's own p50 queries (body density, input typicality), over each phase: only
    dens_clf has series, and shifted rows sit far from the training rows, in body and input space."""
    id_p50, ood_p50 = _per_phase(phases, _panel_expression(DENSITY_PANEL, ref_id))
    assert set(id_p50) == set(ood_p50) == {"dens_clf"}
    assert id_range[0] < id_p50["dens_clf"] < id_range[1], id_p50
    assert ood_p50["dens_clf"] > 30 * id_p50["dens_clf"], (id_p50, ood_p50)


def test_ood_alert_quiet_on_id_traffic_and_triggered_by_ood(phases: Phases) -> None:
    ood_rule = next(r for r in alert_rules() if r["alert"] == "HydraOODFlagRateHigh")
    assert phases.prometheus.query(ood_rule["expr"], at=phases.id_end) == []
    firing = {str(s["metric"]["model"]) for s in phases.prometheus.query(ood_rule["expr"], at=phases.ood_end)}
    assert firing == set(TASKS)
    # and Prometheus' rule evaluation agrees: the alert is pending (its `for` has not elapsed yet)
    deadline = time.monotonic() + 10
    while True:
        alerts = phases.prometheus.get("/api/v1/alerts")["alerts"]
        pending = {a["labels"]["model"] for a in alerts if a["labels"]["alertname"] == "HydraOODFlagRateHigh"}
        if pending == set(TASKS) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert pending == set(TASKS), alerts
    load_failed = [a for a in alerts if a["labels"]["alertname"] == "HydraModelLoadFailed"]
    assert [a["labels"]["model"] for a in load_failed] == ["broken"]
    # the broken model is exported as not ready (nothing serves it); the served models never are
    not_ready = {a["labels"]["model"] for a in alerts if a["labels"]["alertname"] == "HydraModelNotReady"}
    assert not_ready == {"broken"}, alerts
    assert all(a["labels"]["alertname"] != "HydraServiceDown" for a in alerts)


def test_request_metrics_carry_route_templates_only(phases: Phases) -> None:
    routes = {
        str(s["metric"]["route"]) for s in phases.prometheus.query("count by (route) (hydra_requests_total)")
    }
    assert "/v1/models/{model_name}:predict" in routes
    assert "/v2/repository/models/{model_name}/load" in routes
    # the model names of the requests (clf, reg, nope, broken) never become label values
    assert not [r for r in routes if any(name in r for name in ("clf", "reg", "nope", "broken"))], routes


def test_drift_alert_quiet_on_id_traffic_and_fired_by_shifted_traffic(phases: Phases) -> None:
    """The drift martingale of every model reaches 1/delta on the shifted rows (P ≤ delta per model on
    the clean ones); Prometheus evaluates HydraInputDrift on the scraped counters and fires it."""
    rule = next(r for r in alert_rules() if r["alert"] == "HydraInputDrift")
    assert phases.prometheus.query(rule["expr"], at=phases.id_end) == []
    firing = {str(s["metric"]["model"]) for s in phases.prometheus.query(rule["expr"], at=phases.ood_end)}
    assert firing == set(TASKS)
    assert _wait_for_alert(phases.prometheus, "HydraInputDrift", set(TASKS)) == set(TASKS)
    # the dashboard's martingale panel and its 1/delta line
    line = phases.prometheus.query("max by (model) (hydra_drift_alarm_threshold_log10)", at=phases.ood_end)
    assert {str(s["metric"]["model"]): float(s["value"][1]) for s in line} == dict.fromkeys(TASKS, 2.0)


def test_shadow_fidelity_alert_sees_the_teacher_the_student_does_not_follow(phases: Phases) -> None:
    """clf's ensemble.onnx is an unrelated classifier: its fidelity gauge is low and the alert expression
    returns it (pending: `for: 15m`); dens_clf's teacher is its own graph: fidelity 1, quiet; reg has no
    ensemble.onnx: no fidelity series at all."""
    rule = next(r for r in alert_rules() if r["alert"] == "HydraShadowFidelityLow")
    low = {str(s["metric"]["model"]) for s in phases.prometheus.query(rule["expr"], at=phases.ood_end)}
    assert low == {"clf"}
    fidelity = phases.prometheus.query('hydra_shadow_fidelity{measure="mi_spearman"}', at=phases.ood_end)
    by_model = {str(s["metric"]["model"]): float(s["value"][1]) for s in fidelity}
    assert set(by_model) == {"clf", "dens_clf"}
    assert by_model["dens_clf"] == pytest.approx(1.0) and by_model["clf"] < 0.8
    assert _wait_for_alert(phases.prometheus, "HydraShadowFidelityLow", {"clf"}) == {"clf"}
