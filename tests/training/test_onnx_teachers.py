"""The user's own ONNX teachers: real files from torch and skl2onnx, checked, run and stacked."""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import make_classification, make_regression
from sklearn.ensemble import GradientBoostingClassifier
from torch import Tensor, nn

from service.uncertainty import classification_uncertainty
from training.onnx_teachers import (
    OnnxTeachers,
    StackingError,
    TeacherContractError,
    find_teacher_files,
    inspect_teachers,
    stack_teachers,
)

FEATURES, CLASSES = 6, 3


def _mlp(hidden: int, out: int, features: int = FEATURES) -> nn.Sequential:
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, out))


def _export(
    module: nn.Module,
    path: Path,
    row_shape: tuple[int, ...] = (FEATURES,),
    outputs: tuple[str, ...] = ("logits",),
    dynamic: bool = True,
) -> Path:
    axes = {n: {0: "batch"} for n in ("x", *outputs)} if dynamic else None
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (torch.zeros(2, *row_shape),),
            buffer,
            input_names=["x"],
            output_names=list(outputs),
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    path.write_bytes(buffer.getvalue())
    return path


def _fit_classifier(net: nn.Module, x: np.ndarray, y: np.ndarray, seed: int, steps: int = 60) -> nn.Module:
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(steps):
        idx = torch.randint(0, len(xt), (128,))
        opt.zero_grad()
        nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
        opt.step()
    return net.eval()


class Softmax(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.net(x), dim=-1)


class Gaussian(nn.Module):
    """(batch, 2) = (mean, softplus variance); `split`: two outputs (variance, mean), in that order."""

    def __init__(self, hidden: int, split: bool = False) -> None:
        super().__init__()
        self.net, self.split = _mlp(hidden, 2), split

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        raw = self.net(x)
        mean, variance = raw[:, 0], nn.functional.softplus(raw[:, 1]) + 1e-6
        return (variance, mean) if self.split else torch.stack([mean, variance], dim=1)


@dataclass
class Ensemble:
    files: list[Path]
    x: np.ndarray
    torch_models: dict[str, nn.Module]
    sklearn_model: GradientBoostingClassifier | None = None


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory: pytest.TempPathFactory) -> Ensemble:
    """3 logit MLPs (16, 32, 64 hidden), a boosted-trees classifier, a softmax MLP: 5 teachers."""
    folder = tmp_path_factory.mktemp("classifiers")
    x, y = make_classification(
        n_samples=400, n_features=FEATURES, n_informative=4, n_classes=CLASSES, random_state=0
    )
    x, y = x.astype(np.float32), y.astype(np.int64)
    models: dict[str, nn.Module] = {}
    for seed, hidden in enumerate((16, 32, 64)):
        torch.manual_seed(seed)
        models[f"mlp{hidden}.onnx"] = _fit_classifier(_mlp(hidden, CLASSES), x, y, seed)
    torch.manual_seed(7)
    models["softmax.onnx"] = Softmax(_fit_classifier(_mlp(24, CLASSES), x, y, 7))
    for name, model in models.items():
        _export(model, folder / name, outputs=("probs" if name == "softmax.onnx" else "logits",))
    from skl2onnx import to_onnx  # here, not at the top: 0.3 s in every collecting worker

    trees = GradientBoostingClassifier(n_estimators=15, max_depth=2, random_state=0).fit(x, y)
    (folder / "trees.onnx").write_bytes(
        to_onnx(trees, x[:1], options={id(trees): {"zipmap": False}}).SerializeToString()
    )
    return Ensemble(find_teacher_files([folder]), x, models, trees)


