"""The drift alarm's maths (service/drift.py): online conformal p-values, the betting martingale, the
monitor's restart. Statistical checks use seeded streams and bounds with several standard errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.drift import (
    GRID,
    ConformalTestMartingale,
    DriftMonitor,
    OnlineConformalPValues,
)


def _reference_p_values(cal: np.ndarray, stream: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """The documented formula, one row at a time, on the gridded scores."""
    ref = list(GRID(cal))
    q = GRID(stream)
    out = []
    for t, value in enumerate(q):
        greater = sum(r > value for r in ref)
        equal = sum(r == value for r in ref)
        out.append((greater + theta[t] * (equal + 1)) / (len(ref) + 1))
        ref.append(value)
    return np.asarray(out)


def _naive_log_capital(m: ConformalTestMartingale, p: np.ndarray) -> np.ndarray:
    """log M after each row by the jumper's definition, in plain floats (no normalisation tricks)."""
    log_f = m.log_bets(p)
    k = log_f.shape[1]
    capital = [1.0 / k] * k
    out = []
    for t in range(p.size):
        jump = 1.0 / (t + m.jump_offset)
        total = sum(capital)
        capital = [
            ((1 - jump) * c + jump * total / k) * math.exp(lf)
            for c, lf in zip(capital, log_f[t], strict=True)
        ]
        out.append(math.log(sum(capital)))
    return np.asarray(out)


def test_p_values_follow_the_formula_with_ties_and_across_chunks() -> None:
    rng = np.random.default_rng(0)
    cal = np.round(rng.exponential(size=50), 1)  # ties inside the calibration scores
    stream = np.concatenate([np.round(rng.exponential(size=150), 1), [0.0, 0.0, 1e20]])  # > one chunk
    online = OnlineConformalPValues(cal, seed=3)
    got = np.concatenate([online(stream[:70]), online(stream[70:])])
    # θ comes from the monitor's own generator: rebuild the same draws, chunk by chunk
    rng3 = np.random.default_rng(3)
    theta = np.concatenate([rng3.random(n) for n in (64, 6, 64, 19)])
    np.testing.assert_allclose(got, _reference_p_values(cal, stream, theta), rtol=1e-12)
    assert online.n_reference == cal.size + stream.size
    online.reset()
    assert online.n_reference == cal.size


def test_p_values_are_uniform_under_exchangeability() -> None:
    """Calibration and stream from one law: the online p-values are i.i.d. uniform (Vovk et al. 2003)."""
    rng = np.random.default_rng(1)
    values = []
    for _ in range(40):
        scores = rng.lognormal(size=314 + 500)
        values.append(OnlineConformalPValues(scores[:314], seed=int(rng.integers(1 << 30)))(scores[314:]))
    p = np.concatenate(values)  # 20,000 p-values
    counts = np.histogram(p, bins=10, range=(0, 1))[0]
    expected = p.size / 10
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.9, counts  # χ²_9 at 0.999
    assert abs(p.mean() - 0.5) < 4 * math.sqrt(1 / 12 / p.size)


def test_every_bet_is_a_probability_density_on_0_1() -> None:
    """Fair bets: no bet, ε p^(ε−1) and a (1 − p)^(a−1) — densities of Beta(ε, 1) and Beta(1, a), each
    with integral 1 on (0, 1), so E f(U) = 1 for uniform U."""
    m = ConformalTestMartingale(epsilons=(0.05, 0.5), beta_a=(2.0, 3.0))
    p = np.random.default_rng(0).random(1000)
    expected = np.stack([np.ones_like(p), 0.05 * p**-0.95, 0.5 * p**-0.5, 2 * (1 - p), 3 * (1 - p) ** 2], 1)
    np.testing.assert_allclose(np.exp(m.log_bets(p)), expected, rtol=1e-12)
    # and their integrals, where the integrand is smooth: ∫ ε p^(ε−1) dp = ∫ ε e^(εx) dx, x = log p
    x = np.linspace(-2000.0, 0.0, 400_001)
    for eps in (0.05, 0.5):
        assert np.trapezoid(eps * np.exp(eps * x), x) == pytest.approx(1.0, rel=1e-6)
    q = np.linspace(0.0, 1.0, 100_001)
    for a in (2.0, 3.0):
        assert np.trapezoid(a * (1 - q) ** (a - 1), q) == pytest.approx(1.0, rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    p=st.lists(st.floats(min_value=1e-3, max_value=1.0), min_size=1, max_size=120),
    cut=st.integers(min_value=0, max_value=120),
)
def test_capital_matches_the_definition_whatever_the_batches(p: list[float], cut: int) -> None:
    values = np.asarray(p)
    m = ConformalTestMartingale(delta=1e-300)  # never alarms here (≤ 2.2 nats per row)
    first = m.update(values[:cut])
    second = m.update(values[cut:])
    assert first.alarms == second.alarms == ()
    expected = _naive_log_capital(ConformalTestMartingale(), values)[-1]
    assert m.log_value == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert m.rows == values.size


