"""The feature density baked into the Hydra graph: the Mahalanobis distance it claims to be."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from training.config import ArchConfig
from training.density import body_features, fit_feature_density, fit_input_density
from training.models import HydraNet


def _net(features: int = 6, seed: int = 0) -> HydraNet:
    torch.manual_seed(seed)
    arch = ArchConfig(kind="mlp", hidden=(16, 16), head_layers=1)
    return HydraNet(
        arch, (features,), out_dim=3, heads=4, mean=torch.zeros(features), std=torch.ones(features)
    ).eval()


def test_density_is_the_squared_mahalanobis_distance_to_the_nearest_class() -> None:
    rng = np.random.default_rng(0)
    net = _net()
    x = rng.standard_normal((300, 6)).astype(np.float32)
    y = rng.integers(0, 3, 300)
    density = fit_feature_density(net, x, y)
    f = body_features(net, x)
    means = np.stack([f[y == c].mean(axis=0) for c in range(3)])
    precision = np.linalg.inv(LedoitWolf(assume_centered=True).fit(f - means[y]).covariance_)
    probe = rng.standard_normal((50, 6)).astype(np.float32) * 3.0
    fp = body_features(net, probe)
    want = np.min([np.einsum("nd,de,ne->n", fp - m, precision, fp - m) for m in means], axis=0)
    with torch.no_grad():
        got = density(torch.from_numpy(fp).float()).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_regression_density_is_one_gaussian_and_grows_with_scale() -> None:
    rng = np.random.default_rng(1)
    net = _net()
    x = rng.standard_normal((400, 6)).astype(np.float32)
    density = fit_feature_density(net, x, None)
    assert density.white_means.shape[0] == 1 and not density.low_rank
    with torch.no_grad():
        scores = [float(density(net.body(torch.from_numpy(x * k))).median()) for k in (1.0, 4.0, 10.0)]
    assert scores[0] < scores[1] < scores[2]


def test_input_density_is_the_mahalanobis_distance_of_the_standardised_row() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 5)) * [1.0, 10.0, 0.1, 3.0, 1.0] + [0.0, 100.0, -5.0, 2.0, 0.0]
    x[:, 4] = 7.0  # a constant feature keeps unit scale instead of dividing by zero
    density = fit_input_density(x.astype(np.float32))
    mean, std = x.mean(axis=0), np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
    z = (x - mean) / std
    precision = np.linalg.inv(LedoitWolf(assume_centered=True).fit(z).covariance_)
    probe = x[:40] * 0.1
    zp = (probe - mean) / std
    want = np.einsum("nd,de,ne->n", zp, precision, zp)
    with torch.no_grad():
        got = density(torch.from_numpy(probe.astype(np.float32))).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3)


def test_wide_features_use_the_top_directions_and_one_residual_term() -> None:
    """Above MAX_EXACT_WIDTH the distance keeps Σ's top eigen-directions exactly and the rest as one
    isotropic term (the mean of the other eigenvalues): the formula, checked in numpy."""
    from training.density import Mahalanobis

    rng = np.random.default_rng(4)
    d, k = 12, 3
    f = rng.standard_normal((400, d)) @ rng.standard_normal((d, d))
    means = rng.standard_normal((k, d))
    cov = np.cov(f.T) + 0.1 * np.eye(d)
    exact = Mahalanobis(means, cov)
    low = Mahalanobis(means, cov, max_exact=4, rank=4)
    assert low.low_rank and not exact.low_rank
    probe = rng.standard_normal((30, d)) * 3.0
    lam, vec = np.linalg.eigh(cov)
    r = 4  # 4 principal directions, 8 in the residual
    top, rest_mean = vec[:, d - r :], lam[: d - r].mean()
    want = []
    for m in means:
        diff = probe - m
        proj = diff @ top
        residual = (diff**2).sum(axis=1) - (proj**2).sum(axis=1)
        want.append((proj**2 / lam[d - r :]).sum(axis=1) + residual / rest_mean)
    with torch.no_grad():
        got = low(torch.from_numpy(probe).float()).double().numpy()
        full = exact(torch.from_numpy(probe).float()).double().numpy()
    np.testing.assert_allclose(got, np.min(want, axis=0), rtol=1e-3)
    precision = np.linalg.inv(cov)
    want_exact = np.min([np.einsum("nd,de,ne->n", probe - m, precision, probe - m) for m in means], axis=0)
    np.testing.assert_allclose(full, want_exact, rtol=1e-3)
