"""Feature density on Hydra's shared body: the OOD score that sees what the ensemble cannot.

Far from the data ReLU networks extrapolate linearly: every head grows confident and they agree, so
mutual information *falls* on rows in the wrong unit (all features x4). A density on the body's
features does not: such rows land far from every class in feature space.

The score is the class-conditional Mahalanobis distance with one shared covariance (Lee et al.,
NeurIPS 2018), fitted on the training rows' body features:

    density(x) = min_c (f(x) − μ_c)ᵀ Σ⁻¹ (f(x) − μ_c)     (higher = less like the training data)

Σ is the Ledoit–Wolf shrunk covariance of the class-centred features (regression: one Gaussian
around the overall mean): a body of 128–256 units fitted on a few hundred rows has a singular
sample covariance, and shrinkage keeps Σ⁻¹ finite without a hand-tuned ridge. It is baked into
the exported graph as `W` with W Wᵀ = Σ⁻¹, so the service computes ‖(f − μ_c) W‖² in ONNX Runtime
and stays torch-free. Chosen by measurement over k-NN on normalised features and an unconditional
Gaussian (docs/TRAINING.md, "Feature density").

`InputDensity` is the second, simpler score: the Mahalanobis distance of the standardised raw row to
the training mean (Ledoit–Wolf again). A body density is blind to rows scaled ×0.1 on a table whose
features are centred: they land *near* the class means. In input space such a row is atypical —
far too close to the mean for d features (‖z‖² ≈ χ²_d concentrates away from 0) — so it is scored
two-sided (service/uncertainty.py, `LogScaleNormaliser`, tails "both").

`UnseenValues` is the third: on a table's discrete columns (codes, counts, binary flags) a row in
the wrong unit holds values no training row has (×0.1 turns a 1 into 0.1) while both Mahalanobis
distances stay ordinary — the rows of a table of mostly zeros and codes move little in σ units. It
counts those columns per row; the combined statistic ranks that count ahead of everything else
(service/uncertainty.py, `CombinedOODScore`, `priority`).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from torch import Tensor, nn

from training.models import HydraNet

FEATURE_BATCH = 4096


# Wider than this, Σ⁻¹ is kept on its top-RANK eigen-directions plus one isotropic term for the
# rest (below): a d x d whitening for a 2048-wide body cost as much as a third of the body itself
# (measured: Hydra's FLOPs per row +30 % on the wide bench model), this costs d x 256.
MAX_EXACT_WIDTH = 256
RANK = 256


class Mahalanobis(nn.Module):
    """min over the rows μ_c of `means` of (f − μ_c)ᵀ Σ⁻¹ (f − μ_c), for features f (batch, d).

    Exact (d ≤ MAX_EXACT_WIDTH): ‖(f − μ_c) W‖² with W Wᵀ = Σ⁻¹ — one MatMul, a broadcast Sub and a
    reduction. Low-rank (wider): Σ = V Λ Vᵀ on its top-r eigenvectors V and the mean λ̄ of the
    remaining eigenvalues elsewhere, i.e. ‖Λ^{-1/2} Vᵀ(f − μ_c)‖² + ‖(I − V Vᵀ)(f − μ_c)‖² / λ̄:
    the principal directions exactly, the residual (where off-manifold rows go) as one distance.
    """

    def __init__(
        self, means: np.ndarray, covariance: np.ndarray, max_exact: int = MAX_EXACT_WIDTH, rank: int = RANK
    ) -> None:
        super().__init__()
        eigenvalues, vectors = np.linalg.eigh(covariance)  # ascending; Ledoit–Wolf keeps them > 0
        eigenvalues = np.maximum(eigenvalues, eigenvalues.max() * 1e-12)
        d = len(eigenvalues)
        self.low_rank = d > max_exact
        if not self.low_rank:
            whitening = vectors / np.sqrt(eigenvalues)
            self.register_buffer("whitening", torch.from_numpy(whitening).float())
            self.register_buffer("white_means", torch.from_numpy(means @ whitening).float())
            return
        rank = min(rank, d - 1)
        top, rest = slice(d - rank, d), slice(0, d - rank)
        basis = vectors[:, top]  # (d, r), orthonormal columns
        # float64: the residual ‖(I − V Vᵀ)(f − μ)‖² is a difference of close squared norms, which
        # float32 rounds differently in torch and ONNX Runtime (measured 5e-3 relative on a 2048 body)
        self.register_buffer("basis", torch.from_numpy(basis).double())
        self.register_buffer("inv_sqrt", torch.from_numpy(1.0 / np.sqrt(eigenvalues[top])).double())
        self.register_buffer("means", torch.from_numpy(means).double())
        self.register_buffer("projected_means", torch.from_numpy(means @ basis).double())
        self.register_buffer("mean_sq", torch.from_numpy((means**2).sum(axis=1)).double())
        self.residual_precision = float(1.0 / eigenvalues[rest].mean())

    def forward(self, f: Tensor) -> Tensor:
        if not self.low_rank:
            diff = (f @ self.whitening).unsqueeze(1) - self.white_means.unsqueeze(0)  # (batch, K, d)
            return (diff * diff).sum(dim=-1).min(dim=1).values
        f = f.double()
        p = f @ self.basis  # (batch, r)
        diff = p.unsqueeze(1) - self.projected_means.unsqueeze(0)  # (batch, K, r)
        principal = ((diff * self.inv_sqrt) ** 2).sum(dim=-1)
        projected = (diff * diff).sum(dim=-1)
        full = (f * f).sum(dim=-1, keepdim=True) - 2.0 * (f @ self.means.T) + self.mean_sq  # ‖f − μ_c‖²
        residual = torch.clamp(full - projected, min=0.0)
        return (principal + residual * self.residual_precision).min(dim=1).values.float()


class FeatureDensity(Mahalanobis):
    """Squared Mahalanobis distance of body features to the nearest class mean (one shared Σ)."""


class InputDensity(nn.Module):
    """Squared Mahalanobis distance of the per-feature standardised, flattened raw row to the mean."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, covariance: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(mean).float())
        self.register_buffer("inv_std", torch.from_numpy(1.0 / std).float())
        self.distance = Mahalanobis(np.zeros((1, len(mean))), covariance)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.distance((x.flatten(1) - self.mean) * self.inv_std)
        return out


