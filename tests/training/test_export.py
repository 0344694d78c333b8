"""training/export.py: the ONNX graph keeps the heads fused and the batch axis dynamic, follows the
serving contract's names, and is refused when ONNX Runtime and PyTorch disagree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from training.config import ArchConfig
from training.export import (
    ExportParityError,
    check_parity,
    export_onnx,
    graph_summary,
    model_output_names,
    output_names,
    parity_scale,
)
from training.models import HydraNet, PackagedModel


def _net(heads: int, head_layers: int = 1, kind: str = "mlp") -> HydraNet:
    torch.manual_seed(0)
    arch = ArchConfig(kind=kind, hidden=(16, 8), head_layers=head_layers)  # type: ignore[arg-type]
    return HydraNet(arch, (6,), 3, heads, torch.zeros(6), torch.ones(6))


def test_export_is_fused_dynamic_and_parity_checked(tmp_path: Path) -> None:
    net = _net(heads=5).eval()
    model = PackagedModel([net], "classification")
    rows = np.random.default_rng(0).standard_normal((9, 6)).astype(np.float32)
    path = tmp_path / "m.onnx"
    worst = export_onnx(model, (6,), path, rows)
    assert worst["log_probs"] <= 1e-4
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMul") + ops.count("Gemm") == 3  # two body layers + ONE fused head layer
    assert graph.input[0].name == "input"
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    assert [o.name for o in graph.output] == ["log_probs"]

    # a graph that no longer matches its PyTorch model must be refused loudly
    with torch.no_grad():
        net.head[0].weight.mul_(1.5)
    with pytest.raises(ExportParityError):
        check_parity(model, path, (6,), rows)


def test_regression_package_outputs_target_units(tmp_path: Path) -> None:
    torch.manual_seed(0)
    arch = ArchConfig(kind="mlp", hidden=(8,), head_layers=1)
    net = HydraNet(arch, (2,), 2, 3, torch.zeros(2), torch.ones(2)).eval()
    model = PackagedModel([net], "regression", y_mean=10.0, y_std=2.0)
    x = torch.randn(4, 2)
    mean, variance = model(x)
    raw = net(x)
    torch.testing.assert_close(mean, raw[..., 0] * 2.0 + 10.0)
    assert (variance > 0).all()
    worst = export_onnx(model, (2,), tmp_path / "r.onnx", x.numpy())
    assert set(worst) == {"mean", "variance"}


def test_parity_is_relative_to_the_target_offset_for_a_regression_mean() -> None:
    # prices: y_mean 2,200. Where a row's mean lands near 0, the graph still adds 2,200 in float32
    # (rounding ~2.4e-4), which a tolerance on |mean| alone refused (R's Ecdat::Computers did)
    want = np.array([[0.3, -1.5], [2500.0, 1800.0]], dtype=np.float32)
    logits = np.zeros((2, 2, 1), dtype=np.float32)
    np.testing.assert_allclose(parity_scale("mean", want, logits, 2200.0), [[2200, 2200], [2500, 2200]])
    np.testing.assert_allclose(parity_scale("variance", want, logits, 2200.0), [[1, 1.5], [2500, 1800]])
    assert (parity_scale("mean", want, logits, 0.0) == np.maximum(1.0, np.abs(want))).all()
    # log-probs: relative to the row's largest |logit| per (row, head)
    lp = np.zeros((1, 2, 3), dtype=np.float32)
    big = np.array([[[1.0, 50.0, 3.0], [0.1, 0.2, 0.3]]], dtype=np.float32)
    np.testing.assert_allclose(parity_scale("log_probs", lp, big, 0.0), [[[50.0], [1.0]]])


def test_output_names_follow_the_serving_contract() -> None:
    assert output_names("classification") == ["log_probs"]
    assert output_names("regression") == ["mean", "variance"]
    assert output_names("classification", density=True, input_density=True) == [
        "log_probs",
        "density",
        "input_density",
    ]
    assert model_output_names(PackagedModel([_net(heads=2)], "classification")) == ["log_probs"]


@pytest.mark.parametrize("batch", [1, 2, 17])
def test_the_exported_graph_answers_any_batch_size_like_torch(batch: int, tmp_path: Path) -> None:
    model = PackagedModel([_net(heads=3).eval()], "classification")
    rows = np.random.default_rng(1).standard_normal((8, 6)).astype(np.float32)
    path = tmp_path / "m.onnx"
    export_onnx(model, (6,), path, rows)
    x = np.random.default_rng(batch).standard_normal((batch, 6)).astype(np.float32)
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert got.shape == (batch, 3, 3)  # (batch, heads, classes)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.exp(got).sum(axis=-1), 1.0, rtol=1e-5)  # log-probabilities


def test_graph_summary_counts_nodes_ops_and_parameters(tmp_path: Path) -> None:
    model = PackagedModel([_net(heads=2).eval()], "classification")
    path = tmp_path / "m.onnx"
    export_onnx(model, (6,), path, np.zeros((4, 6), dtype=np.float32))
    summary = graph_summary(path)
    proto = onnx.load(str(path))
    assert summary["nodes"] == len(proto.graph.node) == sum(summary["ops"].values())  # type: ignore[attr-defined]
    assert summary["bytes"] == path.stat().st_size
    # the graph stores at least every trained parameter of the network
    trained = sum(p.numel() for p in model.parameters())
    assert isinstance(summary["parameters"], int) and summary["parameters"] >= trained
