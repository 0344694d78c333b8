"""Networks: a shared body and M fused heads.

One class covers teachers (M = 1) and the Hydra student (M heads): the body is the feature
extractor (optional conv stack, then the first dense layers); the head is the last
`head_layers` dense layers, held as stacked parameters of shape (M, in, out) so every head layer
is ONE batched matmul over all heads (exports as a single MatMul node), not a loop of M modules.

`forward` returns raw outputs in the training space: classification logits (batch, M, K);
regression (batch, M, 2) = (mean, unconstrained variance) in standardised target units.
`PackagedModel` adds what the ONNX contract needs (log-softmax, or target un-scaling).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from training.config import ArchConfig

MIN_VARIANCE = 1e-6


class Standardize(nn.Module):
    """(x - mean) / std with buffers fitted on the training split (baked into the graph)."""

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("inv_std", 1.0 / std.float())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) * self.inv_std


class FusedLinear(nn.Module):
    """M independent linear layers as one batched matmul.

    Input (batch, in) — shared body features, broadcast to every head — or (M, batch, in);
    output (M, batch, out).
    """

    def __init__(self, heads: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(heads, 1, out_features))
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default init, per head
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    @property
    def heads(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        return torch.matmul(x, self.weight) + self.bias


def _conv_stack(kind: str, channels: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    conv = nn.Conv2d if kind == "cnn2d" else nn.Conv1d
    pool = nn.MaxPool2d if kind == "cnn2d" else nn.MaxPool1d
    in_ch = 1
    for i, out_ch in enumerate(channels):
        layers += [conv(in_ch, out_ch, kernel_size=3, padding=1), nn.ReLU()]
        if i % 2 == 1 or i == len(channels) - 1:
            layers.append(pool(2))
        in_ch = out_ch
    return nn.Sequential(*layers)


class HydraNet(nn.Module):
    def __init__(
        self,
        arch: ArchConfig,
        row_shape: tuple[int, ...],
        out_dim: int,
        heads: int,
        mean: Tensor,
        std: Tensor,
        image_hw: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.row_shape = row_shape
        self.out_dim = out_dim
        self.image_hw = image_hw
        self.standardize = Standardize(mean, std)
        self.features = _conv_stack(arch.kind, arch.conv_channels) if arch.kind != "mlp" else nn.Sequential()
        feature_dim = self._feature_dim()
        widths = [feature_dim, *arch.hidden, out_dim]
        n_linear = len(widths) - 1
        if not 1 <= arch.head_layers <= n_linear:
            raise ValueError(f"head_layers must be in 1..{n_linear}, got {arch.head_layers}")
        split = n_linear - arch.head_layers
        dense: list[nn.Module] = []
        for i in range(split):
            dense += [nn.Linear(widths[i], widths[i + 1]), nn.ReLU()]
            if arch.dropout > 0:
                dense.append(nn.Dropout(arch.dropout))
        self.dense = nn.Sequential(*dense)
        self.head = nn.ModuleList(
            FusedLinear(heads, widths[i], widths[i + 1]) for i in range(split, n_linear)
        )

    @property
    def heads(self) -> int:
        first = self.head[0]
        assert isinstance(first, FusedLinear)
        return first.heads

    def _shape_input(self, x: Tensor) -> Tensor:
        if self.arch.kind == "cnn2d":
            assert self.image_hw is not None, "cnn2d needs image_hw"
            return x.reshape(-1, 1, self.image_hw[0], self.image_hw[1])
        if self.arch.kind == "cnn1d":
            return x.unsqueeze(1)  # (batch, 1, length)
        return x if x.dim() == 2 else x.flatten(1)

    def _feature_dim(self) -> int:
        with torch.no_grad():
            probe = torch.zeros(2, *self.row_shape)
            return int(self.features(self._shape_input(probe)).reshape(2, -1).shape[1])

    def body(self, x: Tensor) -> Tensor:
        """Shared features (batch, width) of raw input rows (batch, *row_shape)."""
        z = self._shape_input(self.standardize(x))
        z = self.features(z).flatten(1)
        out: Tensor = self.dense(z)
        return out

    def head_forward(self, z: Tensor) -> Tensor:
        """Per-head outputs (batch, M, out) from body features (batch, width)."""
        h = z
        for i, layer in enumerate(self.head):
            h = layer(h)
            if i < len(self.head) - 1:
                h = torch.relu(h)
        return h.transpose(0, 1)  # (M, batch, out) -> (batch, M, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head_forward(self.body(x))

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.head for p in layer.parameters()]

    def body_parameters(self) -> list[nn.Parameter]:
        head_ids = {id(p) for p in self.head_parameters()}
        return [p for p in self.parameters() if id(p) not in head_ids]

    @torch.no_grad()
    def expand_heads(self, heads: int) -> None:
        """Replace a 1-head head by `heads` copies of it (Hydra phase 2 initialisation)."""
        for layer in self.head:
            assert isinstance(layer, FusedLinear)
            if layer.heads != 1:
                raise ValueError("expand_heads expects a single-head model")
            layer.weight = nn.Parameter(layer.weight.detach().repeat(heads, 1, 1))
            layer.bias = nn.Parameter(layer.bias.detach().repeat(heads, 1, 1))


def regression_outputs(raw: Tensor) -> tuple[Tensor, Tensor]:
    """(batch, M, 2) raw head outputs -> means and positive variances (batch, M), standardised units."""
    mean = raw[..., 0]
    variance = nn.functional.softplus(raw[..., 1]) + MIN_VARIANCE
    return mean, variance


class PackagedModel(nn.Module):
    """What gets exported: raw input rows -> the ONNX contract outputs.

    Classification: log_probs (batch, M, K). Regression: mean, variance (batch, M) in target units.
    `members` are concatenated along the head axis (the ensemble: M single-head teachers).
    `density` (one member only: the Hydra student): a module of the shared-body features, e.g.
    `training.density.FeatureDensity`, exported as one more output `density` (batch,);
    `input_density` (with it): a module of the raw rows, exported as `input_density` (batch,);
    `unseen_values` (with them): a module of the raw rows, exported last as `unseen_values` (batch,).
    """

    def __init__(
        self,
        members: list[HydraNet],
        task: str,
        y_mean: float = 0.0,
        y_std: float = 1.0,
        density: nn.Module | None = None,
        input_density: nn.Module | None = None,
        unseen_values: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if density is not None and len(members) != 1:
            raise ValueError("a feature density reads one shared body: it needs exactly one member")
        if input_density is not None and density is None:
            raise ValueError("an input density comes with a feature density (the graph's output contract)")
        if unseen_values is not None and input_density is None:
            raise ValueError("an unseen-value count comes with the densities (the graph's output contract)")
        self.members = nn.ModuleList(members)
        self.task = task
        self.y_mean = float(y_mean)
        self.y_std = float(y_std)
        self.density = density
        self.input_density = input_density
        self.unseen_values = unseen_values

    @property
    def has_density(self) -> bool:
        return self.density is not None

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        density: Tensor | None = None
        if self.density is not None:
            member = self.members[0]
            assert isinstance(member, HydraNet)
            features = member.body(x)
            raw, density = member.head_forward(features), self.density(features)
        elif len(self.members) > 1:
            raw = torch.cat([m(x) for m in self.members], dim=1)
        else:
            raw = self.members[0](x)
        extra = () if density is None else (density,)
        if self.input_density is not None:
            extra = (*extra, self.input_density(x))
        if self.unseen_values is not None:
            extra = (*extra, self.unseen_values(x))
        if self.task == "classification":
            log_probs = torch.log_softmax(raw, dim=-1)
            return (log_probs, *extra) if extra else log_probs
        mean, variance = regression_outputs(raw)
        return (mean * self.y_std + self.y_mean, variance * (self.y_std**2), *extra)


def input_scaling(x_train: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """Standardisation fitted on training rows (n, *row_shape).

    Images and sequences share one scalar mean/std (keeps the signal's shape; per-pixel std is 0 at
    the digits' empty corners); tabular data is standardised per feature.
    """
    if kind in ("image", "sequence"):
        return x_train.mean().reshape(1), x_train.std().clamp_min(1e-6).reshape(1)
    std = x_train.std(dim=0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return x_train.mean(dim=0), std