@pytest.fixture(scope="module")
def regressors(tmp_path_factory: pytest.TempPathFactory) -> Ensemble:
    """2 MLPs with a (batch, 2) output, one with two named outputs (variance first in graph order)."""
    folder = tmp_path_factory.mktemp("regressors")
    x, y = make_regression(n_samples=300, n_features=FEATURES, noise=10.0, random_state=0)
    x, y = x.astype(np.float32), (y / y.std()).astype(np.float32)
    models: dict[str, nn.Module] = {}
    for seed, (hidden, split) in enumerate(((16, False), (32, False), (24, True))):
        torch.manual_seed(seed)
        model = Gaussian(hidden, split)
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        for _ in range(60):
            out = model(xt)
            variance, mean = out if split else (out[:, 1], out[:, 0])
            opt.zero_grad()
            nn.functional.gaussian_nll_loss(mean, yt, variance).backward()
            opt.step()
        name = f"gauss{hidden}.onnx"
        _export(model.eval(), folder / name, outputs=("variance", "mean") if split else ("mean_var",))
        models[name] = model
    return Ensemble(find_teacher_files([folder]), x, models)


def _graph(
    path: Path,
    input_type: int = TensorProto.FLOAT,
    input_shape: list[int | str] | None = None,
    weight: np.ndarray | None = None,
) -> Path:
    """A hand-built teacher: Y = Cast(X) @ W, W of shape (FEATURES, k): one float (batch, k) output."""
    shape = input_shape or ["N", FEATURES]
    w = np.ones((FEATURES, CLASSES), np.float32) if weight is None else weight
    nodes = [
        helper.make_node("Cast", ["X"], ["Xf"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["Xf", "W"], ["Y"]),
    ]
    inits = [numpy_helper.from_array(w, "W")]
    outs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", w.shape[1]])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("X", input_type, shape)], outs, inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


def _message(excinfo: pytest.ExceptionInfo[TeacherContractError]) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


# --- files -------------------------------------------------------------------------------------


def test_find_teacher_files_sorts_a_folder_and_keeps_files(tmp_path: Path) -> None:
    for name in ("b.onnx", "a.onnx", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    extra = tmp_path / "more" / "c.onnx"
    extra.parent.mkdir()
    extra.write_bytes(b"x")
    assert find_teacher_files([tmp_path, extra]) == [tmp_path / "a.onnx", tmp_path / "b.onnx", extra]


def test_find_teacher_files_errors_name_the_path(tmp_path: Path) -> None:
    empty, single, text = tmp_path / "empty", tmp_path / "one.onnx", tmp_path / "teacher.pt"
    empty.mkdir()
    (empty / "readme.txt").write_text("no models")
    single.write_bytes(b"x")
    text.write_bytes(b"x")
    cases = {
        empty: [empty],
        single: [single],
        text: [text, single],
        tmp_path / "missing.onnx": [tmp_path / "missing.onnx", single],
    }
    for named, paths in cases.items():
        with pytest.raises(TeacherContractError) as excinfo:
            find_teacher_files(paths)
        assert str(named) in _message(excinfo)
    with pytest.raises(TeacherContractError, match="at least 2 teachers"):
        find_teacher_files([single])
    with pytest.raises(TeacherContractError, match="listed twice"):
        find_teacher_files([single, tmp_path / "." / "one.onnx"])


# --- classification ----------------------------------------------------------------------------


def test_inspect_detects_logits_and_probs(classifiers: Ensemble) -> None:
    specs = inspect_teachers(classifiers.files, "classification", row_shape=(FEATURES,))
    kinds = {s.path.name: s.kind for s in specs}
    assert kinds == {
        "mlp16.onnx": "logits",
        "mlp32.onnx": "logits",
        "mlp64.onnx": "logits",
        "softmax.onnx": "probs",
        "trees.onnx": "probs",
    }
    trees = next(s for s in specs if s.path.name == "trees.onnx")
    assert trees.outputs == ("probabilities",)  # the int64 "label" output is ignored
    for spec in specs:
        assert spec.classes == CLASSES and spec.row_shape == (FEATURES,)
        assert spec.sha256 == hashlib.sha256(spec.path.read_bytes()).hexdigest()
    forced = inspect_teachers(classifiers.files, "classification", teacher_output="logits")
    assert {s.kind for s in forced} == {"logits"}


def test_log_probs_equal_the_frameworks_own_predictions(classifiers: Ensemble) -> None:
    specs = inspect_teachers(classifiers.files, "classification")
    teachers = OnnxTeachers(specs)
    x = classifiers.x[:101]
    log_probs = teachers.log_probs(x, batch=16)  # several batches, the last one short
    assert teachers.heads == 5 and teachers.task == "classification"
    assert log_probs.shape == (101, 5, CLASSES) and log_probs.dtype == np.float64
    with torch.no_grad():
        for m, spec in enumerate(specs):
            if spec.path.name == "trees.onnx":
                assert classifiers.sklearn_model is not None
                want = classifiers.sklearn_model.predict_proba(x)
                np.testing.assert_allclose(np.exp(log_probs[:, m]), want, atol=1e-5)
                continue
            out = classifiers.torch_models[spec.path.name](torch.from_numpy(x)).double()
            if spec.kind == "probs":
                np.testing.assert_allclose(np.exp(log_probs[:, m]), out.numpy(), atol=1e-5)
            else:
                np.testing.assert_allclose(log_probs[:, m], torch.log_softmax(out, -1).numpy(), atol=1e-5)


def test_stacked_classifiers_equal_the_teachers_and_serve_uncertainty(
    classifiers: Ensemble, tmp_path: Path
) -> None:
    specs = inspect_teachers(classifiers.files, "classification")
    out = tmp_path / "pkg" / "ensemble.onnx"
    stack_teachers(specs, out)
    model = onnx.load(str(out))
    opsets = {o.domain: o.version for o in model.opset_import}
    teacher_opsets = [
        next(o.version for o in onnx.load(str(f)).opset_import if o.domain == "") for f in classifiers.files
    ]
    assert min(teacher_opsets) == 17 < max(teacher_opsets)  # torch's 17, skl2onnx's newer one
    assert opsets[""] == max(teacher_opsets) and "ai.onnx.ml" in opsets
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["log_probs"]

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    dims = session.get_inputs()[0].shape
    assert isinstance(dims[0], str) and dims[1:] == [FEATURES]
    x = np.concatenate([classifiers.x[:50], 5.0 * classifiers.x[:10]])
    (got,) = session.run(["log_probs"], {"input": x})
    want = OnnxTeachers(specs).log_probs(x)
    assert got.shape == (60, 5, CLASSES)
    np.testing.assert_allclose(got, want, atol=1e-4)

    summary = classification_uncertainty(got)
    reference = classification_uncertainty(want)
    assert summary.mutual_information.shape == (60,)
    assert np.isfinite(summary.mutual_information).all() and (summary.mutual_information >= 0).all()
    assert summary.mutual_information.max() > 1e-3  # the teachers differ
    np.testing.assert_allclose(summary.mutual_information, reference.mutual_information, atol=1e-4)
    np.testing.assert_array_equal(summary.label, reference.label)


def test_stack_with_another_input_name(classifiers: Ensemble, tmp_path: Path) -> None:
    specs = inspect_teachers(classifiers.files[:2], "classification")
    stack_teachers(specs, tmp_path / "e.onnx", input_name="features")
    session = ort.InferenceSession(str(tmp_path / "e.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"features": classifiers.x[:3]})
    assert got.shape == (3, 2, CLASSES)


# --- regression --------------------------------------------------------------------------------


def test_gaussians_and_stacked_graph_agree(regressors: Ensemble, tmp_path: Path) -> None:
    specs = inspect_teachers(regressors.files, "regression", row_shape=(FEATURES,))
    assert {s.path.name: s.outputs for s in specs} == {
        "gauss16.onnx": ("mean_var",),
        "gauss32.onnx": ("mean_var",),
        "gauss24.onnx": ("mean", "variance"),  # by name, though variance comes first in the graph
    }
    teachers = OnnxTeachers(specs)
    x = regressors.x[:77]
    mean, variance = teachers.gaussians(x, batch=32)
    assert mean.shape == variance.shape == (77, 3) and (variance > 0).all()
    with torch.no_grad():
        for m, spec in enumerate(specs):
            out = regressors.torch_models[spec.path.name](torch.from_numpy(x))
            want_var, want_mean = out if isinstance(out, tuple) else (out[:, 1], out[:, 0])
            np.testing.assert_allclose(mean[:, m], want_mean.numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(variance[:, m], want_var.numpy(), rtol=1e-5, atol=1e-6)

    out_path = tmp_path / "ensemble.onnx"
    stack_teachers(specs, out_path)
    session = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["mean", "variance"]
    got_mean, got_var = session.run(["mean", "variance"], {"input": x})
    assert got_mean.shape == got_var.shape == (77, 3)
    np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_var, variance, rtol=1e-5, atol=1e-6)


# --- contract errors: each names the file --------------------------------------------------------


def _raises(files: list[Path], task: str, bad: Path, *phrases: str, **kwargs: object) -> None:
    with pytest.raises(TeacherContractError) as excinfo:
        inspect_teachers(files, task, **kwargs)  # type: ignore[arg-type]
    text = _message(excinfo)
    assert str(bad) in text, text
    for phrase in phrases:
        assert re.search(phrase, text, re.IGNORECASE), (phrase, text)


def test_a_teacher_with_other_inputs_is_named(classifiers: Ensemble, tmp_path: Path) -> None:
    five = _export(_mlp(8, CLASSES, features=5), tmp_path / "five.onnx", row_shape=(5,))
    _raises([five, *classifiers.files[:2]], "classification", five, r"\(5,\)", r"\(6,\)")
    _raises([*classifiers.files[:2], five], "classification", five, r"\(5,\)", r"\(6,\)")
    grid = _export(nn.Sequential(nn.Flatten(), _mlp(8, CLASSES)), tmp_path / "grid.onnx", row_shape=(2, 3))
    _raises(
        [grid, classifiers.files[0]],
        "classification",
        grid,
        r"\(2, 3\)",
        r"\(6,\)",
        "same number",
        row_shape=(6,),
    )


def test_wrong_class_count_is_named(classifiers: Ensemble, tmp_path: Path) -> None:
    four = _export(_mlp(8, 4), tmp_path / "four.onnx")
    _raises([*classifiers.files[:3], four], "classification", four, "has 4 classes", "have 3")


def test_task_mismatch_is_named(classifiers: Ensemble, regressors: Ensemble) -> None:
    clf = classifiers.files[0]  # an MLP with a (batch, 3) logits output
    _raises([*regressors.files, clf], "regression", clf, "classifier with 3 classes")
    trees = next(f for f in classifiers.files if f.name == "trees.onnx")  # int64 label output
    _raises([*regressors.files, trees], "regression", trees, "classifier", "label")
    named = next(f for f in regressors.files if f.name == "gauss24.onnx")  # [batch] outputs
    _raises([*classifiers.files[:2], named], "classification", named, "regression teacher")


def test_broken_file_is_named(classifiers: Ensemble, tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    data = classifiers.files[0].read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    _raises([classifiers.files[0], broken], "classification", broken, "cannot load")


def test_zipmap_output_is_named_with_the_fix(classifiers: Ensemble, tmp_path: Path) -> None:
    from skl2onnx import to_onnx

    trees = classifiers.sklearn_model
    zipmap = tmp_path / "zipmap.onnx"
    zipmap.write_bytes(to_onnx(trees, classifiers.x[:1]).SerializeToString())  # ZipMap on by default
    _raises([classifiers.files[0], zipmap], "classification", zipmap, "sequence of maps", "'zipmap': False")


def test_non_float_and_odd_inputs_are_named(classifiers: Ensemble, tmp_path: Path) -> None:
    good = classifiers.files[0]
    double = _graph(tmp_path / "double.onnx", input_type=TensorProto.DOUBLE)
    _raises([good, double], "classification", double, r"tensor\(double\)")
    symbolic = _graph(tmp_path / "symbolic.onnx", input_shape=["N", "F"])
    _raises([good, symbolic], "classification", symbolic, "only the batch axis may be symbolic")
    fixed = _export(_mlp(8, CLASSES), tmp_path / "fixed.onnx", dynamic=False)
    _raises([good, fixed], "classification", fixed, "fixed batch size 2", "dynamic")


def test_probs_override_on_logits_and_negative_variance_are_named(
    classifiers: Ensemble, regressors: Ensemble, tmp_path: Path
) -> None:
    logits = classifiers.files[0]
    _raises(
        [logits, classifiers.files[1]], "classification", logits, "not probabilities", teacher_output="probs"
    )
    signed = _graph(
        tmp_path / "signed.onnx",
        weight=np.linspace(-1, 1, FEATURES * 2, dtype=np.float32).reshape(FEATURES, 2),
    )
    _raises([*regressors.files, signed], "regression", signed, "negative", "log-variance")


def test_copies_and_changed_files_are_named(classifiers: Ensemble, tmp_path: Path) -> None:
    copy = tmp_path / "copy.onnx"
    shutil.copy(classifiers.files[0], copy)
    _raises([classifiers.files[0], copy], "classification", copy, "same model")

    first, second = tmp_path / "first.onnx", tmp_path / "second.onnx"
    shutil.copy(classifiers.files[0], first)
    shutil.copy(classifiers.files[1], second)
    specs = inspect_teachers([first, second], "classification")
    shutil.copy(classifiers.files[2], second)
    with pytest.raises(TeacherContractError) as excinfo:
        OnnxTeachers(specs)
    assert str(second) in _message(excinfo) and "changed" in _message(excinfo)


def _ml5_trees(path: Path) -> Path:
    """A one-split tree ensemble in ai.onnx.ml 5's `TreeEnsemble` op, then Softmax: (batch, 3) probs."""
    trees = helper.make_node(
        "TreeEnsemble",
        ["X"],
        ["S"],
        domain="ai.onnx.ml",
        aggregate_function=1,
        n_targets=CLASSES,
        post_transform=0,
        tree_roots=[0],
        nodes_featureids=[0],
        nodes_modes=numpy_helper.from_array(np.array([0], np.uint8)),
        nodes_splits=numpy_helper.from_array(np.array([0.0], np.float32)),
        nodes_truenodeids=[0],
        nodes_trueleafs=[1],
        nodes_falsenodeids=[1],
        nodes_falseleafs=[1],
        leaf_targetids=[0, 1],
        leaf_weights=numpy_helper.from_array(np.array([1.0, 2.0], np.float32)),
    )
    graph = helper.make_graph(
        [trees, helper.make_node("Softmax", ["S"], ["P"], axis=-1)],
        "ml5",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("P", TensorProto.FLOAT, ["N", CLASSES])],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("ai.onnx.ml", 5)]
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=10), str(path))
    return path


def test_stacking_names_a_tree_op_the_newer_ml_opset_deprecates(
    classifiers: Ensemble, tmp_path: Path
) -> None:
    # ONNX's version converter covers the default domain only: skl2onnx's TreeEnsembleClassifier
    # (ai.onnx.ml 1) is deprecated in ai.onnx.ml 5, which the other teacher needs.
    old = next(f for f in classifiers.files if f.name == "trees.onnx")
    new = _ml5_trees(tmp_path / "ml5.onnx")
    specs = inspect_teachers([old, new], "classification")
    assert [s.kind for s in specs] == ["probs", "probs"]
    with pytest.raises(StackingError) as excinfo:
        stack_teachers(specs, tmp_path / "ensemble.onnx")
    text = _message(excinfo)
    assert str(old) in text and "deprecated" in text and "ai.onnx.ml" in text
    assert not (tmp_path / "ensemble.onnx").exists()


def test_inspect_needs_two_teachers(classifiers: Ensemble) -> None:
    _raises(classifiers.files[:1], "classification", classifiers.files[0], "at least 2 teachers")
