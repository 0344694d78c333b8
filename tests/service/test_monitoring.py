"""Drift alarm and shadow teacher in the served app (in process, httpx's ASGI transport: nothing here
depends on the socket): metrics, V1/V2 metadata, reload, no ensemble.

The packages are tests/service/support.py's; `ensemble.onnx` is written beside `model.onnx` here: for
`clf` another random classifier (a teacher the student does not follow: low fidelity), for `reg` the
student's own graph (fidelity 1)."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from service.fidelity import MIN_ROWS, Sample, spearman
from service.shadow import ShadowBudget, ShadowTeacher
from tests.service.support import InProcessClient, calibration_inputs, in_process, make_classifier

KEY = "monitoring-test-key"


def _metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def _send(client: InProcessClient, name: str, rows: np.ndarray, per_request: int = 25) -> None:
    for start in range(0, len(rows), per_request):
        r = client.post(
            f"/v1/models/{name}:predict", json={"instances": rows[start : start + per_request].tolist()}
        )
        assert r.status_code == 200, r.text


def _wait(predicate, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    return predicate()


@pytest.fixture
def shadow_repo(tmp_path: Path, model_repository: Path) -> Path:
    repo = tmp_path / "models"
    shutil.copytree(model_repository, repo)
    onnx.save(make_classifier(seed=5), repo / "clf" / "1" / "ensemble.onnx")
    shutil.copy(repo / "reg" / "1" / "model.onnx", repo / "reg" / "1" / "ensemble.onnx")
    return repo


def test_shadow_fidelity_and_drift_in_metrics_and_metadata(shadow_repo: Path) -> None:
    with in_process(
        shadow_repo, shadow_fraction=1.0, shadow_max_busy=1.0, api_key=KEY, headers={"X-API-Key": KEY}
    ) as client:
        _send(client, "clf", calibration_inputs("classification", 400, seed=11))
        _send(client, "reg", calibration_inputs("regression", 400, seed=12))

        def fidelity(name: str) -> dict[str, float] | None:
            shadow = client.get(f"/v1/models/{name}").json()["shadow"]
            return shadow["fidelity"] if shadow["rows"] == 400 else None

        clf, reg = _wait(lambda: fidelity("clf")), _wait(lambda: fidelity("reg"))
        assert clf is not None and reg is not None
        # the student's own graph as teacher: identical summaries
        assert reg == {
            "mi_spearman": pytest.approx(1.0),
            "label_agreement": 1.0,
            "mi_ratio": pytest.approx(1.0),
        }
        # an unrelated classifier as teacher: its MI ranks rows differently, labels disagree often
        assert clf["mi_spearman"] < 0.8 and clf["label_agreement"] < 0.9
        v1 = client.get("/v1/models/clf").json()
        assert v1["shadow"] | {"fidelity": None} == {
            "enabled": True, "ensemble_available": True, "ensemble_in_package": True, "reason": None,
            "fraction": 1.0, "window": 1000, "rows": 400, "dropped_rows": 0, "window_rows": 400,
            "fidelity": None, "busy_seconds": v1["shadow"]["busy_seconds"], "max_busy": 1.0, "min_batch": 64,
        }  # fmt: skip
        assert v1["shadow"]["busy_seconds"] > 0.0
        v2 = client.get("/v2/models/clf").json()["parameters"]
        assert v2["shadow"]["fidelity"] == clf and v2["drift"]["alarm_threshold_log10"] == 2.0
        metrics = client.get("/metrics").text
        for measure, value in clf.items():
            assert _metric(metrics, "hydra_shadow_fidelity", model="clf", measure=measure) == pytest.approx(
                value
            )
        assert _metric(metrics, "hydra_shadow_rows_total", model="clf", version="1") == 400
        assert _metric(metrics, "hydra_shadow_dropped_total", model="clf", version="1") == 0
        assert _metric(metrics, "hydra_shadow_fraction", model="reg", version="1") == 1.0

        # clean traffic (same law as the calibration rows): no alarm, the run counts every row
        drift = client.get("/v1/models/clf").json()["drift"]
        assert drift["alarms"] == 0 and drift["last_alarm_at"] is None and drift["rows_in_run"] == 400
        assert _metric(metrics, "hydra_drift_alarms_total", model="clf", version="1") == 0
        assert _metric(metrics, "hydra_drift_alarm_threshold_log10", model="clf", version="1") == 2.0
        # shifted traffic: alarms, the time of the last one, the run restarted
        _send(client, "clf", calibration_inputs("classification", 200, seed=13) + np.float32(8.0))
        drift = _wait(lambda: (d := client.get("/v1/models/clf").json()["drift"])["rows_total"] == 600 and d)
        assert drift["alarms"] >= 1 and drift["last_alarm_at"] is not None
        assert drift["rows_in_run"] < 200 and 400 < drift["last_alarm_row"] <= 600
        assert client.get("/v2/models/clf").json()["parameters"]["drift"]["alarms"] == drift["alarms"]
        metrics = client.get("/metrics").text
        assert _metric(metrics, "hydra_drift_alarms_total", model="clf", version="1") == drift["alarms"]
        gauge = _metric(metrics, "hydra_drift_martingale_log10", model="clf", version="1")
        assert gauge is not None and gauge < 2.0

        # a reload starts a new martingale (and a new shadow window) for the version it loads
        assert client.post("/v2/repository/models/clf/load").status_code == 200
        reloaded = client.get("/v1/models/clf").json()
        assert reloaded["drift"]["alarms"] == 0 and reloaded["drift"]["rows_total"] == 0
        assert reloaded["shadow"]["rows"] == 0
        metrics = client.get("/metrics").text
        # the counter of a version reloaded as itself keeps counting (a counter never goes back)
        assert _metric(metrics, "hydra_drift_alarms_total", model="clf", version="1") == drift["alarms"]
        assert _metric(metrics, "hydra_drift_martingale_log10", model="clf", version="1") == 0.0


def test_package_without_ensemble_serves_as_before_and_says_so(model_repository: Path) -> None:
    with in_process(model_repository, shadow_fraction=0.5) as client:
        rows = calibration_inputs("classification", 50, seed=3)
        r = client.post("/v1/models/clf:predict", json={"instances": rows.tolist()})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 50
        shadow = client.get("/v1/models/clf").json()["shadow"]
        assert shadow["enabled"] is False and shadow["ensemble_available"] is False
        assert (
            shadow["ensemble_in_package"] is False and shadow["reason"] == "no ensemble.onnx in the package"
        )
        assert shadow["rows"] == 0 and shadow["fidelity"] is None
        metrics = client.get("/metrics").text
        assert _metric(metrics, "hydra_shadow_fraction", model="clf", version="1") == 0.0
        assert _metric(metrics, "hydra_shadow_fidelity", model="clf") is None


def _sample(n: int) -> Sample:
    return Sample(
        rows=np.zeros((n, 8), np.float32), epistemic=np.zeros(n), label=np.zeros(n, np.int64), mean=None
    )


def test_full_shadow_queue_drops_and_counts_without_blocking(shadow_repo: Path) -> None:
    """The worker is not started: the queue (size 2) fills, every further sample is dropped at once."""
    from service.manifest import ModelManifest
    from service.shadow import EnsembleRunner

    package = shadow_repo / "clf" / "1"
    runner = EnsembleRunner(package / "ensemble.onnx", ModelManifest.load(package / "manifest.json"))
    dropped: list[int] = []
    teacher = ShadowTeacher(
        runner, ShadowBudget(1.0, window=100, queue_size=2), task="classification", on_dropped=dropped.append
    )
    rows = calibration_inputs("classification", 10, seed=1)
    summary = {"mutual_information": np.zeros(10), "label": np.zeros(10, np.int64)}
    t0 = time.perf_counter()
    for _ in range(5):
        teacher.offer(rows, summary)
    assert time.perf_counter() - t0 < 0.5
    assert dropped == [10, 10, 10] and teacher.state().dropped == 30
    teacher.start("clf")  # now the two queued samples are compared
    assert teacher.drain(10.0)
    state = teacher.state()
    assert state.rows == 20 and state.window_rows == 20 and state.fidelity is None  # < MIN_ROWS
    teacher.compare(_sample(MIN_ROWS))
    assert teacher.state().fidelity is not None
    teacher.stop()


def test_measures_are_rate_limited_and_caught_up_once_the_queue_is_idle(shadow_repo: Path) -> None:
    """Twenty samples compared back to back recompute the window's measures far fewer than twenty
    times; the worker, idle, exports the last rows' measures within about FIDELITY_EVERY_S without
    anyone reading `state()`; `state()` is the window's exact value."""
    from service.manifest import ModelManifest
    from service.shadow import FIDELITY_EVERY_S, EnsembleRunner

    package = shadow_repo / "clf" / "1"
    runner = EnsembleRunner(package / "ensemble.onnx", ModelManifest.load(package / "manifest.json"))
    exported: list[dict[str, float]] = []
    teacher = ShadowTeacher(
        runner,
        ShadowBudget(1.0, window=2000, queue_size=32),
        task="classification",
        on_fidelity=exported.append,
    )
    rng = np.random.default_rng(3)
    for i in range(20):
        rows = calibration_inputs("classification", MIN_ROWS, seed=100 + i)
        summary = {"mutual_information": rng.random(MIN_ROWS), "label": np.zeros(MIN_ROWS, np.int64)}
        teacher.offer(rows, summary)
    teacher.start("clf")
    assert teacher.drain(10.0)
    assert 1 <= len(exported) < 10
    before = len(exported)
    deadline = time.monotonic() + 5 * FIDELITY_EVERY_S
    while len(exported) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(exported) == before + 1, "the idle worker did not export the last rows' measures"
    state = teacher.state()
    assert state.window_rows == 20 * MIN_ROWS and state.fidelity == exported[-1]
    teacher.stop()


