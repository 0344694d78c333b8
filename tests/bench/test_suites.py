"""The dataset suites: offline makers, disjoint suites, the done-when verdict, and one real run
through `--data`'s code path rendered into BENCHMARKS.md."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from bench.report import fresh3_section, splits_section, suites_section
from bench.suites import (
    CONFIRMATION,
    FRESH,
    FRESH2,
    SUITES,
    TUNING,
    SuitePlan,
    run_suites,
    verdict,
    write_csv,
)
from training.selfcheck import PROBE_ROWS

ALL = TUNING + CONFIRMATION + FRESH + FRESH2


@pytest.mark.parametrize("dataset", ALL, ids=lambda d: d.name)
def test_every_dataset_is_an_offline_numeric_table(dataset: Any, tmp_path: Path) -> None:
    frame = pd.read_csv(write_csv(dataset, tmp_path))
    features = frame.drop(columns=["target"])
    assert len(frame) >= 150 and features.shape[1] >= 4
    assert all(np.issubdtype(t, np.number) for t in features.dtypes)
    assert np.isfinite(features.to_numpy()).all() and frame["target"].notna().all()
    if dataset.task == "classification":
        assert 2 <= frame["target"].nunique() <= 10
    else:
        assert frame["target"].nunique() > 100


def test_suites_are_disjoint_and_big_enough() -> None:
    names = [d.name for d in ALL]
    assert len(set(names)) == len(names)
    tasks = [d.task for d in ALL]
    assert tasks.count("classification") >= 6 and tasks.count("regression") >= 3
    for held_out in (CONFIRMATION, FRESH, FRESH2):
        assert {d.task for d in held_out} == {"classification", "regression"}


def _run(
    dataset: str, task: str, spearman: float, families: dict[str, tuple[float, float]]
) -> dict[str, Any]:
    fam = {
        k: {
            "ensemble": e,
            "hydra": h,
            "kd": 0.5,
            "hydra_retention": (h - 0.5) / (e - 0.5),
            "well_posed": e >= 0.7,
        }
        for k, (e, h) in families.items()
    }
    test = (
        {m: {"accuracy": 0.9} for m in ("ensemble", "kd", "hydra")}
        if task == "classification"
        else {m: {"coverage_95": 0.95, "rmse": 1.0} for m in ("ensemble", "kd", "hydra")}
    )
    return {
        "dataset": dataset,
        "task": task,
        "seed": 0,
        "test": test,
        "self_check": {"spearman": spearman, "families": fam},
    }


def test_verdict_names_every_miss() -> None:
    good = [
        _run("a", "classification", 0.95, {"near": (0.9, 0.89), "blind": (0.3, 0.1)}),
        _run("b", "regression", 0.92, {"far": (1.0, 1.0)}),
    ]
    v = verdict(good)
    assert v["met"] and v["median_spearman"] == pytest.approx(0.935)

    bad = [*copy.deepcopy(good), _run("c", "classification", 0.5, {"near": (0.95, 0.3)})]
    bad[0]["test"]["hydra"]["accuracy"] = 0.88  # 2 points below the ensemble
    bad[1]["test"]["hydra"]["coverage_95"] = 0.90  # 5 points below
    v = verdict(bad)
    assert not v["met"] and v["spearman_met"]  # the median of (0.95, 0.92, 0.5) is 0.92
    assert v["low_retention"] == ["c s0 near (-0.44)"] and v["inverted"] == ["c s0 near"]
    assert v["accuracy_misses"] == ["a s0 (−2.0 pts)"] and v["coverage_misses"] == ["b s0 (5.0 pts)"]
    # with the evaluation's label agreement, a miss says how many labels flipped and how close to a tie
    bad[0]["fidelity"] = {"label_agreement": 0.98, "labels_flipped": 2, "widest_flipped_margin": 0.0113}
    assert verdict(bad)["accuracy_misses"] == ["a s0 (−2.0 pts; 2 label(s) flipped, ensemble margin ≤ 0.011)"]


def test_one_real_suite_run_renders(tmp_path: Path) -> None:
    plan = SuitePlan(
        suites=("tuning",), seeds=(0,), members=2, epochs=2, datasets=("penguins",), split_seeds=(0, 1)
    )
    runs = run_suites(plan, tmp_path, log=lambda _: None)
    assert [(r["dataset"], r["split_seed"]) for r in runs] == [("penguins", 0), ("penguins", 1)]
    sizes = [r["self_check"]["rows_per_family"] for r in runs]
    assert sizes == [PROBE_ROWS, PROBE_ROWS] and runs[1]["config"]["data"]["split_seed"] == 1
    run = runs[0]
    assert set(run["test"]) == {"ensemble", "kd", "hydra"} and run["transfer_size"] > 0
    assert (tmp_path / "models" / "penguins" / "s0" / "model.onnx").exists()
    machine = {"date_utc": "2026-01-01", "cpu": "cpu", "cores": 2, "command": "python -m bench suites"}

    def result(suite: str, suite_runs: list[dict[str, Any]]) -> dict[str, Any]:
        """What `python -m bench suites` writes for one suite of these runs."""
        return {
            "preset": "test",
            "plan": {**plan.__dict__, "suites": [suite]},
            "machine": machine,
            "runs": suite_runs,
            "verdict": {suite: verdict(suite_runs)},
            "seconds": 1.0,
        }

    doc = suites_section(result("tuning", runs))
    assert "### Tuning suite" in doc and "| penguins |" in doc and "scaled_x4" in doc
    stability = splits_section({"machine": machine, "runs": runs})
    assert "| penguins | 0, 1 |" in stability and "of 2" in stability
    fresh3_runs = [dict(r, suite="fresh3") for r in runs]
    f3 = fresh3_section(result("fresh3", fresh3_runs))
    assert "#### Fresh3 (" in f3 and "| penguins |" in f3 and "Criteria over every" in f3
    assert fresh3_section(None) == ""
    assert list(SUITES) == [
        "tuning",
        "confirmation",
        "fresh",
        "fresh2",
        "fresh_ood",
        "fresh_ood2",
        "tuning_wide",
        "fresh3",
        "fresh4",
        "fresh5",
        "fresh6",
    ]
    names = [d.name for suite in SUITES.values() for d in suite]
    assert len(names) == len(set(names)), "a table in two suites would blur which data chose what"
