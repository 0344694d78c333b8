"""Drift alarm: a conformal test martingale on each served model version's OOD scores.

Per-row flags at α fire on α of clean traffic forever; this raises one alarm when the *stream* has
changed, with a false-alarm bound over the whole stream (Vovk, Nouretdinov, Gammerman, "Testing
exchangeability on-line", ICML 2003; Vovk, "Testing randomness online", Stat. Sci. 2021).

p-values. Each row's OOD score is ranked against the calibration scores (the served p-value's
reference) *and every earlier row of the current run*, with random tie-breaking:

    p_t = (#{j < t : q_j > q_t} + θ_t · (#{j < t : q_j = q_t} + 1)) / (N_t + 1),   θ_t ~ U(0, 1)

where j runs over the n calibration scores followed by the run's rows (N_t = n + rows so far) and q is
the score on a fixed log-spaced grid (`ScoreGrid`, ~680 bins per decade; a fixed function of the
score, so exchangeability is untouched). If the calibration rows and the run's rows are exchangeable,
p_1, p_2, … are i.i.d. uniform on (0, 1) (Vovk et al. 2003, Theorem 1) — exactly what Ville's
inequality needs. The served per-row p-value ranks against the calibration set alone: with a fixed
set of n scores its realised distribution on clean traffic is off uniform by ~1/√n (Beta
fluctuation), so Ville's bound does not hold for a martingale on it over an unbounded run (over 50
clean streams of 10^5 rows the difference did not show yet: bench/drift.py). The price of the exact
version: the run's rows join the reference, so a lasting shift dilutes its own evidence over time.
The counts live in a fixed histogram: O(1) memory however long the run.

Betting. A "jumper" mixture (Vovk 2021, §6): capital is split over K betting functions — no bet
(f = 1), power bets f_ε(p) = ε p^(ε−1), ε ∈ `EPSILONS`, and Beta(1, a) bets f_a(p) = a (1 − p)^(a−1),
a ∈ `BETA_A`; each integrates to 1 on (0, 1), so each is a fair bet under uniform p. Before each row
a share J_t = 1/(t + t₀) of the capital is re-spread evenly over the K functions (t = rows so far in
the run, t₀ = `JUMP_OFFSET`). Each row multiplies each function's capital by a fair bet, and the
re-spreading is predictable (it depends on the row count only, and happens before the row's p-value
is seen), so the total M_t is a nonnegative martingale with M_0 = 1 under exchangeability.
Re-spreading lets a strong bet that lost everything on clean rows come back, so the alarm still
reacts after long clean periods. The price: on clean traffic log M drifts down, by ~Σ J_t ~
log(t/t₀): measured log10 M ≈ −1.9 after 10^4 clean rows and −2.7 after 10^5 (a fixed jump rate
J costs ~J·t instead: −4.7 and −39 at J = 1e-3 in a prototype), so a clear shift after a long clean
run still alarms within a few rows (tests/service/test_drift.py).

Guarantee kept. Ville's inequality: P(sup_t M_t ≥ 1/δ) ≤ δ, i.e. P(false alarm) ≤ δ per
run-to-alarm, over the whole run however long, when the run's rows are exchangeable with the
calibration rows. The alarm is checked at every row.

After an alarm the martingale restarts: capital 1, the reference reset to the calibration scores
alone, a new run, which begins with the next batch (the rest of the alarming batch is not scored:
at most one alarm per executed batch, so a lasting shift costs one restart per batch, not one per
few rows — measured: an alarm every ~30 rows tripled the update's cost and halved the server's
throughput). Starting the run at a batch boundary is decided by the past alone, so the bound holds.
Each run has its own ≤ δ bound (the runs share the calibration set, so the bound
is per run, not independent across runs). While a shift persists, each new run ranks the shifted rows
against the calibration set again and alarms again: alarms keep coming for as long as it lasts.
A reload (a new version, or the same version reloaded) starts a new martingale.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, field_serializer

FloatArray = NDArray[np.float64]

# Power bets f_ε(p) = ε p^(ε−1): small ε = a big win on very small p-values (a clear shift), ε near 1
# = a mild bet that loses little on clean traffic (E log f_ε = log ε + 1 − ε under uniform p).
EPSILONS: tuple[float, ...] = (0.01, 0.05, 0.2, 0.5)
# "Too few large p-values" bets f_a(p) = a (1 − p)^(a−1) (the Beta(1, a) density): a moderate shift
# that raises every score a little empties the top of the p-value range long before it fills the
# bottom; on MNIST-1D's shifts these bets earned ~2x the power bets' log-capital per row.
BETA_A: tuple[float, ...] = (1.5, 2.0, 3.0, 5.0)
JUMP_OFFSET = 1000.0
DEFAULT_DELTA = 0.01
# Batch rows are ranked in chunks: the within-chunk order costs chunk² comparisons.
_CHUNK = 64


class ScoreGrid:
    """A fixed, data-independent quantisation of nonnegative scores: zero, 24 decades log-spaced from
    1e-12 to 1e12 (2^14 bins, ratio 1.0034 per bin), and overflow. Negative scores share bin 0."""

    LOW = 1e-12
    HIGH = 1e12
    BINS = 1 << 14

    def __init__(self) -> None:
        self._log_low = math.log(self.LOW)
        self._scale = self.BINS / (math.log(self.HIGH) - self._log_low)
        self.size = self.BINS + 2  # [≤ LOW], BINS log bins, [≥ HIGH]

    def __call__(self, scores: NDArray[np.floating]) -> NDArray[np.int64]:
        # Runs after every batch, on the event loop, so few numpy calls: log's argument is at least
        # LOW (no warning to silence); fmin sends +inf and NaN (a NaN score counts as the largest)
        # to the overflow bin; scores at or below LOW, -inf included, go to bin 0.
        s = np.asarray(scores, dtype=np.float64)
        idx = np.floor((np.log(np.maximum(s, self.LOW)) - self._log_low) * self._scale) + 1.0
        out: NDArray[np.int64] = np.fmin(idx, self.size - 1).astype(np.int64)
        out[s <= self.LOW] = 0
        return out


GRID = ScoreGrid()


class OnlineConformalPValues:
    """Conformal p-values of a stream against the calibration scores and the stream's own past
    (see the module docstring): exact, i.i.d. uniform under exchangeability."""

    def __init__(
        self, calibration_scores: NDArray[np.floating] | list[float], seed: int | None = None
    ) -> None:
        cal = GRID(np.asarray(calibration_scores, dtype=np.float64).ravel())
        if cal.size == 0:
            raise ValueError("online conformal p-values need at least one calibration score")
        self._cal_counts = np.bincount(cal, minlength=GRID.size).astype(np.int64)
        self._rng = np.random.default_rng(seed)
        self.reset()

    def reset(self) -> None:
        """Back to the calibration scores alone (a new run)."""
        self._counts = self._cal_counts.copy()
        self.n_reference = int(self._cal_counts.sum())

    def __call__(self, scores: NDArray[np.floating]) -> FloatArray:
        """p-values of `scores` in order; each row joins the reference after its own p-value."""
        q = GRID(scores)
        out = np.empty(q.size, dtype=np.float64)
        for start in range(0, q.size, _CHUNK):
            out[start : start + _CHUNK] = self._chunk(q[start : start + _CHUNK])
        return out

    def _chunk(self, q: NDArray[np.int64]) -> FloatArray:
        b = q.size
        # reference scores in bins above q's: all of them less those in bins up to q's
        greater = self.n_reference - np.cumsum(self._counts)[q]
        equal = self._counts[q]
        if b > 1:  # earlier rows of this chunk: j < i (a one-row batch, the common case, has none)
            earlier = np.tri(b, b, -1, dtype=bool)
            greater = greater + ((q[None, :] > q[:, None]) & earlier).sum(axis=1)
            equal = equal + ((q[None, :] == q[:, None]) & earlier).sum(axis=1)
        n_before = self.n_reference + np.arange(b)
        theta = self._rng.random(b)
        p: FloatArray = (greater + theta * (equal + 1)) / (n_before + 1.0)
        np.add.at(self._counts, q, 1)
        self.n_reference += b
        return p


@dataclass(frozen=True)
class DriftUpdate:
    """What one `update` did: the alarms it raised (row offsets within the batch) and where it ended."""

    alarms: tuple[int, ...]
    log10_martingale: float


class ConformalTestMartingale:
    """The jumper betting martingale on p-values (module docstring), in log space.

    `update(p)` takes a batch of p-values in stream order; an alarm is raised at the first row where
    log10 M ≥ log10(1/δ), after which the martingale restarts from 1 (`on_restart` is called, e.g.
    to reset the p-values' reference) and the batch's remaining rows feed the new run.
    """

    def __init__(
        self,
        delta: float = DEFAULT_DELTA,
        jump_offset: float = JUMP_OFFSET,
        epsilons: tuple[float, ...] = EPSILONS,
        beta_a: tuple[float, ...] = BETA_A,
    ) -> None:
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if not jump_offset >= 1.0:
            raise ValueError(f"jump_offset must be >= 1, got {jump_offset}")
        if not epsilons or not all(0.0 < e < 1.0 for e in epsilons):
            raise ValueError(f"power-bet epsilons must be in (0, 1), got {epsilons}")
        self.delta = delta
        self.jump_offset = jump_offset
        self.threshold = math.log(1.0 / delta)  # natural log
        if not all(a > 1.0 for a in beta_a):
            raise ValueError(f"Beta(1, a) bets need a > 1, got {beta_a}")
        eps = np.asarray(epsilons, dtype=np.float64)
        a = np.asarray(beta_a, dtype=np.float64)
        # log f_k(p) = c_k + u_k log p + v_k log(1 − p); component 0: no bet
        self._c = np.concatenate([[0.0], np.log(eps), np.log(a)])
        self._u = np.concatenate([[0.0], eps - 1.0, np.zeros_like(a)])
        self._v = np.concatenate([[0.0], np.zeros_like(eps), a - 1.0])
        self.k = self._c.size
        self.restart()

    def restart(self) -> None:
        self._log_weights = np.full(self.k, -math.log(self.k))  # normalised: logsumexp = 0
        self.log_value = 0.0  # natural log of M (the run's capital)
        self.rows = 0  # rows in the current run

    @property
    def log10_value(self) -> float:
        return self.log_value / math.log(10.0)

    def log_bets(self, p_values: NDArray[np.floating]) -> FloatArray:
        """log f_k(p) for every row (b) and betting function (K): (b, K)."""
        p = np.clip(np.asarray(p_values, dtype=np.float64).ravel(), 1e-300, 1.0 - 1e-16)
        log_p, log_q = np.log(p)[:, None], np.log1p(-p)[:, None]
        out: FloatArray = self._c[None, :] + self._u[None, :] * log_p + self._v[None, :] * log_q
        return out

    def update(self, p_values: NDArray[np.floating]) -> DriftUpdate:
        """Feed a batch of p-values (stream order); an alarm restarts the martingale and the batch's
        remaining p-values feed the new run. Returns the alarms raised (batch row offsets)."""
        p = np.asarray(p_values, dtype=np.float64).ravel()
        alarms: list[int] = []
        start = 0
        while start < p.size:
            hit = self.advance(p[start:])
            if hit is None:
                break
            alarms.append(start + hit)
            self.restart()
            start += hit + 1
        return DriftUpdate(tuple(alarms), self.log10_value)

    def advance(self, p: FloatArray) -> int | None:
        """Advance over `p`, row by row; the offset of the first row at or above the threshold (the
        state then stops there), else None with the state advanced over every row."""
        log_f = self.log_bets(p)  # (b, K)
        # per row: bets relative to the row's best, so exp() cannot overflow; its log goes to log M
        top = log_f.max(axis=1)
        factors = np.exp(log_f - top[:, None])
        # The recursion is sequential, so it runs on Python floats: numpy's per-call cost on
        # K = 9 weights made this loop ~4.6 µs a row, on the event loop after every batch. The
        # weights stay unnormalised within the batch (their sum is the capital's growth since it
        # began): one pass over K per row, not two and a division (1.45 -> 0.9 µs a row).
        u = np.exp(self._log_weights).tolist()
        k = float(self.k)
        base = self.log_value  # log M = base + log(total)
        total = 1.0
        t = self.rows + self.jump_offset
        threshold = self.threshold
        for i, (f, best) in enumerate(zip(factors.tolist(), top.tolist(), strict=True)):
            jump = 1.0 / (t + i)  # J_t: re-spread before the row's p-value is seen (predictable)
            keep, spread = 1.0 - jump, jump / k * total
            u = [(keep * uk + spread) * fk for uk, fk in zip(u, f, strict=True)]
            total = sum(u)
            base += best
            if base + math.log(total) >= threshold:
                self.log_value = base + math.log(total)
                self.rows += i + 1
                return i
            if total < 1e-150:  # each factor is at most 1: fold the scale into base before u underflows
                base += math.log(total)
                u = [uk / total for uk in u]
                total = 1.0
        self._log_weights = np.log(np.maximum(np.asarray(u) / total, 1e-300))
        self.log_value = base + math.log(total)
        self.rows += factors.shape[0]
        return None


class DriftState(BaseModel):
    """A snapshot for metadata: the run's value, the alarm threshold and the alarm history.

    Also the declared drift block of V1 model metadata (service/routes/v1.py): `as_dict` is what
    metadata serves."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    martingale_log10: float
    alarm_threshold_log10: float
    delta: float
    jump_offset: float
    rows_in_run: int
    rows_total: int
    alarms: int
    last_alarm_at: str | None
    last_alarm_row: int | None
    run_started_at: str
    guarantee: str = (
        "Ville: P(false alarm) <= delta per run-to-alarm under exchangeability "
        "with the calibration rows; restarts after each alarm"
    )

    @field_serializer("martingale_log10", "alarm_threshold_log10")
    def _rounded(self, value: float) -> float:
        return round(value, 6)

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class DriftMonitor:
    """One model version's drift alarm: online conformal p-values → jumper martingale → alarms.

    `observe(scores)` is called with each executed batch's OOD scores, in batch order, from one
    thread at a time (the monitor's worker); `state()` may be read from any thread.
    """

    def __init__(
        self,
        calibration_scores: NDArray[np.floating] | list[float],
        *,
        delta: float = DEFAULT_DELTA,
        jump_offset: float = JUMP_OFFSET,
        seed: int | None = None,
    ) -> None:
        self.p_values = OnlineConformalPValues(calibration_scores, seed=seed)
        self.martingale = ConformalTestMartingale(delta=delta, jump_offset=jump_offset)
        self._lock = threading.Lock()
        self._rows_total = 0
        self._alarms = 0
        self._last_alarm_at: str | None = None
        self._last_alarm_row: int | None = None
        self._run_started_at = _now()
        self._snapshot = self._make_state()

    def observe(self, scores: NDArray[np.floating]) -> tuple[int, ...]:
        """Feed a batch's OOD scores; returns the alarms it raised, as stream row numbers (1-based)."""
        s = np.asarray(scores, dtype=np.float64).ravel()
        raised: list[int] = []
        hit = self.martingale.advance(self.p_values(s)) if s.size else None
        if hit is not None:
            raised.append(self._rows_total + hit + 1)
            self._alarms += 1
            self._last_alarm_at = _now()
            self._last_alarm_row = raised[0]
            # restart; the new run begins with the next batch (module docstring)
            self.martingale.restart()
            self.p_values.reset()
            self._run_started_at = self._last_alarm_at
        self._rows_total += s.size
        with self._lock:
            self._snapshot = self._make_state()
        return tuple(raised)

    def _make_state(self) -> DriftState:
        m = self.martingale
        return DriftState(
            martingale_log10=m.log10_value,
            alarm_threshold_log10=math.log10(1.0 / m.delta),
            delta=m.delta,
            jump_offset=m.jump_offset,
            rows_in_run=m.rows,
            rows_total=self._rows_total,
            alarms=self._alarms,
            last_alarm_at=self._last_alarm_at,
            last_alarm_row=self._last_alarm_row,
            run_started_at=self._run_started_at,
        )

    def state(self) -> DriftState:
        with self._lock:
            return self._snapshot
