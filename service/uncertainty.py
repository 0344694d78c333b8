"""Ensemble uncertainty math: the one implementation that evaluation and the server both use.

Everything here is vectorised numpy over a batch; there is no per-row Python loop.
Definitions follow docs (and `../shared/reference/uncertainty.md`); natural logs throughout.

Classification input: per-head log-probabilities, shape (batch, heads, classes).
Regression input: per-head Gaussian means and variances, shape (batch, heads) each.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


@dataclass(frozen=True)
class ClassificationUncertainty:
    """Per-row summaries of an M-head classifier. Every array has leading dimension `batch`."""

    mean_probs: FloatArray  # (batch, classes): p̄ = mean over heads
    label: IntArray  # (batch,): argmax p̄
    confidence: FloatArray  # (batch,): max p̄
    total_entropy: FloatArray  # H[p̄]
    expected_entropy: FloatArray  # (1/M) Σ_m H[p_m] (aleatoric)
    mutual_information: FloatArray  # H[p̄] − E_m H[p_m] (epistemic), clamped at 0
    epkl: FloatArray  # (1/M²) Σ_{m,m'} KL(p_m ‖ p_m') ≥ MI
    disagreement: FloatArray  # fraction of heads whose argmax differs from argmax p̄
    variance: FloatArray  # Var_m[p_m,k] at k = argmax p̄ (population variance over heads)
    head_probs: FloatArray  # (batch, heads, classes): each head's probabilities, renormalised

    def score(self, name: str) -> FloatArray:
        """The score called `name`: mutual_information, epkl, total_entropy, disagreement or variance."""
        if name not in CLASSIFICATION_SCORES:
            raise ValueError(
                f"unknown classification OOD score {name!r}; choose from {CLASSIFICATION_SCORES}"
            )
        value: FloatArray = getattr(self, name)
        return value


@dataclass(frozen=True)
class RegressionUncertainty:
    """Per-row summaries of an M-head Gaussian regressor (uniform mixture over heads)."""

    mean: FloatArray  # (batch,): μ* = mean of head means
    aleatoric_variance: FloatArray  # mean of head variances
    epistemic_variance: FloatArray  # variance of head means
    total_variance: FloatArray  # aleatoric + epistemic
    disagreement: FloatArray  # standard deviation of head means (spread, in target units)

    def interval(self, level: float = 0.95) -> tuple[FloatArray, FloatArray]:
        """Central prediction interval of the Gaussian approximation N(μ*, total variance)."""
        check_level(level)
        return gaussian_interval(self.mean, self.total_variance, level)

    def score(self, name: str) -> FloatArray:
        if name not in REGRESSION_SCORES:
            raise ValueError(f"unknown regression OOD score {name!r}; choose from {REGRESSION_SCORES}")
        value: FloatArray = getattr(self, name)
        return value


CLASSIFICATION_SCORES: tuple[str, ...] = (
    "mutual_information",
    "epkl",
    "total_entropy",
    "disagreement",
    "variance",
)
REGRESSION_SCORES: tuple[str, ...] = ("epistemic_variance", "total_variance", "disagreement")
# Feature-density score: an extra graph output (class-conditional Mahalanobis on the shared body,
# training/density.py), not a function of the heads' outputs; combinable with either task's scores.
DENSITY_SCORE = "density"
# Input typicality: Mahalanobis distance of the standardised raw row to the training rows' mean, a
# second extra output. Scored two-sided: a row scaled x0.1 towards a centred table's mean is as
# atypical (too close) as a row scaled x4 is (too far), and no body density sees the former.
INPUT_DENSITY_SCORE = "input_density"
UNSEEN_VALUES_SCORE = "unseen_values"
Tails = Literal["upper", "both"]


def gaussian_interval(
    mean: FloatArray, total_variance: FloatArray, level: float
) -> tuple[FloatArray, FloatArray]:
    """The central `level` interval of N(mean, total variance), row by row; `level` in (0, 1)
    (the caller checks it: the server at its request edge, `RegressionUncertainty.interval` here)."""
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    half = z * np.sqrt(total_variance)
    return mean - half, mean + half


def check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level must be in (0, 1), got {level}")


def _entropy(p: FloatArray, log_p: FloatArray) -> FloatArray:
    """−Σ p·log p over the last axis, `p` = exp(`log_p`); exp(−inf) = 0 makes 0·(−inf) → nan, so
    those terms are masked."""
    out: FloatArray = -(p * np.where(p > 0.0, log_p, 0.0)).sum(axis=-1)
    return out


def log_softmax(logits: NDArray[np.floating], axis: int = -1) -> FloatArray:
    """Numerically stable log-softmax in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    out: FloatArray = z - np.log(np.exp(z).sum(axis=axis, keepdims=True))
    return out


