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
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from torch import Tensor, nn

from training.models import HydraNet

FEATURE_BATCH = 4096


class FeatureDensity(nn.Module):
    """min over classes of ‖(f − μ_c) W‖²: squared Mahalanobis distance to the nearest class mean."""

    def __init__(self, means: Tensor, whitening: Tensor) -> None:
        super().__init__()
        # (K, d) means pre-whitened, so the graph is one MatMul, a broadcast Sub and a reduction
        self.register_buffer("whitening", whitening.float())
        self.register_buffer("white_means", (means.double() @ whitening.double()).float())

    def forward(self, features: Tensor) -> Tensor:
        white = features @ self.whitening  # (batch, d)
        diff = white.unsqueeze(1) - self.white_means.unsqueeze(0)  # (batch, K, d)
        return (diff * diff).sum(dim=-1).min(dim=1).values  # (batch,)


class InputDensity(nn.Module):
    """‖(x − μ) W‖² on the flattened raw row: W folds the per-feature standardisation and Σ^{-1/2}."""

    def __init__(self, mean: Tensor, whitening: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("whitening", whitening.float())

    def forward(self, x: Tensor) -> Tensor:
        z = (x.flatten(1) - self.mean) @ self.whitening
        return (z * z).sum(dim=-1)


def _whitening(covariance: np.ndarray) -> np.ndarray:
    """W with W Wᵀ = Σ⁻¹ (Σ = V Λ Vᵀ ⇒ W = V Λ^{-1/2}); Ledoit–Wolf keeps every eigenvalue > 0."""
    eigenvalues, vectors = np.linalg.eigh(covariance)
    eigenvalues = np.maximum(eigenvalues, eigenvalues.max() * 1e-12)
    out: np.ndarray = vectors / np.sqrt(eigenvalues)
    return out


def fit_input_density(x_train: np.ndarray) -> InputDensity:
    """Standardise each raw feature on the training rows, then a Ledoit–Wolf Gaussian over them."""
    flat = x_train.reshape(len(x_train), -1).astype(np.float64)
    mean, std = flat.mean(axis=0), flat.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)  # a constant feature (an empty pixel) keeps unit scale
    covariance = LedoitWolf(assume_centered=True).fit((flat - mean) / std).covariance_
    whitening = _whitening(covariance) / std[:, None]  # (x − μ) diag(1/σ) W
    return InputDensity(torch.from_numpy(mean), torch.from_numpy(whitening)).eval()


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
    whitening = _whitening(covariance)
    return FeatureDensity(torch.from_numpy(means), torch.from_numpy(whitening)).eval()
