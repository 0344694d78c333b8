"""End-to-end `--smoke` runs through the real CLI: export, ONNX Runtime, manifest, parity, reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from service.manifest import ModelManifest
from tests import oracle
from training.__main__ import app
from training.config import DataConfig
from training.data import load_data

runner = CliRunner()


def _invoke(*args: str) -> None:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output


# `digits_smoke` (tests/training/conftest.py): one `run --dataset digits --smoke`, shared with
# tests/training/test_distributed.py as its single-process run.


def test_smoke_package_is_complete_and_valid(digits_smoke: tuple[Path, Path]) -> None:
    out, run_dir = digits_smoke
    graphs, reports = ["model.onnx", "ensemble.onnx", "kd.onnx"], ["report.json", "report.md"]
    plots = ["reliability.png", "mi_scatter.png", "ood_histograms.png"]
    for name in [*graphs, "manifest.json", *reports, *plots]:
        assert (out / name).stat().st_size > 0, name
    manifest = ModelManifest.load(out)
    assert (manifest.name, manifest.version, manifest.task) == ("digits", 3, "classification")
    assert manifest.input.shape == [-1, 64] and manifest.heads == 3
    assert manifest.labels == [str(i) for i in range(10)]
    assert manifest.provenance.data_sha256 and manifest.provenance.seed == 0
    assert manifest.ood.default_alpha == 0.05
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"ensemble", "kd", "hydra"}
    assert set(report["methods"]["hydra"]["ood"]) == {"noise", "inverted", "rotated"}
    parity = json.loads((run_dir / "export.json").read_text())
    assert all(v <= 1e-4 for info in parity.values() for v in info["max_abs_diff"].values())


def test_smoke_graphs_follow_the_contract(digits_smoke: tuple[Path, Path]) -> None:
    out, _ = digits_smoke
    manifest = ModelManifest.load(out)
    data = load_data(DataConfig(dataset="digits"))
    for filename, heads in (("model.onnx", manifest.heads), ("ensemble.onnx", 3), ("kd.onnx", 1)):
        session = ort.InferenceSession(str(out / filename), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["input"]
        # only the student carries the feature density of its shared body
        # ... and, the digits' pixels being integers 0..16, the count of values unseen in training
        want = (
            ["log_probs", "density", "input_density", "unseen_values"]
            if filename == "model.onnx"
            else ["log_probs"]
        )
        assert [o.name for o in session.get_outputs()] == want
        for batch in (1, 7):
            log_probs, *density = session.run(None, {"input": data.test.x[:batch]})
            assert log_probs.shape == (batch, heads, 10) and log_probs.dtype == np.float32
            np.testing.assert_allclose(np.exp(log_probs).sum(-1), 1.0, atol=1e-5)
            assert all(d.shape == (batch,) and np.all(d >= 0) for d in density)

    # schema 3: the OOD statistic combines MI with the densities, normalised on the validation
    # split, and ranks the unseen-value count ahead of them
    assert manifest.schema_version == 3 and manifest.outputs.density == "density"
    assert manifest.outputs.unseen_values == "unseen_values" and manifest.ood.priority == "unseen_values"
    assert manifest.ood.score == "combined" and manifest.ood.combination == "sum_pos_log_z"
    assert [c.score for c in manifest.ood.components] == ["mutual_information", "density", "input_density"]
    assert [c.tails for c in manifest.ood.components] == ["upper", "upper", "both"]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])

    def served(x: np.ndarray) -> dict[str, np.ndarray]:
        """What the server should answer for rows `x` (the test oracle on the graph's outputs)."""
        log_probs, density, typicality, unseen = session.run(None, {"input": x})
        raw = {
            "log_probs": log_probs,
            "density": density,
            "input_density": typicality,
            "unseen_values": unseen,
        }
        return oracle.answer(oracle.read_manifest(out), raw)

    # the stored calibration scores are the served statistic on the held-out calibration split
    cal = served(data.cal.x)
    np.testing.assert_allclose(manifest.ood.calibration_scores, np.sort(cal["ood_score"]), rtol=1e-6)
    # ... a different split from the one the components were normalised on
    val_density = session.run(None, {"input": data.val.x})[1]
    median = np.median(np.log(val_density.astype(np.float64)))
    assert manifest.ood.components[1].log_median == pytest.approx(median, rel=1e-5)
    report = json.loads((out / "report.json").read_text())
    test = served(data.test.x)
    false_alarms = np.mean(test["ood_p_value"] <= 0.05)
    assert report["conformal"]["false_alarm_rate"]["0.05"] == pytest.approx(false_alarms)
    assert report["conformal"]["score"] == "combined" and report["conformal"]["n_test"] == len(data.test)
    # rows in the wrong unit: MI ranks them as familiar, the density does not
    wrong_unit = served(data.test.x * 4.0)
    assert np.mean(wrong_unit["ood_p_value"] <= 0.05) >= 0.9
    assert np.median(wrong_unit["density_score"]) > np.max(test["density_score"])
    # ... and rows x0.1: too close to the mean in input space, two-sided typicality flags them
    assert np.mean(served(data.test.x * 0.1)["ood_p_value"] <= 0.05) >= 0.9
    # ... and one pixel x0.1 (a 16 sent as 1.6) is a value no training digit has
    one_pixel = data.test.x.reshape(len(data.test), -1).copy()
    lit = one_pixel.argmax(axis=1)
    one_pixel[np.arange(len(one_pixel)), lit] *= 0.1
    answered = served(one_pixel.reshape(data.test.x.shape))
    seen_off = answered["unseen_values"] >= 1  # where that pixel's column is one the count reads
    assert seen_off.mean() >= 0.5 and (test["unseen_values"] == 0).mean() >= 0.95
    assert np.mean(answered["ood_p_value"][seen_off] <= 0.05) >= 0.9
    want_scores = {"mutual_information", "density", "input_density", "unseen_values", "combined"}
    assert set(report["hydra_ood_scores"]["noise"]) == want_scores
    families = report["self_check"]["families"]
    assert {"one_feature_x0.1", "one_feature_x4", "one_feature_x10", "scaled_x4"} <= set(families)
    assert families["scaled_x4"]["hydra_ood"]["combined"] >= 0.95


def test_stages_one_by_one_reproduce_the_run(digits_smoke: tuple[Path, Path], tmp_path: Path) -> None:
    out, _ = digits_smoke
    run_dir, again = tmp_path / "run", tmp_path / "pkg" / "3"
    _invoke(
        "run",
        "--dataset",
        "digits",
        "--smoke",
        "--device",
        "cpu",
        "--out",
        str(again),
        "--run-dir",
        str(run_dir),
        "--config-only",
    )
    assert (run_dir / "config.json").exists() and not again.exists()
    for stage in ("teachers", "distil"):
        _invoke(stage, "--run-dir", str(run_dir))
    _invoke("export", "--run-dir", str(run_dir), "--out", str(again))
    _invoke("evaluate", "--run-dir", str(run_dir), "--out", str(again))
    for name in ("model.onnx", "ensemble.onnx", "kd.onnx"):  # deterministic for the seed
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    assert ModelManifest.load(again).ood.calibration_scores == ModelManifest.load(out).ood.calibration_scores


def test_bring_your_own_csv_regression_with_ood(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((240, 3))
    y = 2.0 * x[:, 0] - x[:, 1] + 0.1 * rng.standard_normal(240) + 50.0
    rows = "\n".join(",".join(f"{v:.5f}" for v in (*xi, yi)) for xi, yi in zip(x, y, strict=True))
    (tmp_path / "rows.csv").write_text("a,b,c,price\n" + rows + "\n")
    ood = 6.0 + rng.standard_normal((40, 3))
    (tmp_path / "far.csv").write_text(
        "a,b,c\n" + "\n".join(",".join(f"{v:.5f}" for v in r) for r in ood) + "\n"
    )
    out = tmp_path / "models" / "rows" / "1"
    _invoke(
        "run",
        "--data",
        str(tmp_path / "rows.csv"),
        "--target",
        "price",
        "--task",
        "regression",
        "--ood",
        str(tmp_path / "far.csv"),
        "--smoke",
        "--out",
        str(out),
        "--run-dir",
        str(tmp_path / "run"),
    )
    manifest = ModelManifest.load(out)
    assert manifest.task == "regression" and manifest.feature_names == ["a", "b", "c"]
    assert [c.score for c in manifest.ood.components] == ["epistemic_variance", "density", "input_density"]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["mean", "variance", "density", "input_density"]
    mean, variance, _, _ = session.run(None, {"input": x[:5].astype(np.float32)})
    assert mean.shape == variance.shape == (5, manifest.heads) and (variance > 0).all()
    report = json.loads((out / "report.json").read_text())
    assert "ood" in report["methods"]["hydra"]["ood"]
    # the user's OOD rows are checked by the self-check beside the generic probes
    assert {"ood:ood", "box", "scaled_x4"} <= set(report["self_check"]["families"])
    assert report["self_check"]["notes"]["ood:ood"] == "user-supplied: far.csv"
    assert {"rmse", "nll", "coverage_95"} <= set(report["methods"]["hydra"]["test"])


@pytest.mark.parametrize("dataset", ["mnist1d", "toy", "diabetes"])
def test_builtin_datasets_smoke(dataset: str, tmp_path: Path) -> None:
    out = tmp_path / "pkg" / "1"
    _invoke(
        "run",
        "--dataset",
        dataset,
        "--smoke",
        "--members",
        "2",
        "--out",
        str(out),
        "--run-dir",
        str(tmp_path / "run"),
    )
    manifest = ModelManifest.load(out)
    assert manifest.name == dataset and manifest.heads == 2
    if dataset == "toy":
        assert (out / "predictive_band.png").stat().st_size > 0


def test_bad_task_is_rejected(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["run", "--data", "x.csv", "--target", "y", "--task", "ranking", "--out", str(tmp_path)]
    )
    assert result.exit_code != 0


def _dense_widths(path: Path) -> list[int]:
    """Output widths of the body's dense layers (the (out, in) weights of its Gemm nodes)."""
    graph = onnx.load(str(path)).graph
    gemm_weights = {node.input[1] for node in graph.node if node.op_type == "Gemm"}
    return [int(t.dims[0]) for t in graph.initializer if t.name in gemm_weights]


def _exported_widths(data: Path, out: Path, run_dir: Path, *options: str) -> tuple[dict[str, Any], list[int]]:
    """(config.json, the student's dense widths) of a --smoke classification run on `data` with
    `options`, run stage by stage up to the export: the shapes are settled there (no evaluation)."""
    _invoke(
        "run", "--data", str(data), "--target", "label", "--task", "classification", "--smoke",
        *options, "--out", str(out), "--run-dir", str(run_dir), "--config-only",
    )  # fmt: skip
    for stage in ("teachers", "distil"):
        _invoke(stage, "--run-dir", str(run_dir))
    _invoke("export", "--run-dir", str(run_dir), "--out", str(out))
    return json.loads((run_dir / "config.json").read_text()), _dense_widths(out / "model.onnx")


def test_student_width_widens_the_student_only(tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((200, 4))
    frame = "f0,f1,f2,f3,label\n" + "\n".join(
        ",".join(f"{v:.4f}" for v in row) + f",{int(row[0] > 0)}" for row in x
    )
    data = tmp_path / "rows.csv"
    data.write_text(frame + "\n")
    widths = {}
    for width in ("1", "3"):
        out, run_dir = tmp_path / f"w{width}" / "1", tmp_path / f"run{width}"
        config, student = _exported_widths(data, out, run_dir, "--student-width", width)
        assert config["distil"]["student_width"] == float(width)
        widths[width] = (student, _dense_widths(out / "ensemble.onnx"))
    (student1, teachers1), (student3, teachers3) = widths["1"], widths["3"]
    assert teachers1 == teachers3  # the teachers keep the preset's shape
    assert student1 and [3 * w for w in student1] == student3
    # without the option, the `file` preset's student: one hidden layer of 8 x 128 units
    out, run_dir = tmp_path / "preset" / "1", tmp_path / "run-preset"
    config, student = _exported_widths(data, out, run_dir)
    assert config["distil"]["student_hidden"] == [1024]
    assert student == [1024] and _dense_widths(out / "ensemble.onnx") == teachers1
    # --student-hidden sets the student's layers exactly; a malformed one is a usage error
    _, student = _exported_widths(
        data, tmp_path / "hidden" / "1", tmp_path / "run-hidden", "--student-hidden", "64,32"
    )
    assert student == [64, 32]
    bad = runner.invoke(
        app,
        ["run", "--data", str(data), "--target", "label", "--task", "classification",
         "--out", str(tmp_path / "bad"), "--student-hidden", "64,x"],
        terminal_width=200,
    )  # fmt: skip
    assert bad.exit_code == 2 and "comma-separated integers" in bad.output
