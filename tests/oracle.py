"""The answers a model package should give, written from the definitions alone.

An independent oracle for the tests: plain numpy (and scipy's special functions) from the
formulas in `../shared/reference/uncertainty.md` and the answer contract of docs/SERVING.md,
reading the manifest as plain JSON. It deliberately imports nothing from `service`, so a test that
compares the server with it checks the server's maths, not only its routing. Written for clarity
over speed: pairwise KL divergences are summed as defined, the conformal rank is counted by direct
comparison with every calibration score.

Classification (per-head log-probabilities, (batch, M, K)):
  p̄ = (1/M) Σ_m p_m;  H[p̄] = −Σ_k p̄_k log p̄_k;  expected entropy = (1/M) Σ_m H[p_m];
  MI = H[p̄] − expected entropy (≥ 0);  EPKL = (1/M²) Σ_{m,m'} KL(p_m ‖ p_m');
  disagreement = (1/M) Σ_m 1[argmax p_m ≠ argmax p̄];  variance = Var_m p_m,k at k = argmax p̄.
Regression (per-head means μ_m and variances σ²_m, (batch, M)):
  mean μ* = (1/M) Σ μ_m;  aleatoric = (1/M) Σ σ²_m;  epistemic = (1/M) Σ μ²_m − μ*²;
  total = aleatoric + epistemic;  disagreement = √epistemic;  `variance` answers the epistemic one;
  interval = μ* ± z_{(1+level)/2} √total (Gaussian approximation of the mixture).
OOD: the manifest's score, or the combined statistic Σ_i max(z_i, 0) (or max_i z_i) of log-scale
z-values z = (log s − median) / iqr (two-sided components: the larger of the two one-sided
z-values, each side with its own scale); with a priority count c (`unseen_values`, schema 3) the
statistic is c + 1/2 + S / (2 (1 + |S|)); p = (1 + #{i : S_i ≥ s}) / (n + 1); flag when p ≤ α.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy import special, stats

FLOAT32_MAX = float(np.finfo(np.float32).max)
LOG_FLOOR = 1e-30  # a zero score (MI clamped at 0) on the log scale: finite, below every real score
# scores the graph outputs itself -> the name each is answered under
GRAPH_SCORES = {
    "density": "density_score",
    "input_density": "input_density_score",
    "unseen_values": "unseen_values",
}

# The answer contract (docs/SERVING.md): name -> numpy dtype of the answer tensor.
_DTYPES: dict[str, Any] = {
    "label": np.int64,
    "label_name": object,
    "ood_flag": np.bool_,
    "unseen_values": np.int64,
}


def read_manifest(directory: Path) -> dict[str, Any]:
    """`<directory>/manifest.json` as plain JSON (no validation: the oracle trusts the test's files)."""
    manifest: dict[str, Any] = json.loads((Path(directory) / "manifest.json").read_text())
    return manifest


# ----------------------------------------------------------------------------------- classification


def classification(head_log_probs: np.ndarray) -> dict[str, np.ndarray]:
    """The classification summaries of (batch, M, K) log-probabilities, float64."""
    log_p = np.asarray(head_log_probs, dtype=np.float64)
    log_p = log_p - special.logsumexp(log_p, axis=-1, keepdims=True)  # rows sum to one
    p = np.exp(log_p)  # (batch, M, K)
    batch, heads, _ = p.shape
    p_bar = p.mean(axis=1)  # (batch, K)
    total = -special.xlogy(p_bar, p_bar).sum(axis=-1)
    head_entropy = -np.where(p > 0, p * log_p, 0.0).sum(axis=-1)  # (batch, M)
    expected = head_entropy.mean(axis=1)
    mutual_information = np.maximum(total - expected, 0.0)
    # KL(p_m ‖ p_m') for every ordered pair: (batch, M, M)
    with np.errstate(invalid="ignore"):
        log_ratio = log_p[:, :, None, :] - log_p[:, None, :, :]
        kl = np.where(p[:, :, None, :] > 0, p[:, :, None, :] * log_ratio, 0.0).sum(axis=-1)
    epkl = kl.sum(axis=(1, 2)) / heads**2
    label = p_bar.argmax(axis=1)
    rows = np.arange(batch)
    at_label = p[rows, :, label]  # (batch, M): each head's probability of the mean's label
    return {
        "probabilities": p_bar,
        "label": label,
        "confidence": p_bar[rows, label],
        "variance": ((at_label - at_label.mean(axis=1, keepdims=True)) ** 2).mean(axis=1),
        "disagreement": (p.argmax(axis=2) != label[:, None]).mean(axis=1),
        "mutual_information": mutual_information,
        "expected_entropy": expected,
        "total_entropy": total,
        "epkl": np.where(np.isfinite(epkl), epkl, np.inf),
        "heads": p,
    }


# --------------------------------------------------------------------------------------- regression


def regression(head_means: np.ndarray, head_variances: np.ndarray) -> dict[str, np.ndarray]:
    """The regression summaries of (batch, M) Gaussian means and variances, float64."""
    mu = np.asarray(head_means, dtype=np.float64)
    var = np.asarray(head_variances, dtype=np.float64)
    mean = mu.mean(axis=1)
    aleatoric = var.mean(axis=1)
    epistemic = np.maximum((mu**2).mean(axis=1) - mean**2, 0.0)
    return {
        "mean": mean,
        "variance": epistemic,
        "aleatoric_variance": aleatoric,
        "epistemic_variance": epistemic,
        "total_variance": aleatoric + epistemic,
        "disagreement": np.sqrt(epistemic),
        "heads_mean": mu,
        "heads_variance": var,
    }


def interval(mean: np.ndarray, total_variance: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """The central `level` interval of N(mean, total variance)."""
    half = stats.norm.ppf((1.0 + level) / 2.0) * np.sqrt(total_variance)
    return mean - half, mean + half


# ---------------------------------------------------------------------------------------------- OOD


def log_z(component: dict[str, Any], scores: np.ndarray) -> np.ndarray:
    """A component's log-scale z-value (manifest `ood.components[i]`)."""
    logs = np.log(np.maximum(np.asarray(scores, dtype=np.float64), LOG_FLOOR))
    median, iqr = component["log_median"], component["log_iqr"]
    if component.get("tails", "upper") == "upper":
        return (logs - median) / iqr
    upper = component.get("log_upper_scale") or iqr
    lower = component.get("log_lower_scale") or iqr
    return np.maximum((logs - median) / upper, (median - logs) / lower)


def fit_component(score: str, reference: np.ndarray, tails: str = "upper") -> dict[str, Any]:
    """The manifest fields of a component normalised on `reference` (median and quartiles of log s)."""
    logs = np.log(np.maximum(np.asarray(reference, dtype=np.float64), LOG_FLOOR))
    q25, median, q75 = np.quantile(logs, [0.25, 0.5, 0.75])
    fields = {"score": score, "log_median": float(median), "log_iqr": float(q75 - q25), "tails": tails}
    if tails == "both":
        fields |= {"log_lower_scale": 2.0 * float(median - q25), "log_upper_scale": 2.0 * float(q75 - median)}
    return fields


def ood_score(ood: dict[str, Any], scores: dict[str, np.ndarray]) -> np.ndarray:
    """The manifest's OOD statistic from the named per-row scores (uncertainty and graph scores)."""
    components = ood.get("components") or []
    if not components:
        return np.asarray(scores[ood["score"]], dtype=np.float64)
    z = np.stack([log_z(c, scores[c["score"]]) for c in components])  # (components, batch)
    if ood.get("combination", "sum_pos_log_z") == "max_log_z":
        combined = z.max(axis=0)
    else:
        combined = np.maximum(z, 0.0).sum(axis=0)
    if not ood.get("priority"):
        return combined
    count = np.asarray(scores[ood["priority"]], dtype=np.float64)
    return count + 0.5 + 0.5 * combined / (1.0 + np.abs(combined))


# A row of the calibration split scores exactly its stored S_i on the server (the same code made
# both); the oracle's own arithmetic can land a few ulps above it. Ties are counted within this
# relative tolerance, far below any score difference that means something.
TIE_TOLERANCE = 1e-9


def p_values(calibration_scores: list[float], scores: np.ndarray) -> np.ndarray:
    """Conformal p-values: p(s) = (1 + #{i : S_i ≥ s}) / (n + 1), counted against every S_i."""
    calibration = np.asarray(calibration_scores, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)[:, None]
    at_least = (calibration[None, :] >= s - TIE_TOLERANCE * np.maximum(1.0, np.abs(s))).sum(axis=1)
    return (1.0 + at_least) / (len(calibration) + 1.0)


def graph_score(values: np.ndarray) -> np.ndarray:
    """A density output as answered: float64, float32 overflow (inf, NaN) as the largest float32."""
    out = np.asarray(values, dtype=np.float64).copy()
    out[~np.isfinite(out)] = FLOAT32_MAX
    return out


# ------------------------------------------------------------------------------------------- answer


def answer(
    manifest: dict[str, Any],
    raw: dict[str, np.ndarray],
    *,
    alpha: float | None = None,
    level: float = 0.95,
    heads: bool = False,
) -> dict[str, np.ndarray]:
    """Every answer tensor for rows whose graph outputs are `raw` (by role: `log_probs`, or `mean`
    and `variance`; `density`, `input_density`, `unseen_values` where the graph has them), in the
    contract's dtypes."""
    ood = manifest["ood"]
    alpha = ood.get("default_alpha", 0.05) if alpha is None else alpha
    graph = {name: graph_score(raw[name]) for name in GRAPH_SCORES if name in raw}
    if manifest["task"] == "classification":
        out = classification(raw["log_probs"])
        out["label_name"] = np.asarray(manifest["labels"], dtype=object)[out["label"]]
        head_names: tuple[str, ...] = ("heads",)
    else:
        out = regression(raw["mean"], raw["variance"])
        out["interval_lower"], out["interval_upper"] = interval(out["mean"], out["total_variance"], level)
        out["interval_level"] = np.full(len(out["mean"]), level)
        head_names = ("heads_mean", "heads_variance")
    score = ood_score(ood, out | graph)
    p = p_values(ood["calibration_scores"], score)
    out |= {GRAPH_SCORES[name]: value for name, value in graph.items()}
    out |= {"ood_score": score, "ood_p_value": p, "ood_flag": p <= alpha, "ood_alpha": np.full(len(p), alpha)}
    if not heads:
        out = {k: v for k, v in out.items() if k not in head_names}
    return {k: np.asarray(v, dtype=_DTYPES.get(k, np.float32)) for k, v in out.items()}