def test_capital_keeps_its_precision_where_the_weights_would_underflow() -> None:
    """A long run (jumps of 1e-12) and p-values that swing between the extremes: each p near 1
    costs the bet holding the weight ~e^-4.6, so within one batch of 300 rows the capital's scale
    falls to ~1e-300, past float range unless it is folded out as it goes. Checked against the
    recursion normalised at every row (without the fold the weights come out wrong)."""
    m = ConformalTestMartingale()
    m.threshold = math.inf  # no alarm: the capital itself is what is checked
    m.rows = 10**12
    start_weights, start_log = np.exp(m._log_weights), m.log_value
    p = np.tile([1e-30, 1.0 - 1e-16], 150)
    log_f = m.log_bets(p)
    w, want = start_weights.tolist(), start_log
    for t, row in enumerate(log_f):
        jump = 1.0 / (m.rows + m.jump_offset + t)
        top = max(row)
        w = [((1 - jump) * wk + jump / m.k) * math.exp(lf - top) for wk, lf in zip(w, row, strict=True)]
        total = math.fsum(w)
        w = [wk / total for wk in w]
        want += math.log(total) + top
    assert m.advance(p) is None
    assert m.log_value == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(np.exp(m._log_weights), w, rtol=1e-9, atol=1e-300)


def test_false_alarm_frequency_on_uniform_p_values_is_at_most_delta() -> None:
    """Ville: P(sup M ≥ 1/δ) ≤ δ. δ = 0.1 so that 400 streams resolve it."""
    rng = np.random.default_rng(2)
    delta, streams = 0.1, 400
    alarms = 0
    for _ in range(streams):
        m = ConformalTestMartingale(delta=delta)
        p = rng.random(2000)
        alarms += any(m.update(p[i : i + 64]).alarms for i in range(0, p.size, 64))
    assert alarms / streams <= delta + 3 * math.sqrt(delta * (1 - delta) / streams), alarms


def test_small_p_values_alarm_within_a_few_rows_even_after_a_long_clean_run() -> None:
    rng = np.random.default_rng(3)
    m = ConformalTestMartingale(delta=0.01)
    clean = rng.random(100_000)
    assert not m.update(clean).alarms
    assert m.log10_value > -4.0  # the decreasing jump rate: log M drifts down only ~log(t)
    shifted = m.update(rng.random(200) * 0.005)
    assert shifted.alarms and shifted.alarms[0] < 20, shifted


def test_a_moderate_shift_without_tiny_p_values_alarms() -> None:
    """p ~ Beta(1, 3): no p-value is extreme, but the top of the range empties (the Beta(1, a) bets)."""
    rng = np.random.default_rng(4)
    m = ConformalTestMartingale(delta=0.01)
    m.update(rng.random(1000))
    p = rng.beta(1.0, 3.0, 2000)
    update = m.update(p)
    assert update.alarms and update.alarms[0] < 200, update


def test_alarm_restarts_the_run_and_the_reference() -> None:
    rng = np.random.default_rng(5)
    cal = rng.lognormal(size=200)
    monitor = DriftMonitor(cal, delta=0.01, seed=0)
    assert monitor.observe(rng.lognormal(size=300)) == ()
    before = monitor.state()
    assert before.rows_in_run == before.rows_total == 300 and before.alarms == 0
    assert before.last_alarm_at is None and before.alarm_threshold_log10 == 2.0
    alarms = monitor.observe(rng.lognormal(size=64) * 50.0)  # every score far above calibration
    after = monitor.state()
    assert alarms and alarms[0] <= 310
    assert after.alarms == len(alarms) and after.last_alarm_row == alarms[-1]
    assert after.last_alarm_at is not None and after.run_started_at == after.last_alarm_at
    # one alarm per batch; the new run begins with the next batch, against the calibration set alone
    assert len(alarms) == 1 and after.rows_total == 364 and after.rows_in_run == 0
    assert after.martingale_log10 == 0.0 and monitor.p_values.n_reference == cal.size
    monitor.observe(rng.lognormal(size=10))
    assert monitor.state().rows_in_run == 10 and monitor.p_values.n_reference == cal.size + 10


def test_martingale_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="delta"):
        ConformalTestMartingale(delta=1.0)
    with pytest.raises(ValueError, match="jump_offset"):
        ConformalTestMartingale(jump_offset=0.5)
    with pytest.raises(ValueError, match="epsilons"):
        ConformalTestMartingale(epsilons=(1.5,))


def test_score_grid_is_monotone_and_keeps_extremes_finite() -> None:
    s = np.array([-1.0, 0.0, 1e-13, 1e-6, 1.0, 1.0034, 1e6, 1e13, np.inf, np.nan])
    q = GRID(s)
    assert list(q[:3]) == [0, 0, 0]
    assert np.all(np.diff(q[2:8]) > 0)
    assert q[-1] == q[-2] == q[-3] == GRID.size - 1
