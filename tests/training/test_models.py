"""Fused heads: one batched matmul equals M separate linear heads (export: tests/training/test_export.py)."""

from __future__ import annotations

import pytest
import torch

from training.config import ArchConfig
from training.models import FusedLinear, HydraNet


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
