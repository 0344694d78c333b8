"""Fused heads: one batched matmul equals M separate linear heads; export keeps them fused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from training.config import ArchConfig
from training.export import ExportParityError, check_parity, export_onnx
from training.models import FusedLinear, HydraNet, PackagedModel


def _net(heads: int, head_layers: int = 1, kind: str = "mlp") -> HydraNet:
    torch.manual_seed(0)
    arch = ArchConfig(kind=kind, hidden=(16, 8), head_layers=head_layers)  # type: ignore[arg-type]
    return HydraNet(arch, (6,), 3, heads, torch.zeros(6), torch.ones(6))


def test_fused_linear_equals_a_loop_of_linear_heads() -> None:
    layer = FusedLinear(heads=4, in_features=5, out_features=3)
    x = torch.randn(7, 5)
    fused = layer(x)  # (M, batch, out)
    for m in range(4):
        expected = x @ layer.weight[m] + layer.bias[m, 0]
        torch.testing.assert_close(fused[m], expected)


@pytest.mark.parametrize("head_layers", [1, 2])
def test_expand_heads_copies_the_phase1_head(head_layers: int) -> None:
    net = _net(heads=1, head_layers=head_layers)
    x = torch.randn(5, 6)
    before = net(x)
    net.expand_heads(4)
    after = net(x)
    assert after.shape == (5, 4, 3)
    for m in range(4):
        torch.testing.assert_close(after[:, m], before[:, 0])


def test_head_layers_must_fit_the_dense_stack() -> None:
    with pytest.raises(ValueError):
        _net(heads=2, head_layers=4)


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