def classification_uncertainty(head_log_probs: NDArray[np.floating]) -> ClassificationUncertainty:
    """Summaries of per-head log-probabilities `(batch, heads, classes)`.

    The inputs are re-normalised with a log-softmax first, so float32 rounding in the graph
    cannot make a row sum to anything but one.
    """
    log_p = np.asarray(head_log_probs, dtype=np.float64)
    if log_p.ndim != 3:
        raise ValueError(f"expected (batch, heads, classes) log-probabilities, got shape {log_p.shape}")
    batch, heads, classes = log_p.shape
    # Every summary below is bit for bit what the calibration scores in shipped manifests were
    # computed with (a served calibration row ties its own score; conformal p-values count ties),
    # so the operations keep their order; what is saved is work done twice: exp(log p) is reused
    # for the head entropies and the served per-head probabilities, and means are sum / count
    # (what ndarray.mean computes, without its Python wrapper: on a one-row batch the wrapper
    # cost more than the arithmetic). The server runs this on every batch, holding the GIL.
    log_p = log_softmax(log_p, axis=-1)
    p = np.exp(log_p)  # (batch, heads, classes), each head's row sums to one

    mean_probs = p.sum(axis=1) / heads  # (batch, classes)
    # log p̄ via logsumexp over heads: stays finite where p̄ underflows in linear space. A class
    # every head gives probability 0 (log p = −inf) has p̄ = 0: shifted by 0, not by −inf (which
    # made −inf − (−inf) = nan, and the row's total entropy nan).
    m = log_p.max(axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        log_mean = (m + np.log(np.exp(log_p - m).sum(axis=1, keepdims=True) / heads))[:, 0, :]

    total_entropy = _entropy(np.exp(log_mean), log_mean)
    head_entropy = _entropy(p, log_p)  # (batch, heads)
    expected_entropy = head_entropy.sum(axis=1) / heads
    mutual_information = np.maximum(total_entropy - expected_entropy, 0.0)

    # EPKL = (1/M²) Σ_{m,m'} Σ_k p_m,k (log p_m,k − log p_m',k)
    #      = E_m[Σ_k p_m,k log p_m,k] − Σ_k p̄_k · E_m'[log p_m',k]  (cross term factorises)
    neg_head_entropy = -expected_entropy
    with np.errstate(invalid="ignore"):
        # a class with p̄_k = 0 contributes 0 whatever log p is (avoid 0·(−inf) = nan)
        mean_log = log_p.sum(axis=1) / heads  # (batch, classes)
        cross = np.where(mean_probs > 0.0, mean_probs * mean_log, 0.0).sum(axis=1)
    epkl = np.maximum(neg_head_entropy - cross, mutual_information)
    epkl = np.where(np.isfinite(epkl), epkl, np.finfo(np.float64).max)

    label = mean_probs.argmax(axis=1).astype(np.int64)
    rows = np.arange(batch)
    confidence = mean_probs[rows, label]
    head_labels = p.argmax(axis=2)  # (batch, heads)
    if heads and classes:
        disagreement = (head_labels != label[:, None]).sum(axis=1, dtype=np.float64) / heads
        at_label = p[rows, :, label]  # (batch, heads)
        spread = at_label - at_label.sum(axis=1, keepdims=True) / heads
        variance = (spread * spread).sum(axis=1) / heads  # population variance, as ndarray.var
    else:
        disagreement = variance = np.zeros(batch)

    return ClassificationUncertainty(
        mean_probs=mean_probs,
        label=label,
        confidence=confidence,
        total_entropy=total_entropy,
        expected_entropy=expected_entropy,
        mutual_information=mutual_information,
        epkl=epkl,
        disagreement=disagreement,
        variance=variance,
        head_probs=p,
    )


def regression_uncertainty(
    head_means: NDArray[np.floating], head_variances: NDArray[np.floating]
) -> RegressionUncertainty:
    """Summaries of per-head Gaussians, both arrays `(batch, heads)`."""
    mu = np.asarray(head_means, dtype=np.float64)
    var = np.asarray(head_variances, dtype=np.float64)
    if mu.ndim != 2 or mu.shape != var.shape:
        raise ValueError(f"expected (batch, heads) means and variances, got {mu.shape} and {var.shape}")
    mean = mu.mean(axis=1)
    aleatoric = np.maximum(var, 0.0).mean(axis=1)
    epistemic = mu.var(axis=1)  # (1/M) Σ μ² − μ*², computed stably
    return RegressionUncertainty(
        mean=mean,
        aleatoric_variance=aleatoric,
        epistemic_variance=epistemic,
        total_variance=aleatoric + epistemic,
        disagreement=np.sqrt(epistemic),
    )


class ConformalOODCalibrator:
    """Conformal p-values for OOD scores (Bates et al. 2023), exactly as documented:

        p(s) = (1 + #{i : S_i ≥ s}) / (n + 1),   flag when p ≤ α.

    If a new input is exchangeable with the n held-out calibration inputs, P(p ≤ α) ≤ α.
    """

    def __init__(self, calibration_scores: NDArray[np.floating] | list[float]) -> None:
        scores = np.sort(np.asarray(calibration_scores, dtype=np.float64).ravel())
        if scores.size == 0:
            raise ValueError("conformal calibration needs at least one calibration score")
        if not np.all(np.isfinite(scores)):
            raise ValueError("calibration scores must be finite")
        self._sorted = scores

    @property
    def n(self) -> int:
        return int(self._sorted.size)

    def p_values(self, scores: NDArray[np.floating]) -> FloatArray:
        s = np.asarray(scores, dtype=np.float64)
        # #{S_i ≥ s} = n − #{S_i < s} = n − searchsorted(left)
        at_least = self.n - np.searchsorted(self._sorted, s, side="left")
        out = (1.0 + at_least) / (self.n + 1.0)
        return np.asarray(out, dtype=np.float64)

    def flags(self, scores: NDArray[np.floating], alpha: float) -> NDArray[np.bool_]:
        check_alpha(alpha)
        out: NDArray[np.bool_] = self.p_values(scores) <= alpha
        return out

    def threshold(self, alpha: float) -> float:
        """The smallest score flagged at α (inf when n is too small to ever flag at α)."""
        check_alpha(alpha)
        # p(s) ≤ α  ⇔  #{S_i ≥ s} ≤ (n+1)α − 1 =: j.  With j ≥ 0 the flagged region is s > S_(n−j)
        j = int(np.floor((self.n + 1) * alpha + 1e-12)) - 1
        if j < 0:
            return float("inf")
        return float(np.nextafter(self._sorted[self.n - 1 - j], np.inf))


def check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


# Scores are compared on a log scale: MI and squared distances both span orders of magnitude.
# The floor keeps an exactly-zero score (MI clamped at 0) finite without moving any real score.
LOG_FLOOR = 1e-30


@dataclass(frozen=True)
class LogScaleNormaliser:
    """A score on a robust z-scale of its log, fitted on held-out in-distribution scores.

    `upper` (high = unusual): z = (log s − median) / IQR.
    `both` (unusual either way): z = max((log s − median) / (2 (q75 − median)),
                                         (median − log s) / (2 (median − q25))),
    each side scaled by its own half of the IQR (log-distances are skewed), so a symmetric
    reference gives the same z as `upper` on the high side.

    Continuous past the reference's extremes (unlike an empirical CDF, which ties every row beyond
    them) and robust to the reference's outliers; each score in its own ID units.
    """

    score: str
    log_median: float
    log_iqr: float
    tails: Tails = "upper"
    log_lower_scale: float | None = None  # `both`: 2 (median − q25)
    log_upper_scale: float | None = None  # `both`: 2 (q75 − median)

    @classmethod
    def fit(cls, score: str, reference: NDArray[np.floating], tails: Tails = "upper") -> LogScaleNormaliser:
        logs = np.log(np.maximum(np.asarray(reference, dtype=np.float64).ravel(), LOG_FLOOR))
        if logs.size == 0 or not np.all(np.isfinite(logs)):
            raise ValueError(f"reference scores for {score!r} must be finite and non-empty")
        q25, median, q75 = np.quantile(logs, [0.25, 0.5, 0.75])
        iqr = float(q75 - q25)
        if not iqr > 0.0:  # a (near-)constant reference: fall back to the spread, then to 1
            iqr = float(logs.std()) or 1.0
        if tails == "upper":
            return cls(score=score, log_median=float(median), log_iqr=iqr)
        lower, upper = 2.0 * float(median - q25), 2.0 * float(q75 - median)
        return cls(
            score=score,
            log_median=float(median),
            log_iqr=iqr,
            tails="both",
            log_lower_scale=lower if lower > 0.0 else iqr,
            log_upper_scale=upper if upper > 0.0 else iqr,
        )

    def __call__(self, scores: NDArray[np.floating]) -> FloatArray:
        logs = np.log(np.maximum(np.asarray(scores, dtype=np.float64), LOG_FLOOR))
        if self.tails == "upper":
            out: FloatArray = (logs - self.log_median) / self.log_iqr
            return out
        upper = self.log_upper_scale or self.log_iqr
        lower = self.log_lower_scale or self.log_iqr
        both: FloatArray = np.maximum((logs - self.log_median) / upper, (self.log_median - logs) / lower)
        return both


CombinationRule = Literal["sum_pos_log_z", "max_log_z"]
COMBINATION_RULES: tuple[str, ...] = ("sum_pos_log_z", "max_log_z")


class CombinedOODScore:
    """One OOD statistic from several scores' log-scale z-values z_i (`LogScaleNormaliser`):

        sum_pos_log_z (default):  Σ_i max(z_i, 0)   — every score that is unusually high adds
        max_log_z:                max_i z_i         — the single most unusual score

    Each component is normalised on one held-out ID split; the conformal p-value of the combined
    statistic is then computed on a *different* split (the calibration split), so the combined flag
    keeps P(flag | in-distribution) ≤ α exactly — the statistic is a fixed function of the row.
    Both flag a row when *any* score is far out, so a score that is blind to a shift (MI on rows in
    the wrong unit) cannot hide what another sees. The sum also adds up scores that are each only
    moderately raised, and below-median scores cost nothing (z < 0 clips to 0), where the maximum
    lets the most extreme of three ID noises compete with every OOD row. Measured on the tuning and
    seen datasets (docs/TRAINING.md, "The OOD flag"): the sum lost less to the best single score.

    `priority` names a count that ranks ahead of the combination (`unseen_values`: the row's discrete
    columns holding a value no training row has): statistic = count + ½ + ½·S / (1 + |S|), S the
    combination. Any row with a higher count outranks any with a lower one, and within a count S
    orders the rows as before. A count is no noise to a rule that adds or maximises — it is 0 on
    almost every ID row — so it flags what it sees without diluting the scores' own families.
    """

    RULE: CombinationRule = "sum_pos_log_z"  # the default rule

    def __init__(
        self, components: list[LogScaleNormaliser], rule: str = RULE, priority: str | None = None
    ) -> None:
        if not components:
            raise ValueError("a combined OOD score needs at least one component")
        if rule not in COMBINATION_RULES:
            raise ValueError(f"unknown combination rule {rule!r}; choose from {COMBINATION_RULES}")
        if priority is not None and priority in {c.score for c in components}:
            raise ValueError(f"{priority!r} is a component; a priority count ranks ahead of them")
        self.components = components
        self.rule = rule
        self.priority = priority

    @property
    def names(self) -> tuple[str, ...]:
        """Every score the statistic reads: the components, then the priority count if any."""
        return tuple(c.score for c in self.components) + ((self.priority,) if self.priority else ())

    def __call__(self, scores: dict[str, FloatArray]) -> FloatArray:
        missing = [n for n in self.names if n not in scores]
        if missing:
            raise ValueError(f"combined OOD score needs {missing}; got {sorted(scores)}")
        z = np.stack([c(scores[c.score]) for c in self.components])
        out: FloatArray = np.maximum(z, 0.0).sum(axis=0) if self.rule == "sum_pos_log_z" else z.max(axis=0)
        if self.priority is None:
            return out
        count = np.asarray(scores[self.priority], dtype=np.float64)
        ranked: FloatArray = count + 0.5 + 0.5 * out / (1.0 + np.abs(out))
        return ranked
