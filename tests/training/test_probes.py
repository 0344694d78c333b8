"""Probe families: deterministic, shaped like the data, each with its defining property."""

from __future__ import annotations

import numpy as np

from training.config import DataConfig
from training.data import load_data
from training.probes import FAMILIES, probe_notes, probe_sets


def _rows_of(candidates: np.ndarray, train: np.ndarray, factor: float) -> bool:
    scaled = train * factor
    return all(np.isclose(scaled, row, rtol=1e-5, atol=1e-6).all(axis=1).any() for row in candidates)


def test_probe_sets_are_deterministic_and_shaped_like_the_rows() -> None:
    data = load_data(DataConfig(dataset="digits", max_train_rows=200))
    probes = probe_sets(data.train.x, rows=64, seed=0)
    assert list(probes) == list(FAMILIES) and set(probe_notes()) == set(FAMILIES)
    for name, x in probes.items():
        assert x.shape == (64, 64) and x.dtype == np.float32 and np.isfinite(x).all(), name
        np.testing.assert_array_equal(x, probe_sets(data.train.x, rows=64, seed=0)[name])
        assert not np.array_equal(x, probe_sets(data.train.x, rows=64, seed=1)[name])
    # each family has its own stream: asking for one family gives the same rows
    alone = probe_sets(data.train.x, rows=64, seed=0, families=("shell",))
    np.testing.assert_array_equal(alone["shell"], probes["shell"])


def test_each_family_has_its_defining_property() -> None:
    data = load_data(DataConfig(dataset="diabetes"))
    train = data.train.x.astype(np.float64)
    lo, hi = train.min(axis=0), train.max(axis=0)
    width = hi - lo
    p = {k: v.astype(np.float64) for k, v in probe_sets(data.train.x, rows=300, seed=5).items()}
    # unit errors: a training row times k
    for name, k in (("scaled_x0.1", 0.1), ("scaled_x4", 4.0), ("scaled_x10", 10.0)):
        assert _rows_of(p[name][:20], train, k), name
    # one column in the wrong unit: a training row with exactly one (non-zero) feature times k
    for name, k in (("one_feature_x0.1", 0.1), ("one_feature_x4", 4.0), ("one_feature_x10", 10.0)):
        for row in p[name][:20]:
            same = np.isclose(train, row, rtol=1e-5, atol=1e-7)
            source = train[same.sum(axis=1).argmax()]
            changed = ~np.isclose(source, row, rtol=1e-5, atol=1e-7)
            assert changed.sum() == 1, name
            np.testing.assert_allclose(row[changed], source[changed] * k, rtol=1e-5)
    # box: inside the range widened by one range on each side, and often outside the training range
    assert np.all(p["box"] >= lo - width - 1e-9) and np.all(p["box"] <= hi + width + 1e-9)
    assert ((p["box"] < lo) | (p["box"] > hi)).any(axis=1).mean() > 0.9
    # feature outliers: 1-3 features at least one range outside, the rest a training row's
    outside = (p["feature_outlier"] < lo - width * 0.999) | (p["feature_outlier"] > hi + width * 0.999)
    assert outside.sum(axis=1).min() >= 1 and outside.sum(axis=1).max() <= 3
    # independent: each feature keeps its mean and std, the correlations go
    ind = p["independent"]
    np.testing.assert_allclose(ind.mean(axis=0), train.mean(axis=0), atol=0.2 * train.std(axis=0).max())
    corr_train = np.corrcoef(train, rowvar=False)[np.triu_indices(train.shape[1], 1)]
    corr_ind = np.corrcoef(ind, rowvar=False)[np.triu_indices(train.shape[1], 1)]
    assert np.abs(corr_train).max() > 0.8 and np.abs(corr_ind).max() < 0.25
    # off-manifold: the move lies in the span of the least-varying principal directions
    mean, std = train.mean(axis=0), train.std(axis=0)
    _, _, vt = np.linalg.svd((train - mean) / std, full_matrices=False)
    z = (p["off_manifold"] - mean) / std
    head = np.abs((z - (train - mean).mean(axis=0) / std) @ vt[:3].T).mean()
    tail = np.abs(z @ vt[-3:].T).mean()
    assert tail > 2.0 and tail > head
    # shell: far from the mean, at 3-30x the data's radius
    radius = np.sqrt((((train - mean) / std) ** 2).sum(axis=1).mean())
    r = np.sqrt((((p["shell"] - mean) / std) ** 2).sum(axis=1))
    assert r.min() >= 3 * radius * 0.999 and r.max() <= 30 * radius * 1.001
