"""The fidelity self-check: a starved transfer set must trip it, the default recipe must not, and
`--strict` turns a failed check into a non-zero exit after the package is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import make_classification
from typer.testing import CliRunner

from service.manifest import ModelManifest
from training.__main__ import app
from training.presets import SMOKE_PROBE_ROWS
from training.selfcheck import RETENTION_MIN, SPEARMAN_MIN, find_problems

runner = CliRunner()
STARVED = {  # the training inputs alone, one temperature for every row
    "mixup_copies": 0,
    "noise_copies": 0,
    "far_copies": 0,
    "marginal_copies": 0,
    "extrapolate_copies": 0,
    "radial_temperature": False,
}


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    x, y = make_classification(n_samples=600, n_features=8, n_informative=5, n_classes=3, random_state=0)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(8)])
    frame["target"] = y
    path = tmp_path_factory.mktemp("data") / "rows.csv"
    frame.to_csv(path, index=False)
    return path


def _args(table: Path, out: Path, run_dir: Path) -> list[str]:
    return [
        "run",
        "--data", str(table), "--target", "target", "--task", "classification",
        "--members", "4", "--device", "cpu", "--out", str(out), "--run-dir", str(run_dir),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def default_run(table: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(package, run dir, CLI output) of the default recipe on `table` with --strict; its teachers
    are also the starved run's (the same config and seed train the same weights)."""
    root = tmp_path_factory.mktemp("default")
    out, run_dir = root / "pkg" / "1", root / "run"
    result = runner.invoke(app, [*_args(table, out, run_dir), "--strict"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, run_dir, result.output


def test_default_recipe_passes_strict(default_run: tuple[Path, Path, str]) -> None:
    out, _, output = default_run
    assert "WARNING" not in output and "self-check" in output
    report = json.loads((out / "report.json").read_text())
    sc = report["self_check"]
    assert sc["passed"] and sc["spearman"] >= SPEARMAN_MIN and sc["problems"] == []
    assert set(sc["families"]) >= {"independent", "off_manifold", "box", "scaled_x4"}
    assert "Fidelity self-check" in (out / "report.md").read_text()
    # a --data run rescales rows about the origin, so its unit-error probes are marked as seen ones
    assert sc["families"]["scaled_x4"]["in_transfer"] and not sc["families"]["box"]["in_transfer"]
    assert "| scaled_x4 † |" in (out / "report.md").read_text()
    # the verdict travels in the manifest the server reads
    summary = ModelManifest.load(out).evaluation["self_check"]
    assert summary["passed"] is True and summary["spearman"] == sc["spearman"]


def test_starved_transfer_set_trips_the_check(
    table: Path, default_run: tuple[Path, Path, str], tmp_path: Path
) -> None:
    out, run_dir = tmp_path / "pkg" / "1", tmp_path / "run"
    result = runner.invoke(app, [*_args(table, out, run_dir), "--config-only"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = json.loads((run_dir / "config.json").read_text())
    # the teachers stage of this config is the default run's (same data, seed and teacher config:
    # the same weights), so its teachers.pt is reused rather than trained again (2.9 s)
    default_config = json.loads((default_run[1] / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "distil"} == {
        k: v for k, v in default_config.items() if k != "distil"
    }
    shutil.copy2(default_run[1] / "teachers.pt", run_dir / "teachers.pt")
    config["distil"].update(STARVED)
    # the --smoke count of self-check rows per family: the same two families trip as with 4,000
    # (retention 0.89 for independent and off_manifold, either way), and each of the two evaluations
    # below takes 1.0 s instead of 3.3 s
    config["probe_rows"] = SMOKE_PROBE_ROWS
    (run_dir / "config.json").write_text(json.dumps(config))
    assert runner.invoke(app, ["distil", "--run-dir", str(run_dir)]).exit_code == 0
    assert runner.invoke(app, ["export", "--run-dir", str(run_dir), "--out", str(out)]).exit_code == 0

    # without --strict: the package is written, the CLI warns with the numbers, exit 0
    lenient = runner.invoke(app, ["evaluate", "--run-dir", str(run_dir), "--out", str(out)])
    assert lenient.exit_code == 0, lenient.output
    assert "WARNING" in lenient.output and "Spearman" in lenient.output
    sc = json.loads((out / "report.json").read_text())["self_check"]
    assert not sc["passed"] and sc["problems"] and sc["rows_per_family"] == SMOKE_PROBE_ROWS
    assert ModelManifest.load(out).evaluation["self_check"]["passed"] is False

    strict = runner.invoke(app, ["evaluate", "--run-dir", str(run_dir), "--out", str(out), "--strict"])
    assert strict.exit_code == 3, strict.output
    assert "--strict" in strict.output and (out / "model.onnx").exists()


def test_problems_name_the_failing_numbers() -> None:
    families = {
        "detected": {
            "ensemble": 0.95,
            "hydra": 0.60,
            "hydra_retention": (0.60 - 0.5) / 0.45,
            "well_posed": True,
        },
        "blind": {"ensemble": 0.55, "hydra": 0.20, "hydra_retention": -6.0, "well_posed": False},
        "kept": {"ensemble": 0.90, "hydra": 0.89, "hydra_retention": 0.975, "well_posed": True},
    }
    problems = find_problems("mutual_information", 0.85, families)
    assert len(problems) == 2
    assert "0.850" in problems[0] and str(SPEARMAN_MIN) in problems[0]
    assert problems[1].startswith("detected:") and "0.22" in problems[1] and str(RETENTION_MIN) in problems[1]
    # a family the ensemble cannot detect is no evidence against Hydra
    assert find_problems("mutual_information", 0.95, {"blind": families["blind"]}) == []
    assert np.isclose(families["kept"]["hydra_retention"], 0.975)
