"""service/uncertainty.py: hand-computed values and hypothesis properties (the math the server and
the training evaluation share)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from service.uncertainty import (
    ConformalOODCalibrator,
    classification_uncertainty,
    log_softmax,
    regression_uncertainty,
)

FAST = settings(max_examples=60, deadline=None)


def test_two_opposed_heads_match_hand_computed_values() -> None:
    # heads p1 = (0.9, 0.1), p2 = (0.1, 0.9): p̄ = (0.5, 0.5)
    u = classification_uncertainty(np.log([[[0.9, 0.1], [0.1, 0.9]]]))
    h_head = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert u.total_entropy[0] == pytest.approx(math.log(2))
    assert u.expected_entropy[0] == pytest.approx(h_head)
    assert u.mutual_information[0] == pytest.approx(math.log(2) - h_head)
    # EPKL = (1/4)(KL12 + KL21) with KL12 = KL21 = 0.8 ln 9
    assert u.epkl[0] == pytest.approx(0.4 * math.log(9))
    assert u.label[0] == 0  # tie broken towards the first class
    assert u.disagreement[0] == pytest.approx(0.5)
    assert u.variance[0] == pytest.approx(0.16)  # population variance of (0.9, 0.1)
    assert u.confidence[0] == pytest.approx(0.5)


def test_identical_heads_have_no_epistemic_uncertainty() -> None:
    logp = np.log(np.tile([[0.7, 0.2, 0.1]], (4, 1)))[None]
    u = classification_uncertainty(logp)
    assert u.mutual_information[0] == pytest.approx(0.0, abs=1e-12)
    assert u.epkl[0] == pytest.approx(0.0, abs=1e-12)
    assert u.disagreement[0] == 0.0


def test_zero_probabilities_stay_finite() -> None:
    logp = np.array([[[0.0, -np.inf], [-np.inf, 0.0]]])  # one-hot heads that disagree
    u = classification_uncertainty(logp)
    assert np.isfinite(u.total_entropy).all() and np.isfinite(u.mutual_information).all()
    assert u.mutual_information[0] == pytest.approx(math.log(2))


def test_regression_hand_computed() -> None:
    u = regression_uncertainty(np.array([[1.0, 3.0]]), np.array([[1.0, 1.0]]))
    assert (u.mean[0], u.aleatoric_variance[0], u.epistemic_variance[0]) == (2.0, 1.0, 1.0)
    assert u.total_variance[0] == 2.0
    assert u.disagreement[0] == 1.0
    lo, hi = u.interval(0.95)
    assert hi[0] - 2.0 == pytest.approx(1.959964 * math.sqrt(2.0), rel=1e-6)
    assert lo[0] == pytest.approx(4.0 - hi[0])


logits_strategy = arrays(
    np.float64,
    st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(2, 6)),
    elements=st.floats(-30, 30, allow_nan=False),
)


@FAST
@given(logits_strategy)
def test_classification_properties(logits: np.ndarray) -> None:
    u = classification_uncertainty(log_softmax(logits))
    assert (u.mutual_information >= 0).all()
    assert (u.epkl >= u.mutual_information - 1e-12).all()
    # total = aleatoric + epistemic (MI is only clamped for rounding-level negatives)
    np.testing.assert_allclose(u.total_entropy, u.expected_entropy + u.mutual_information, atol=1e-9)
    np.testing.assert_allclose(u.mean_probs.sum(axis=1), 1.0, atol=1e-12)
    assert ((u.disagreement >= 0) & (u.disagreement <= 1)).all()
    # MI is the mean KL of each head from the mixture
    p = np.exp(log_softmax(logits))
    p_bar = p.mean(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(p > 0, p * (np.log(p) - np.log(p_bar)), 0.0).sum(axis=2).mean(axis=1)
    np.testing.assert_allclose(u.mutual_information, np.maximum(kl, 0), atol=1e-8)


@FAST
@given(
    arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 6)), elements=st.floats(-1e3, 1e3)),
    arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 6)), elements=st.floats(1e-6, 1e3)),
)
def test_regression_properties(means: np.ndarray, variances: np.ndarray) -> None:
    rows, heads = min(means.shape[0], variances.shape[0]), min(means.shape[1], variances.shape[1])
    mu, var = means[:rows, :heads], variances[:rows, :heads]
    u = regression_uncertainty(mu, var)
    np.testing.assert_allclose(u.total_variance, u.aleatoric_variance + u.epistemic_variance)
    # epistemic = (1/M) Σ μ² − μ*²
    np.testing.assert_allclose(
        u.epistemic_variance, (mu**2).mean(axis=1) - mu.mean(axis=1) ** 2, atol=1e-6 * (1 + (mu**2).max())
    )
    assert (u.epistemic_variance >= 0).all()
    lo, hi = u.interval(0.9)
    assert (lo <= u.mean).all() and (u.mean <= hi).all()


scores_strategy = st.lists(
    st.floats(-100, 100, allow_nan=False).map(lambda v: round(v, 1)), min_size=1, max_size=60
)


@FAST
@given(scores_strategy, scores_strategy)
def test_conformal_p_value_is_the_exact_formula(calibration: list[float], new: list[float]) -> None:
    cal = ConformalOODCalibrator(calibration)
    s = np.asarray(new)
    p = cal.p_values(s)
    brute = np.array([(1 + sum(c >= x for c in calibration)) / (len(calibration) + 1) for x in new])
    np.testing.assert_array_equal(p, brute)  # ties count as "at least as extreme"
    assert ((p > 0) & (p <= 1)).all()


@FAST
@given(scores_strategy, st.floats(0.001, 0.999))
def test_threshold_agrees_with_flags(calibration: list[float], alpha: float) -> None:
    cal = ConformalOODCalibrator(calibration)
    t = cal.threshold(alpha)
    probes = np.r_[np.asarray(calibration), np.linspace(-101, 101, 50)]
    if math.isfinite(t):
        probes = np.r_[probes, t, np.nextafter(t, -np.inf)]
    np.testing.assert_array_equal(cal.flags(probes, alpha), probes >= t)


def test_p_values_are_uniform_under_exchangeability() -> None:
    # n = 19 calibration scores and one new score, all i.i.d.: p is uniform on {1/20, ..., 20/20}.
    rng = np.random.default_rng(7)
    trials, n = 4000, 19
    draws = rng.standard_normal((trials, n + 1))
    p = np.array([ConformalOODCalibrator(row[:n]).p_values(row[n:])[0] for row in draws])
    counts = np.bincount(np.rint(p * (n + 1)).astype(int), minlength=n + 2)[1:]
    expected = trials / (n + 1)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 43.8  # chi-square, 19 dof, 0.1% critical value
    for alpha in (0.05, 0.1, 0.25):
        assert (p <= alpha).mean() <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials)


def test_calibrator_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        ConformalOODCalibrator([])
    with pytest.raises(ValueError):
        ConformalOODCalibrator([0.1, float("nan")])
    with pytest.raises(ValueError):
        ConformalOODCalibrator([0.1]).flags(np.zeros(1), alpha=0.0)
