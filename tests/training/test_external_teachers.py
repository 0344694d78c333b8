"""`python -m training run --teachers …`: the user's own ONNX teachers distilled end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from sklearn.datasets import make_classification
from torch import nn
from typer.testing import CliRunner

from service import inference
from service.manifest import ModelManifest
from service.uncertainty import ConformalOODCalibrator
from tests.training.test_onnx_teachers import _export, _fit_classifier, _mlp
from training.__main__ import app
from training.onnx_teachers import OnnxTeachers, find_teacher_files, inspect_teachers

FEATURES, CLASSES = 6, 3


def write_csv(path: Path, x: np.ndarray, y: np.ndarray, target: str, prefix: str = "f") -> Path:
    """Feature columns {prefix}0, {prefix}1, … and `target`, 5 decimals (integer targets as integers)."""
    cell = str if y.dtype.kind in "iu" else (lambda t: f"{t:.5f}")
    header = ",".join(f"{prefix}{i}" for i in range(x.shape[1])) + f",{target}"
    rows = [",".join([*(f"{v:.5f}" for v in r), cell(t)]) for r, t in zip(x, y, strict=True)]
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def _distil(
    csv: Path, target: str | None, task: str, teachers: Path | list[Path], root: Path, *options: str
) -> Path:
    """`run --teachers ... --smoke` on `csv` (`teachers`: a folder or the files), which must succeed;
    the package written (root/pkg/1)."""
    out = root / "pkg" / "1"
    labels = ["--target", target] if target is not None else []
    files = teachers if isinstance(teachers, list) else [teachers]
    given = [arg for f in files for arg in ("--teachers", str(f))]
    result = CliRunner().invoke(
        app,
        ["run", "--data", str(csv), *labels, "--task", task, *given,
         *options, "--smoke", "--out", str(out), "--run-dir", str(root / "run")],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Three torch MLPs of different widths and one boosted-trees model (skl2onnx), plus the CSV."""
    from skl2onnx import to_onnx
    from sklearn.ensemble import GradientBoostingClassifier

    root = tmp_path_factory.mktemp("external")
    x, y = make_classification(
        n_samples=900, n_features=FEATURES, n_informative=4, n_classes=CLASSES, random_state=3
    )
    x = x.astype(np.float32)
    folder = root / "teachers"
    folder.mkdir()
    for seed, hidden in enumerate((16, 32, 64)):
        torch.manual_seed(seed)
        net = _fit_classifier(_mlp(hidden, CLASSES), x[:600], y[:600].astype(np.int64), seed)
        _export(net, folder / f"mlp{hidden}.onnx")
    gbm = GradientBoostingClassifier(n_estimators=20, max_depth=2, random_state=0).fit(x[:600], y[:600])
    onx = to_onnx(gbm, x[:1], options={id(gbm): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
    (folder / "trees.onnx").write_bytes(onx.SerializeToString())
    return folder, write_csv(root / "rows.csv", x, y.astype(int), "label")


def test_distils_a_mixed_mlp_and_trees_ensemble(teacher_dir: tuple[Path, Path], tmp_path: Path) -> None:
    folder, csv = teacher_dir
    out = _distil(csv, "label", "classification", folder, tmp_path)
    manifest = ModelManifest.load(out)
    assert manifest.heads == 4 and manifest.labels == ["0", "1", "2"]
    teachers = manifest.provenance.model_dump()["teachers"]
    assert sorted(t["file"] for t in teachers) == ["mlp16.onnx", "mlp32.onnx", "mlp64.onnx", "trees.onnx"]
    assert all(len(t["sha256"]) == 64 for t in teachers)
    assert {t["kind"] for t in teachers} == {"logits", "probs"}  # the trees output probabilities
    # ensemble.onnx is the user's teachers stacked: it answers what the files answer alone
    specs = inspect_teachers(find_teacher_files([folder]), "classification")
    x = np.random.default_rng(0).standard_normal((32, FEATURES)).astype(np.float32)
    stacked = ort.InferenceSession(str(out / "ensemble.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        stacked.run(None, {"input": x})[0], OnnxTeachers(specs).log_probs(x), atol=1e-4
    )
    # the student serves with the service's own code, combined OOD statistic included
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    raw = dict(zip(names, session.run(None, {"input": x}), strict=True))
    answer = inference.summarise(manifest, ConformalOODCalibrator(manifest.ood.calibration_scores), raw)
    assert answer["probabilities"].shape == (32, 3) and "density_score" in answer
    report = json.loads((out / "report.json").read_text())
    assert report["labelled"] and set(report["methods"]) == {"ensemble", "kd", "hydra"}
    assert "scaled_x4" in report["self_check"]["families"]


def test_without_a_target_the_teachers_label_the_rows(teacher_dir: tuple[Path, Path], tmp_path: Path) -> None:
    folder, csv = teacher_dir
    unlabelled = tmp_path / "rows.csv"
    lines = csv.read_text().splitlines()
    unlabelled.write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")
    out = _distil(unlabelled, None, "classification", sorted(folder.glob("mlp*.onnx")), tmp_path)
    report = json.loads((out / "report.json").read_text())
    assert report["labelled"] is False
    # "accuracy" is agreement with the teachers' own vote: the ensemble agrees with itself
    assert report["methods"]["ensemble"]["test"]["accuracy"] == pytest.approx(1.0)
    assert ModelManifest.load(out).provenance.model_dump()["labels"] == "teachers"


def test_bad_teachers_get_one_line_naming_the_file(teacher_dir: tuple[Path, Path], tmp_path: Path) -> None:
    folder, csv = teacher_dir
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in sorted(folder.glob("mlp*.onnx"))[:2]:
        (bad / p.name).write_bytes(p.read_bytes())
    _export(_mlp(8, CLASSES, features=FEATURES - 1), bad / "narrow.onnx", row_shape=(FEATURES - 1,))
    result = CliRunner().invoke(
        app,
        ["run", "--data", str(csv), "--target", "label", "--task", "classification", "--teachers", str(bad),
         "--smoke", "--out", str(tmp_path / "o" / "1"), "--run-dir", str(tmp_path / "run")],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "narrow.onnx" in result.output and "error" in result.output
    # a regression run over classifiers, and a data file whose feature count the teachers do not take
    result = CliRunner().invoke(
        app,
        ["run", "--data", str(csv), "--target", "label", "--task", "regression", "--teachers", str(folder),
         "--smoke", "--out", str(tmp_path / "o" / "1"), "--run-dir", str(tmp_path / "run2")],
    )  # fmt: skip
    assert result.exit_code == 2 and ".onnx" in result.output
    wide = tmp_path / "wide.csv"
    lines = csv.read_text().splitlines()
    wide.write_text("\n".join(["extra," + lines[0]] + ["1.0," + line for line in lines[1:]]) + "\n")
    result = CliRunner().invoke(
        app,
        ["run", "--data", str(wide), "--target", "label", "--task", "classification",
         "--teachers", str(folder), "--smoke", "--out", str(tmp_path / "o" / "1"),
         "--run-dir", str(tmp_path / "r3")],
    )  # fmt: skip
    assert result.exit_code == 2 and "7 feature columns" in result.output


class _Gaussian(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = _mlp(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return torch.stack([out[:, 0], nn.functional.softplus(out[:, 1]) + 1e-3], dim=1)


def test_regression_teachers_distil_with_their_variances(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((600, FEATURES)).astype(np.float32)
    y = (x[:, 0] * 3.0 + x[:, 1] ** 2 + 0.3 * rng.standard_normal(600)).astype(np.float32)
    folder = tmp_path / "teachers"
    folder.mkdir()
    for seed, hidden in enumerate((16, 32)):
        torch.manual_seed(seed)
        net = _Gaussian(hidden)
        opt = torch.optim.Adam(net.parameters(), lr=0.02)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        for _ in range(80):
            out = net(xt)
            loss = (0.5 * (torch.log(out[:, 1]) + (yt - out[:, 0]) ** 2 / out[:, 1])).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        _export(net.eval(), folder / f"g{hidden}.onnx", outputs=("gaussian",))
    csv = write_csv(tmp_path / "rows.csv", x, y, "price")
    out = _distil(csv, "price", "regression", folder, tmp_path)
    manifest = ModelManifest.load(out)
    assert manifest.task == "regression" and manifest.heads == 2
    specs = inspect_teachers(find_teacher_files([folder]), "regression")
    stacked = ort.InferenceSession(str(out / "ensemble.onnx"), providers=["CPUExecutionProvider"])
    mean, variance = stacked.run(["mean", "variance"], {"input": x[:16]})
    want_mean, want_var = OnnxTeachers(specs).gaussians(x[:16])
    np.testing.assert_allclose(mean, want_mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(variance, want_var, rtol=1e-4, atol=1e-4)
    report = json.loads((out / "report.json").read_text())
    assert "coverage_95" in report["methods"]["hydra"]["test"]


class _Image(nn.Module):
    """A teacher whose input is a 4 x 4 image, [batch, 4, 4]."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = _mlp(hidden, CLASSES, features=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


def test_image_shaped_teachers_get_a_conv_student(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 16)).astype(np.float32)
    y = (x[:, :4].sum(axis=1) > 0).astype(np.int64) + (x[:, 4] > 1.0)
    folder = tmp_path / "teachers"
    folder.mkdir()
    for seed, hidden in enumerate((8, 16)):
        torch.manual_seed(seed)
        net = _fit_classifier(_Image(hidden), x.reshape(-1, 4, 4), y, seed)
        _export(net, folder / f"img{hidden}.onnx", row_shape=(4, 4))
    csv = write_csv(tmp_path / "rows.csv", x, y, "label", prefix="p")
    out = _distil(csv, "label", "classification", folder, tmp_path, "--arch", "cnn2d")
    manifest = ModelManifest.load(out)
    assert manifest.input.shape == [-1, 4, 4] and manifest.provenance.model_dump()["architecture"] == "cnn2d"
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": x[:3].reshape(3, 4, 4)})[0].shape == (3, 2, 3)
    # a flat-input ensemble cannot take a 2-D conv student: said before anything runs
    flat = tmp_path / "flat"
    flat.mkdir()
    for hidden in (8, 16):
        _export(_mlp(hidden, CLASSES, features=16), flat / f"m{hidden}.onnx", row_shape=(16,))
    result = CliRunner().invoke(
        app,
        ["run", "--data", str(csv), "--target", "label", "--task", "classification", "--teachers", str(flat),
         "--arch", "cnn2d", "--smoke", "--out", str(tmp_path / "o" / "1"), "--run-dir", str(tmp_path / "r2")],
    )  # fmt: skip
    assert result.exit_code == 2 and "--arch cnn2d" in result.output
