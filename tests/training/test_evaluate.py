"""training/evaluate.py's metric pieces against numbers worked out by hand (the whole `evaluate` on
exported graphs: tests/training/test_pipeline.py)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from service.uncertainty import ClassificationUncertainty, classification_uncertainty, regression_uncertainty
from training.evaluate import (
    ReliabilityBins,
    classification_metrics,
    default_score,
    label_agreement,
    ood_metrics,
    regression_metrics,
    retention,
    retention_interval,
)


def test_ece_by_hand() -> None:
    # two bins hold rows: confidence 0.95 with half right, 0.55 with all right
    conf = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([True, False, True, True])
    bins = ReliabilityBins.of(conf, correct)
    np.testing.assert_allclose(bins.confidence, [0.55, 0.95])
    np.testing.assert_allclose(bins.accuracy, [1.0, 0.5])
    assert bins.count.tolist() == [2, 2]
    assert bins.ece == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)


def test_perfectly_calibrated_bins_have_zero_ece_and_edges_fall_low() -> None:
    # 1.0 lands in the top bin, 0.0 in the bottom one; each bin right exactly as often as confident
    conf = np.array([1.0, 1.0, 0.0])
    correct = np.array([True, True, False])
    bins = ReliabilityBins.of(conf, correct, bins=10)
    assert bins.count.tolist() == [1, 2] and bins.ece == 0.0


def _uncertainty(probs: list[list[float]]) -> ClassificationUncertainty:
    """One head per row: a summary whose mean probabilities are `probs` (batch, classes)."""
    return classification_uncertainty(np.log(np.asarray(probs))[:, None, :])


def test_classification_metrics_by_hand() -> None:
    u = _uncertainty([[0.8, 0.2], [0.4, 0.6], [0.5, 0.5]])
    y = np.array([0, 0, 1])
    metrics = classification_metrics(u, y)
    # labels 0, 1, 0 (a tie goes to the first class): one of three right
    assert metrics["accuracy"] == pytest.approx(1 / 3)
    assert metrics["nll"] == pytest.approx(-(np.log(0.8) + np.log(0.4) + np.log(0.5)) / 3)
    brier = ((0.2**2 + 0.2**2) + (0.6**2 + 0.6**2) + (0.5**2 + 0.5**2)) / 3
    assert metrics["brier"] == pytest.approx(brier)  # summed over classes, not divided by K
    # three bins of one row each: |1 − 0.8|, |0 − 0.6|, |0 − 0.5|
    assert metrics["ece"] == pytest.approx((0.2 + 0.6 + 0.5) / 3)


def test_regression_metrics_by_hand() -> None:
    mean = np.array([[1.0], [3.0]])  # one head: no epistemic variance
    variance = np.array([[4.0], [1.0]])
    y = np.array([2.0, 3.0])
    metrics = regression_metrics(regression_uncertainty(mean, variance), y)
    assert metrics["rmse"] == pytest.approx(np.sqrt((1.0 + 0.0) / 2))
    nll = 0.5 * (np.log(2 * np.pi * 4.0) + 1.0 / 4.0) + 0.5 * np.log(2 * np.pi * 1.0)
    assert metrics["nll"] == pytest.approx(nll / 2)
    assert metrics["coverage_95"] == 1.0  # both targets inside μ ± 1.96 σ
    assert metrics["mean_interval_width"] == pytest.approx(2 * 1.959964 * (2.0 + 1.0) / 2, rel=1e-5)


def test_ood_metrics_with_ood_as_the_positive_class() -> None:
    separated = ood_metrics(np.array([0.1, 0.2, 0.3]), np.array([0.7, 0.8]))
    assert separated == {"auroc": 1.0, "aupr_out": 1.0, "fpr_at_95tpr": 0.0}
    inverted = ood_metrics(np.array([0.7, 0.8]), np.array([0.1, 0.2]))
    assert inverted["auroc"] == 0.0 and inverted["fpr_at_95tpr"] == 1.0
    # one of four (ID, OOD) pairs ranked wrong
    assert ood_metrics(np.array([0.1, 0.5]), np.array([0.4, 0.9]))["auroc"] == pytest.approx(0.75)


def test_retention_and_the_default_score() -> None:
    assert retention(0.8, 0.9) == pytest.approx(0.75)
    assert retention(0.7, 0.5) == 0.0  # the ensemble at chance: nothing to retain
    assert default_score("classification", heads=8, configured=None) == "mutual_information"
    assert default_score("regression", heads=8, configured=None) == "epistemic_variance"
    assert default_score("classification", heads=8, configured="epkl") == "epkl"
    # one head (the KD baseline) has no knowledge uncertainty: total uncertainty instead
    assert default_score("classification", heads=1, configured="epkl") == "total_entropy"
    assert default_score("regression", heads=1, configured=None) == "total_variance"


def test_retention_interval_is_the_bootstrap_of_roc_auc_ratios() -> None:
    """The interval against the bootstrap written out with sklearn's roc_auc_score per resample (the
    same draws: one RNG, ID then OOD indices per resample), on scores with ties."""
    rng = np.random.default_rng(3)
    ids = [np.round(rng.normal(0, 1, 60), 1) for _ in range(2)]  # [ensemble, method]
    oods = [np.round(rng.normal(shift, 1, 40), 1) for shift in (1.5, 0.8)]
    draws = np.random.default_rng(7)
    labels = np.r_[np.zeros(60), np.ones(40)]
    ratios = []
    for _ in range(50):
        i, o = draws.integers(0, 60, 60), draws.integers(0, 40, 40)
        ens, own = (roc_auc_score(labels, np.r_[a[i], b[o]]) for a, b in zip(ids, oods, strict=True))
        ratios.append((own - 0.5) / (ens - 0.5))
    expected = np.quantile(ratios, [0.025, 0.975])
    np.testing.assert_allclose(retention_interval(ids, oods, resamples=50, seed=7), expected, rtol=1e-12)
    # an ensemble at chance on every resample leaves nothing to take a ratio of
    flat = [np.zeros(5), np.arange(5.0)]
    assert np.isnan(retention_interval(flat, [np.zeros(3), np.arange(3.0) + 9], resamples=5)).all()


def test_label_agreement_counts_flips_and_the_widest_ensemble_margin_among_them() -> None:
    def summary(probs: list[list[float]]) -> ClassificationUncertainty:
        log_probs = np.log(np.asarray(probs, dtype=np.float64))[:, None, :]  # one head
        return classification_uncertainty(log_probs)

    ensemble = summary([[0.9, 0.1], [0.51, 0.49], [0.2, 0.8], [0.45, 0.55]])
    hydra = summary([[0.8, 0.2], [0.49, 0.51], [0.3, 0.7], [0.56, 0.44]])
    got = label_agreement(ensemble, hydra)
    assert got["labels_flipped"] == 2 and got["label_agreement"] == pytest.approx(0.5)
    assert got["widest_flipped_margin"] == pytest.approx(0.10)  # rows 2 and 4: margins 0.02 and 0.10
    same = label_agreement(ensemble, ensemble)
    assert same == {"label_agreement": 1.0, "labels_flipped": 0, "widest_flipped_margin": 0.0}