def fit_input_density(x_train: np.ndarray) -> InputDensity:
    """Standardise each raw feature on the training rows, then a Ledoit–Wolf Gaussian over them."""
    flat = x_train.reshape(len(x_train), -1).astype(np.float64)
    mean, std = flat.mean(axis=0), flat.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)  # a constant feature (an empty pixel) keeps unit scale
    covariance = LedoitWolf(assume_centered=True).fit((flat - mean) / std).covariance_
    return InputDensity(mean, std, covariance).eval()


# A column counts as discrete when its training rows hold at most this many distinct values and
# the values seen once cover at most this share of the rows: by Good–Turing that share estimates how
# often a new in-distribution row brings a value unseen in training, i.e. the count's own false
# alarms. Chosen on the seen tables (docs/TRAINING.md, "Unseen values"): 32 values / 0.1 % left
# digits_table's integer pixels with singletons outside (one pixel x0.1: 0.93 against 0.96).
MAX_DISCRETE_VALUES = 64
MAX_SINGLETON_SHARE = 0.01
# A value matches a training value within this relative tolerance (float32 rounding of the client's
# decimal), at least this absolute one.
MATCH_TOLERANCE = 1e-5
# The most held-out ID rows (validation split) that may hold an unseen value: a fifth of α = 0.05.
UNSEEN_BUDGET = 0.01