class _CountingRunner:
    """The real EnsembleRunner, recording the rows of every run."""

    def __init__(self, shadow_repo: Path) -> None:
        from service.manifest import ModelManifest
        from service.shadow import EnsembleRunner

        package = shadow_repo / "clf" / "1"
        self.runner = EnsembleRunner(package / "ensemble.onnx", ModelManifest.load(package / "manifest.json"))
        self.runs: list[int] = []

    def __call__(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        self.runs.append(int(rows.shape[0]))
        return self.runner(rows)


def _offer(teacher: ShadowTeacher, n: int, seed: int) -> None:
    rows = calibration_inputs("classification", n, seed=seed)
    summary = {"mutual_information": np.random.default_rng(seed).random(n), "label": np.zeros(n, np.int64)}
    teacher.offer(rows, summary)


def test_queued_samples_are_gathered_into_runs_of_min_batch_rows(shadow_repo: Path) -> None:
    """Ten 8-row samples, min_batch 32: three runs of 32, 32 and 16 rows (the last after GATHER_S),
    every row compared once, in the order offered."""
    runner = _CountingRunner(shadow_repo)
    teacher = ShadowTeacher(
        runner,
        ShadowBudget(1.0, window=1000, queue_size=16, min_batch=32, max_busy=1.0),
        task="classification",
    )
    for i in range(10):
        _offer(teacher, 8, seed=200 + i)
    teacher.start("clf")
    assert teacher.drain(10.0)
    assert runner.runs == [32, 32, 16]
    assert teacher.state().rows == 80 and teacher.state().window_rows == 80
    teacher.stop()


def test_the_worker_keeps_to_its_busy_share_and_drops_what_it_cannot_afford(shadow_repo: Path) -> None:
    """Samples offered without pause for 1.5 s at max_busy 0.1: the worker's busy time stays within
    a tenth of the wall time (plus one run), and what it could not take is dropped and counted."""
    runner = _CountingRunner(shadow_repo)
    busy: list[float] = []
    teacher = ShadowTeacher(
        runner, ShadowBudget(1.0, window=1000, queue_size=4, min_batch=256, max_busy=0.1),
        task="classification", on_busy=busy.append,
    )  # fmt: skip
    teacher.start("clf")
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < 1.5:
        _offer(teacher, 256, seed=i % 7)
        i += 1
        time.sleep(0.001)
    wall = time.monotonic() - t0
    teacher.stop()  # the run in progress finishes: its busy time counts within `wall` + one run
    state = teacher.state()
    assert busy and state.busy_s == pytest.approx(sum(busy))
    assert state.busy_s <= 0.1 * wall + max(busy) + 0.05
    assert state.dropped > 0 and state.rows + state.dropped <= 256 * i
    assert state.max_busy == 0.1 and state.min_batch == 256


def test_sampling_takes_about_the_fraction() -> None:
    teacher = ShadowTeacher(None, ShadowBudget(0.3, window=10, queue_size=1), task="classification")
    assert not teacher.enabled  # no ensemble: nothing is sampled, whatever the setting
    from service.fidelity import pick

    rng = np.random.default_rng(0)
    rows = np.zeros((10_000, 2), np.float32)
    summary = {"mutual_information": np.arange(10_000.0), "label": np.zeros(10_000, np.int64)}
    sample = pick(rng, 0.3, rows, summary, "classification")
    assert sample is not None and abs(sample.rows.shape[0] - 3000) < 4 * np.sqrt(10_000 * 0.21)
    assert np.all(np.diff(sample.epistemic) > 0)  # Hydra's summaries stay aligned with their rows


def test_spearman_matches_scipy_with_ties() -> None:
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a = np.round(rng.normal(size=300), 1)
    b = a + np.round(rng.normal(size=300), 1)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, rel=1e-12)
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))


def test_monitoring_settings_read_the_environment_and_refuse_bad_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    monkeypatch.setenv("HYDRA_SHADOW_FRACTION", "0.25")
    monkeypatch.setenv("HYDRA_DRIFT_DELTA", "0.001")
    settings = Settings()
    assert (settings.shadow_fraction, settings.drift_delta) == (0.25, 0.001)
    assert Settings.model_fields["shadow_fraction"].default == 0.01
    for bad in (
        {"shadow_fraction": 1.5},
        {"shadow_fraction": -0.1},
        {"drift_delta": 0.0},
        {"drift_delta": 1.0},
    ):
        with pytest.raises(ValidationError):
            Settings(**bad)


def test_shadow_budget_refuses_a_share_of_the_core_outside_0_1() -> None:
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="max_busy"):
            ShadowBudget(0.1, window=10, queue_size=1, max_busy=bad)
    assert ShadowBudget(0.1, window=10, queue_size=1, max_busy=1.0).max_busy == 1.0
