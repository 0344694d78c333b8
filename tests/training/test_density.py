"""The feature density baked into the Hydra graph: the Mahalanobis distance it claims to be."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from training.config import ArchConfig
from training.density import (
    MAX_DISCRETE_VALUES,
    body_features,
    discrete_columns,
    fit_feature_density,
    fit_input_density,
    fit_unseen_values,
)
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


def _mixed_table(n: int = 600, seed: int = 3) -> np.ndarray:
    """Columns: continuous, binary, a code 0..4, zero-inflated continuous, a constant."""
    rng = np.random.default_rng(seed)
    return np.column_stack(
        [
            rng.standard_normal(n),
            rng.integers(0, 2, n),
            rng.integers(0, 5, n),
            np.where(rng.random(n) < 0.4, 0.0, rng.uniform(2.0, 7.0, n)),
            np.full(n, 3.0),
        ]
    ).astype(np.float32)


def test_discrete_columns_are_the_few_valued_ones_with_few_singletons() -> None:
    x = _mixed_table()
    found = discrete_columns(x)
    assert sorted(found) == [1, 2, 4]  # not the continuous nor the zero-inflated continuous column
    np.testing.assert_array_equal(found[2], np.arange(5, dtype=np.float32))
    # more distinct values than the limit: not discrete, even without singletons
    many = np.repeat(np.arange(MAX_DISCRETE_VALUES + 1, dtype=np.float32), 3)[:, None]
    assert discrete_columns(many) == {}
    assert fit_unseen_values(np.random.default_rng(0).standard_normal((200, 4)).astype(np.float32)) is None


def test_unseen_values_count_the_discrete_columns_off_their_training_values() -> None:
    x = _mixed_table()
    unseen = fit_unseen_values(x)
    assert unseen is not None
    probe = x[:6].copy()
    probe[0, 0] = 1e3  # a continuous column: never counted
    probe[1, 1] = 0.1  # a flag sent as 0.1
    probe[2, 2] = 2.5  # a code between codes
    probe[3, 4] = 3.0 * (1 + 1e-7)  # float32 rounding of the same decimal: still the training value
    probe[4, 1:3] = [7.0, -1.0]  # two columns out of range
    probe[5, 3] = 0.3  # the zero-inflated gap: not a discrete column, not counted here
    with torch.no_grad():
        got = unseen(torch.from_numpy(probe)).numpy()
    np.testing.assert_array_equal(got, [0, 1, 1, 0, 2, 0])
    with torch.no_grad():  # every training row holds training values only
        assert float(unseen(torch.from_numpy(x)).max()) == 0.0


def test_unseen_values_in_the_exported_graph_match_torch(tmp_path: Path) -> None:
    from tests.training.packages import classifier_with_scores
    from training.export import export_onnx, model_output_names

    x = _mixed_table()
    net = _net(features=5)
    y = np.random.default_rng(0).integers(0, 3, len(x))
    model = classifier_with_scores(net, x, y)
    assert model_output_names(model)[-1] == "unseen_values"
    probe = np.concatenate([x[:32], x[:32] * 0.1, x[:32] * 4.0]).astype(np.float32)
    worst = export_onnx(model, (5,), tmp_path / "model.onnx", probe)
    assert worst["unseen_values"] == 0.0  # a count: exact in both
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    counts = session.run(["unseen_values"], {"input": probe})[0]
    assert counts.shape == (96,) and (counts[:32] == 0).all() and (counts[32:64] >= 1).all()