class UnseenValues(nn.Module):
    """Per row, how many of the discrete columns hold a value that no training row has.

    `columns` (L,) index the flattened row; `table` (L, K) holds each column's training values,
    padded by repeating its first value. In the graph: a Gather, a broadcast Sub, Abs, ReduceMin and
    a comparison — O(L·K) per row."""

    def __init__(self, columns: np.ndarray, table: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("columns", torch.from_numpy(np.asarray(columns, dtype=np.int64)))
        self.register_buffer("table", torch.from_numpy(np.asarray(table, dtype=np.float32)))

    def forward(self, x: Tensor) -> Tensor:
        values = x.flatten(1)[:, self.columns]  # (batch, L)
        gap = (values.unsqueeze(-1) - self.table).abs().amin(dim=-1)  # to the nearest training value
        tolerance = MATCH_TOLERANCE * torch.clamp(values.abs(), min=1.0)
        return (gap > tolerance).to(torch.float32).sum(dim=-1)


def discrete_columns(x_train: np.ndarray) -> dict[int, np.ndarray]:
    """The flattened row's discrete columns (`MAX_DISCRETE_VALUES`, `MAX_SINGLETON_SHARE`) and their
    training values, as float32 (what the graph compares)."""
    flat = x_train.reshape(len(x_train), -1).astype(np.float32)
    found = {}
    for j in range(flat.shape[1]):
        values, counts = np.unique(flat[:, j], return_counts=True)
        if len(values) <= MAX_DISCRETE_VALUES and (counts == 1).sum() <= MAX_SINGLETON_SHARE * len(flat):
            found[j] = values
    return found


def fit_unseen_values(
    x_train: np.ndarray, x_val: np.ndarray | None = None, budget: float = UNSEEN_BUDGET
) -> UnseenValues | None:
    """The unseen-value count over the training rows' discrete columns; None when there are none
    (continuous tables, signals): then the graph has no such output and the statistic is unchanged.

    With `x_val` (held-out ID rows), columns join in order of their Good–Turing share only while at
    most `budget` of those rows hold an unseen value: the count ranks ahead of every other score,
    so its own false alarms must stay well inside α (a corner pixel of a digit is nonzero in a few
    real digits; with every column 6 % of the smoke run's rows were). The calibration split stays
    untouched, so the conformal guarantee is unchanged."""
    found = discrete_columns(x_train)
    if x_val is not None and found:
        train, val = (x.reshape(len(x), -1).astype(np.float32) for x in (x_train, x_val))
        order = sorted(found, key=lambda j: ((np.unique(train[:, j], return_counts=True)[1] == 1).sum(), j))
        kept, hit = [], np.zeros(len(val), dtype=bool)
        for j in order:
            unseen = _off_values(val[:, j], found[j])
            if (hit | unseen).mean() <= budget:
                kept.append(j)
                hit |= unseen
        found = {j: found[j] for j in sorted(kept)}
    if not found:
        return None
    width = max(len(v) for v in found.values())
    table = np.stack([np.pad(v, (0, width - len(v)), mode="edge") for v in found.values()])
    return UnseenValues(np.fromiter(found, dtype=np.int64), table).eval()


def _off_values(column: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Which entries of `column` match none of `values` (the graph's rule, in numpy)."""
    gap = np.abs(column[:, None] - values[None, :]).min(axis=1)
    return gap > MATCH_TOLERANCE * np.maximum(np.abs(column), 1.0)


@torch.no_grad()
def body_features(net: HydraNet, x: np.ndarray) -> np.ndarray:
    """Shared-body features (n, width) of raw rows, in float64, evaluated in eval mode."""
    net.eval()
    parts = [
        net.body(torch.from_numpy(np.ascontiguousarray(x[i : i + FEATURE_BATCH], dtype=np.float32)))
        for i in range(0, len(x), FEATURE_BATCH)
    ]
    return torch.cat(parts).double().numpy()


def fit_feature_density(net: HydraNet, x_train: np.ndarray, y_train: np.ndarray | None) -> FeatureDensity:
    """Fit the density on training rows; `y_train` class ids (None for regression: one Gaussian)."""
    features = body_features(net, x_train)
    if y_train is None:
        groups = np.zeros(len(features), dtype=np.int64)
    else:
        groups = np.unique(np.asarray(y_train), return_inverse=True)[1].ravel()
    means = np.stack([features[groups == g].mean(axis=0) for g in range(int(groups.max()) + 1)])
    centred = features - means[groups]
    covariance = LedoitWolf(assume_centered=True).fit(centred).covariance_
    return FeatureDensity(means, covariance).eval()
