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
    CombinedOODScore,
    ConformalOODCalibrator,
    LogScaleNormaliser,
    classification_uncertainty,
    log_softmax,
    regression_uncertainty,
)
from tests import oracle

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
    arrays(
        np.float64,
        st.tuples(st.integers(1, 6), st.integers(1, 9), st.integers(2, 12)),
        elements=st.floats(-300, 300, allow_nan=False),
    ),
    st.floats(0.0, 0.5),
)
def test_classification_matches_the_independent_oracle(logits: np.ndarray, impossible: float) -> None:
    """Every summary against tests/oracle.py (scipy's logsumexp and xlogy, pairwise KL), also with
    classes a head gives probability exactly 0 (log p = −inf) and logits far apart."""
    log_p = logits.copy()
    log_p[logits < np.quantile(logits, impossible)] = -np.inf
    log_p[..., 0] = np.maximum(log_p[..., 0], 0.0)  # every head keeps one possible class
    u = classification_uncertainty(log_p)
    with np.errstate(invalid="ignore"):  # the oracle masks 0 · (−inf) after computing it
        want = oracle.classification(log_p)
    np.testing.assert_allclose(u.mean_probs, want["probabilities"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(u.head_probs, want["heads"], rtol=1e-12, atol=1e-15)
    # the label is a top class of the mean; where two tie to rounding either may be it, and the
    # summaries taken at the label (confidence, variance, disagreement) are compared elsewhere
    p_bar = want["probabilities"]
    rows = np.arange(p_bar.shape[0])
    np.testing.assert_allclose(p_bar[rows, u.label], p_bar.max(axis=1), rtol=1e-12)
    top_two = np.sort(p_bar, axis=1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > 1e-9 if p_bar.shape[1] > 1 else np.ones(rows.size, bool)
    assert (u.label[clear] == want["label"][clear]).all()
    for name in ("confidence", "variance", "disagreement"):
        got, expected = getattr(u, name)[clear], want[name][clear]
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12, err_msg=name)
    for name in ("expected_entropy", "total_entropy"):
        np.testing.assert_allclose(getattr(u, name), want[name], rtol=1e-9, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(u.mutual_information, want["mutual_information"], atol=1e-9)
    finite = np.isfinite(want["epkl"])  # the server answers an infinite EPKL as the largest float
    np.testing.assert_allclose(u.epkl[finite], want["epkl"][finite], rtol=1e-9, atol=1e-9)
    assert (u.epkl[~finite] == np.finfo(np.float64).max).all()


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


# -- the combined OOD statistic (max of log-scale z-scores) ------------------------------------------

COMBINED = settings(max_examples=80, deadline=None, database=None)
normalisers_strategy = st.lists(
    st.tuples(st.floats(-20, 20), st.floats(0.01, 10)), min_size=1, max_size=3
).map(lambda params: [LogScaleNormaliser(f"s{j}", m, iqr) for j, (m, iqr) in enumerate(params)])
# scores ≥ 0 from a coarse grid (ties and exact zeros are common), up to 1e6 like squared distances
score_values = st.sampled_from([0.0, 1e-9, 1e-3, 0.01, 0.5, 1.0, 2.0, 64.0, 1e3, 1e6])


def test_log_scale_normaliser_hand_computed() -> None:
    z = LogScaleNormaliser.fit("density", np.exp([0.0, 1.0, 2.0, 3.0, 4.0]))
    assert (z.log_median, z.log_iqr) == pytest.approx((2.0, 2.0))
    np.testing.assert_allclose(z(np.exp([2.0, 4.0, 0.0])), [0.0, 1.0, -1.0])
    assert np.isfinite(z(np.zeros(2))).all()  # MI clamped at 0 stays finite (and very low)
    assert LogScaleNormaliser.fit("mi", np.full(4, 0.3)).log_iqr == 1.0  # constant reference
    with pytest.raises(ValueError):
        LogScaleNormaliser.fit("mi", np.array([]))


def test_two_sided_normaliser_hand_computed() -> None:
    # a skewed reference: log s = (0, 1, 2, 2.5, 3) → q25 = 1, median = 2, q75 = 2.5
    z = LogScaleNormaliser.fit("input_density", np.exp([0.0, 1.0, 2.0, 2.5, 3.0]), tails="both")
    assert (z.tails, z.log_median, z.log_iqr) == ("both", pytest.approx(2.0), pytest.approx(1.5))
    assert (z.log_lower_scale, z.log_upper_scale) == (pytest.approx(2.0), pytest.approx(1.0))
    # each side in its own units: one upper half-IQR above is as unusual as one lower half-IQR below
    np.testing.assert_allclose(z(np.exp([2.0, 3.0, 0.0, 4.0, -2.0])), [0.0, 1.0, 1.0, 2.0, 2.0])
    assert z(np.zeros(1))[0] > 30  # exactly at the mean: as atypical as it gets, and finite
    # without per-side scales (optional in a manifest) both sides fall back to the IQR
    bare = LogScaleNormaliser("input_density", 2.0, 1.5, tails="both")
    np.testing.assert_allclose(bare(np.exp([0.5, 2.0, 3.5])), [1.0, 0.0, 1.0])
    # a one-sided half-spread of zero (half the reference tied at the median) falls back to the IQR
    tied = LogScaleNormaliser.fit("input_density", np.exp([1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 5.0]), tails="both")
    assert tied.log_lower_scale == pytest.approx(tied.log_iqr) and tied.log_upper_scale > 0
    # the default stays one-sided, with no side scales
    assert LogScaleNormaliser.fit("density", np.exp([0.0, 1.0, 2.0])).log_lower_scale is None


TWO_SIDED = settings(max_examples=60, deadline=None, database=None)
# logs of reference scores on a 0.01 grid: a spread an exp/log round trip (an ulp) cannot rival
log_references = st.lists(
    st.integers(-1500, 1500).map(lambda k: k / 100), min_size=2, max_size=30, unique=True
)
log_probes = st.lists(st.floats(-40, 40), min_size=1, max_size=20)


@TWO_SIDED
@given(st.floats(-10, 10), st.lists(st.floats(0.01, 10), min_size=1, max_size=15), log_probes)
def test_two_sided_on_a_symmetric_reference_equals_upper_on_the_high_side(
    centre: float, offsets: list[float], probes: list[float]
) -> None:
    """Mirrored about its median, a reference has equal halves: `both` then scores the high side
    exactly as `upper` does, and the low side as `upper` scores its mirror image."""
    logs = np.r_[centre - np.array(offsets), centre, centre + np.array(offsets)]
    upper = LogScaleNormaliser.fit("s", np.exp(logs))
    both = LogScaleNormaliser.fit("s", np.exp(logs), tails="both")
    assert both.log_median == pytest.approx(upper.log_median)
    assert both.log_lower_scale == pytest.approx(upper.log_iqr)
    assert both.log_upper_scale == pytest.approx(upper.log_iqr)
    x = np.asarray(probes)
    high, low = x[x >= centre], x[x < centre]
    np.testing.assert_allclose(both(np.exp(high)), upper(np.exp(high)), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(both(np.exp(low)), upper(np.exp(2 * centre - low)), rtol=1e-9, atol=1e-9)


@TWO_SIDED
@given(log_references, log_probes)
def test_two_sided_scores_low_values_positive_and_grow_with_the_distance_on_each_side(
    reference: list[float], probes: list[float]
) -> None:
    z = LogScaleNormaliser.fit("s", np.exp(reference), tails="both")
    scores = np.exp(probes)
    got = z(scores)
    assert np.isfinite(got).all() and (got >= 0.0).all()
    x = np.log(scores)  # the logs the normaliser sees (exp then log may move a probe by an ulp)
    distance = x - z.log_median
    assert (got[distance < 0] > 0.0).all() and (got[distance > 0] > 0.0).all()  # unusual either way
    # upper scores values below the median negative: the low side is what `both` adds
    assert (LogScaleNormaliser.fit("s", np.exp(reference))(np.exp(x[distance < 0])) < 0.0).all()
    for side in (distance < 0, distance >= 0):  # monotone in |log s − median| within each side
        order = np.argsort(np.abs(distance[side]), kind="stable")
        assert (np.diff(got[side][order]) >= -1e-12).all()
    assert z(np.exp([z.log_median]))[0] == pytest.approx(0.0, abs=1e-9)


def test_combined_score_is_the_largest_z_and_needs_every_component() -> None:
    combiner = CombinedOODScore(
        [LogScaleNormaliser("mutual_information", -3.0, 1.0), LogScaleNormaliser("density", 4.0, 0.5)]
    )
    assert combiner.names == ("mutual_information", "density")
    scores = {"mutual_information": np.exp([-3.0, 0.0]), "density": np.exp([5.0, 4.0])}
    np.testing.assert_allclose(combiner(scores), [2.0, 3.0])  # z = (0, 2) and (3, 0)
    with pytest.raises(ValueError, match="density"):
        combiner({"mutual_information": np.ones(2)})
    with pytest.raises(ValueError):
        CombinedOODScore([])


@COMBINED
@given(normalisers_strategy, st.data())
def test_combined_score_is_monotone_in_each_component(
    normalisers: list[LogScaleNormaliser], data: st.DataObject
) -> None:
    combiner = CombinedOODScore(normalisers)
    n = data.draw(st.integers(1, 8))
    base = {c.score: np.array(data.draw(st.lists(score_values, min_size=n, max_size=n))) for c in normalisers}
    before = combiner(base)
    for c in normalisers:
        # the combined statistic is at least each component's z-score
        assert (before >= c(base[c.score])).all()
        grown = data.draw(st.lists(st.floats(0, 1e6), min_size=n, max_size=n))
        after = combiner(base | {c.score: base[c.score] + np.array(grown)})
        assert (after >= before).all(), c.score


# the same with a two-sided component (the combined score is no longer monotone in it)
mixed_normalisers_strategy = st.lists(
    st.tuples(st.floats(-20, 20), st.floats(0.01, 10), st.floats(0.01, 10), st.booleans()),
    min_size=1,
    max_size=3,
).map(
    lambda params: [
        LogScaleNormaliser(f"s{j}", m, iqr, tails="both", log_lower_scale=lo, log_upper_scale=iqr)
        if two_sided
        else LogScaleNormaliser(f"s{j}", m, iqr)
        for j, (m, iqr, lo, two_sided) in enumerate(params)
    ]
)


@COMBINED
@given(mixed_normalisers_strategy, st.data(), st.floats(0.01, 0.99))
def test_conformal_flags_of_the_combined_score_are_super_uniform_on_exchangeable_rows(
    normalisers: list[LogScaleNormaliser], data: st.DataObject, alpha: float
) -> None:
    """The exact counting argument behind P(p ≤ α) ≤ α: for ANY n + 1 rows, leaving each out in turn
    as the new row (the n others its calibration set) flags at most ⌊α(n+1)⌋ of them, ties included.
    Exchangeable rows make each one equally likely to be the new one, so the flag rate is ≤ α. This
    holds because the statistic is a fixed function of the row (normalisers fitted elsewhere)."""
    combiner = CombinedOODScore(normalisers)
    n = data.draw(st.integers(1, 40))
    rows = {
        c.score: np.array(data.draw(st.lists(score_values, min_size=n + 1, max_size=n + 1)))
        for c in normalisers
    }
    statistic = combiner(rows)
    flagged = 0
    for i in range(n + 1):
        calibrator = ConformalOODCalibrator(np.delete(statistic, i))
        flagged += int(calibrator.flags(statistic[i : i + 1], alpha)[0])
    assert flagged <= alpha * (n + 1) + 1e-9, (flagged, n + 1, alpha)


def test_combined_flag_rate_on_id_rows_is_at_most_alpha() -> None:
    """The whole recipe, simulated: components normalised on one ID split, calibration scores of the
    combined statistic on another, new rows from the same law. Seeded: the same numbers every run."""
    rng = np.random.default_rng(11)
    trials, n_fit, n_cal = 3000, 50, 39
    p = np.empty(trials)
    for t in range(trials):
        # correlated MI-like (log-normal) and density-like (chi-square, 64 dof) scores per row
        latent = rng.standard_normal(n_fit + n_cal + 1)
        mi = np.exp(-3.0 + 0.8 * latent + 0.6 * rng.standard_normal(latent.size))
        density = rng.chisquare(64, latent.size) * np.exp(0.2 * latent)
        fit, cal, new = slice(0, n_fit), slice(n_fit, n_fit + n_cal), slice(n_fit + n_cal, None)
        combiner = CombinedOODScore(
            [LogScaleNormaliser.fit("mi", mi[fit]), LogScaleNormaliser.fit("density", density[fit])]
        )
        statistic = combiner({"mi": mi, "density": density})
        p[t] = ConformalOODCalibrator(statistic[cal]).p_values(statistic[new])[0]
    for alpha in (0.05, 0.1, 0.25):
        assert (p <= alpha).mean() <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials), alpha


def test_a_priority_count_ranks_ahead_of_the_combination_and_keeps_its_order_within() -> None:
    components = [
        LogScaleNormaliser("mutual_information", -3.0, 1.0),
        LogScaleNormaliser("density", 4.0, 0.5),
    ]
    plain = CombinedOODScore(components)
    ranked = CombinedOODScore(components, priority="unseen_values")
    assert ranked.names == ("mutual_information", "density", "unseen_values")
    mi = np.exp([-3.0, 0.0, 10.0, -3.0])
    density = np.exp([5.0, 4.0, 40.0, 4.0])
    count = np.array([0.0, 0.0, 0.0, 1.0])
    s = plain({"mutual_information": mi, "density": density})
    got = ranked({"mutual_information": mi, "density": density, "unseen_values": count})
    # hand-computed: S = (2, 3, 85, 0); statistic = count + 1/2 + S / (2 (1 + S))
    np.testing.assert_allclose(s, [2.0, 3.0, 85.0, 0.0])
    np.testing.assert_allclose(got, [0.5 + 2 / 6, 0.5 + 3 / 8, 0.5 + 85 / 172, 1.5])
    # the row with one unseen value outranks a row as far out as S = 85; the others keep S's order
    assert np.argmax(got) == 3 and list(np.argsort(got[:3])) == list(np.argsort(s[:3]))
    with pytest.raises(ValueError, match="unseen_values"):
        ranked({"mutual_information": mi, "density": density})
    with pytest.raises(ValueError, match="component"):
        CombinedOODScore(components, priority="density")


@COMBINED
@given(mixed_normalisers_strategy, st.data())
def test_with_a_priority_count_more_unseen_values_always_rank_higher(
    normalisers: list[LogScaleNormaliser], data: st.DataObject
) -> None:
    ranked = CombinedOODScore(normalisers, priority="unseen_values")
    plain = CombinedOODScore(normalisers)
    n = data.draw(st.integers(2, 8))
    base = {c.score: np.array(data.draw(st.lists(score_values, min_size=n, max_size=n))) for c in normalisers}
    count = np.array(data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n)), dtype=np.float64)
    got, s = ranked(base | {"unseen_values": count}), plain(base)
    for i in range(n):
        for j in range(n):
            if count[i] > count[j]:
                assert got[i] > got[j]
            elif count[i] == count[j] and s[i] > s[j]:
                assert got[i] >= got[j]  # S's order kept (>= : float rounding of the squash far out)
