"""Evaluation of the exported graphs through ONNX Runtime, with the server's own uncertainty code.

Every number here comes from running `ensemble.onnx`, `kd.onnx` and `model.onnx` in onnxruntime and
summarising their outputs with `service.uncertainty` — exactly what the server does per request.

Conventions: OOD is the positive class, higher score = more OOD. AUPR-out = average precision with
OOD positive. FPR@95TPR = false-positive rate on ID test rows at the first threshold that catches
95% of the OOD rows. ECE: 15 equal-width bins of top-label confidence. Brier: Σ_k (1[k=y] − p̄_k)²,
not divided by K. Retention = (AUROC_method − 0.5) / (AUROC_ensemble − 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from scipy.stats import rankdata, spearmanr
from sklearn.metrics import auc, average_precision_score, roc_curve

from service.uncertainty import (
    DENSITY_SCORE,
    INPUT_DENSITY_SCORE,
    UNSEEN_VALUES_SCORE,
    ClassificationUncertainty,
    CombinedOODScore,
    ConformalOODCalibrator,
    LogScaleNormaliser,
    RegressionUncertainty,
    classification_uncertainty,
    regression_uncertainty,
)
from training.data import TaskData
from training.export import (
    DENSITY_OUTPUT,
    INPUT_DENSITY_OUTPUT,
    INPUT_NAME,
    UNSEEN_VALUES_OUTPUT,
    output_names,
)

Summary = ClassificationUncertainty | RegressionUncertainty
METHODS = ("ensemble", "kd", "hydra")
GRAPH_FILES = {"ensemble": "ensemble.onnx", "kd": "kd.onnx", "hydra": "model.onnx"}
ALPHAS = (0.01, 0.05)


@dataclass
class Evaluation:
    report: dict[str, Any]
    calibration_scores: np.ndarray  # Hydra's OOD statistic on the calibration split, sorted
    summaries: dict[str, dict[str, Summary]] = field(default_factory=dict)  # method -> set -> summary
    # the served combined statistic, its components normalised on the validation split (None: no density)
    combined: CombinedOODScore | None = None


def run_graph(path: Path, x: np.ndarray, task: str) -> list[np.ndarray]:
    """The graph's contract outputs on `x`, then `density`, `input_density` and `unseen_values` where
    the graph has them."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    present = {o.name for o in session.get_outputs()}
    names = output_names(
        task, DENSITY_OUTPUT in present, INPUT_DENSITY_OUTPUT in present, UNSEEN_VALUES_OUTPUT in present
    )
    return [np.asarray(o) for o in session.run(names, {INPUT_NAME: x.astype(np.float32)})]


def graph_scores(task: str, outputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The scores a graph computes itself (`run_graph`'s outputs after the contract's), by name: the
    export order is fixed (an unseen-value count only with both densities, input typicality only
    with the body density), so position names them."""
    extra = outputs[len(output_names(task)) :]
    return {
        name: np.asarray(v, dtype=np.float64)
        for name, v in zip((DENSITY_SCORE, INPUT_DENSITY_SCORE, UNSEEN_VALUES_SCORE), extra, strict=False)
    }


def fit_combined_score(score: str, reference: dict[str, np.ndarray]) -> CombinedOODScore:
    """The served combined statistic from held-out ID rows' scores (`score` and the graph's own):
    the knowledge score and the body density one-sided, input typicality two-sided; the unseen-value
    count, where the graph has one, ranked ahead of them (`CombinedOODScore`, `priority`)."""
    return CombinedOODScore(
        [
            LogScaleNormaliser.fit(name, values, tails="both" if name == INPUT_DENSITY_SCORE else "upper")
            for name, values in reference.items()
            if name != UNSEEN_VALUES_SCORE
        ],
        priority=UNSEEN_VALUES_SCORE if UNSEEN_VALUES_SCORE in reference else None,
    )


def ood_statistics(
    u: Summary, scores: dict[str, np.ndarray], score: str, combined: CombinedOODScore | None
) -> dict[str, np.ndarray]:
    """Per-row OOD scores of one set: the uncertainty score; with the graph's densities (`scores`)
    also each of them and the combination."""
    out = {score: u.score(score)}
    if combined is not None:
        out |= scores
        out["combined"] = combined(out)
    return out


def summarise(task: str, outputs: list[np.ndarray]) -> Summary:
    if task == "classification":
        return classification_uncertainty(outputs[0])
    return regression_uncertainty(outputs[0], outputs[1])


def knowledge_score(task: str) -> str:
    """Knowledge (epistemic) uncertainty: what fidelity to the ensemble is measured on."""
    return "mutual_information" if task == "classification" else "epistemic_variance"


def retention(own_auroc: float, ensemble_auroc: float) -> float:
    """(AUROC_method − 0.5) / (AUROC_ensemble − 0.5); 0 when the ensemble is at chance."""
    return float((own_auroc - 0.5) / (ensemble_auroc - 0.5)) if ensemble_auroc != 0.5 else 0.0


def default_score(task: str, heads: int, configured: str | None) -> str:
    """The OOD score: knowledge uncertainty when there are several heads; a single head has none,
    so the KD baseline falls back to total uncertainty."""
    if heads == 1:
        return "total_entropy" if task == "classification" else "total_variance"
    return configured or knowledge_score(task)


ECE_BINS = 15


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width bins of top-label confidence; only bins holding rows. The one binning behind
    ECE and every reliability plot (training/report.py, bench/plots.py)."""

    confidence: np.ndarray  # mean confidence per bin
    accuracy: np.ndarray  # share of correct top labels per bin
    count: np.ndarray  # rows per bin

    @classmethod
    def of(cls, confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> ReliabilityBins:
        edges = np.linspace(0.0, 1.0, bins + 1)
        which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
        count = np.bincount(which, minlength=bins)
        held = count > 0
        conf = np.bincount(which, weights=confidence, minlength=bins)[held] / count[held]
        acc = np.bincount(which, weights=correct.astype(np.float64), minlength=bins)[held] / count[held]
        return cls(conf, acc, count[held])

    @property
    def ece(self) -> float:
        return float((self.count / self.count.sum() * np.abs(self.accuracy - self.confidence)).sum())


def classification_metrics(
    u: ClassificationUncertainty, y: np.ndarray, bins: int = ECE_BINS
) -> dict[str, float]:
    n = len(y)
    p_true = np.clip(u.mean_probs[np.arange(n), y], 1e-12, 1.0)
    onehot = np.eye(u.mean_probs.shape[1])[y]
    correct = (u.label == y).astype(np.float64)
    return {
        "accuracy": float(correct.mean()),
        "nll": float(-np.log(p_true).mean()),
        "ece": ReliabilityBins.of(u.confidence, correct, bins).ece,
        "brier": float(((onehot - u.mean_probs) ** 2).sum(axis=1).mean()),
    }


def regression_metrics(u: RegressionUncertainty, y: np.ndarray) -> dict[str, float]:
    var = np.maximum(u.total_variance, 1e-12)
    lo, hi = u.interval(0.95)
    return {
        "rmse": float(np.sqrt(np.mean((u.mean - y) ** 2))),
        "nll": float(np.mean(0.5 * (np.log(2 * np.pi * var) + (y - u.mean) ** 2 / var))),
        "coverage_95": float(np.mean((y >= lo) & (y <= hi))),
        "mean_interval_width": float(np.mean(hi - lo)),
    }


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    labels = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    scores = np.r_[id_scores, ood_scores]
    fpr, tpr, _ = roc_curve(labels, scores)
    return {  # auc of this curve is roc_auc_score's own computation, without its second roc_curve
        "auroc": float(auc(fpr, tpr)),
        "aupr_out": float(average_precision_score(labels, scores)),
        "fpr_at_95tpr": float(fpr[np.searchsorted(tpr, 0.95, side="left")]),
    }


def retention_interval(
    id_scores: list[np.ndarray], ood_scores: list[np.ndarray], resamples: int = 200, seed: int = 0
) -> list[float]:
    """Paired bootstrap 95% interval of AUROC retention ([ensemble, method] score arrays).

    Retention is a ratio of two AUROC margins over 0.5; when the ensemble's own margin is small
    (a hard near-OOD set) the ratio is noisy, and this interval says how noisy.
    """
    rng = np.random.default_rng(seed)
    n_id, n_ood = len(id_scores[0]), len(ood_scores[0])
    draws = [(rng.integers(0, n_id, n_id), rng.integers(0, n_ood, n_ood)) for _ in range(resamples)]
    i, o = np.stack([d[0] for d in draws]), np.stack([d[1] for d in draws])  # (resamples, n)
    ens, own = (_auroc_rows(a[i], b[o]) for a, b in zip(id_scores, ood_scores, strict=True))
    informative = ens != 0.5
    values = (own[informative] - 0.5) / (ens[informative] - 0.5)
    if not len(values):
        return [float("nan"), float("nan")]
    lo, hi = np.quantile(values, [0.025, 0.975])
    return [float(lo), float(hi)]


def _auroc_rows(id_scores: np.ndarray, ood_scores: np.ndarray) -> np.ndarray:
    """AUROC of each row pair (ID scores, OOD scores), ties counted half: the Mann-Whitney statistic,
    which is the area roc_auc_score's trapezoids add up to, for all resamples at once (one
    roc_auc_score call per resample made the bootstrap most of a smoke run's time)."""
    n_id, n_ood = id_scores.shape[1], ood_scores.shape[1]
    ranks = rankdata(np.concatenate([id_scores, ood_scores], axis=1), axis=1)  # ties: mean rank
    u: np.ndarray = ranks[:, n_id:].sum(axis=1) - n_ood * (n_ood + 1) / 2
    return u / (n_id * n_ood)


def label_agreement(ensemble: Summary, hydra: Summary) -> dict[str, Any]:
    """How often Hydra's label is the ensemble's on the test rows, and on the rows where it is not,
    the widest ensemble margin (top-1 minus top-2 mean probability). A test set of a few hundred
    rows of a hard binary task holds rows the ensemble itself calls 0.50 / 0.50: an accuracy gap
    made of those is a coin toss at the boundary, not a copy that went wrong elsewhere."""
    e, h = ensemble.mean_probs, hydra.mean_probs  # type: ignore[union-attr]
    flipped = e.argmax(axis=1) != h.argmax(axis=1)
    top2 = np.sort(e, axis=1)[:, -2:]
    margins = (top2[:, 1] - top2[:, 0])[flipped]
    return {
        "label_agreement": float(1.0 - flipped.mean()),
        "labels_flipped": int(flipped.sum()),
        "widest_flipped_margin": float(margins.max()) if margins.size else 0.0,
    }


def _uncertainty_means(u: Summary) -> dict[str, float]:
    if isinstance(u, ClassificationUncertainty):
        keys = ["total_entropy", "expected_entropy", "mutual_information", "epkl", "disagreement", "variance"]
    else:
        keys = ["aleatoric_variance", "epistemic_variance", "total_variance", "disagreement"]
    return {k: float(np.mean(getattr(u, k))) for k in keys}


def evaluate(package_dir: Path, data: TaskData, ood_score: str | None, default_alpha: float) -> Evaluation:
    task = data.task
    sets = {"test": data.test.x, "val": data.val.x, "cal": data.cal.x} | dict(data.ood.items())
    raw: dict[str, dict[str, list[np.ndarray]]] = {}
    summaries: dict[str, dict[str, Summary]] = {}
    methods: dict[str, Any] = {}
    for method in METHODS:
        path = package_dir / GRAPH_FILES[method]
        raw[method] = {name: run_graph(path, x, task) for name, x in sets.items()}
        summaries[method] = {name: summarise(task, out) for name, out in raw[method].items()}
        heads = int(raw[method]["test"][0].shape[1])
        score_name = default_score(task, heads, ood_score)
        test_u = summaries[method]["test"]
        quality = (
            classification_metrics(test_u, data.test.y)  # type: ignore[arg-type]
            if task == "classification"
            else regression_metrics(test_u, data.test.y.astype(np.float64))  # type: ignore[arg-type]
        )
        id_scores = test_u.score(score_name)
        ood = {name: ood_metrics(id_scores, summaries[method][name].score(score_name)) for name in data.ood}
        methods[method] = {
            "heads": heads,
            "ood_score": score_name,
            "test": quality,
            "uncertainty": {
                name: _uncertainty_means(u)
                for name, u in summaries[method].items()
                if name not in ("cal", "val")
            },
            "ood": ood,
        }

    hydra_score = methods["hydra"]["ood_score"]
    knowledge = knowledge_score(task)
    fidelity_sets = ["test", *data.ood]
    h_k = np.concatenate([summaries["hydra"][s].score(knowledge) for s in fidelity_sets])
    e_k = np.concatenate([summaries["ensemble"][s].score(knowledge) for s in fidelity_sets])
    rho = spearmanr(h_k, e_k).statistic
    fidelity = {
        "score": knowledge,
        "spearman": float(rho) if np.isfinite(rho) else 0.0,
        "rmse": float(np.sqrt(np.mean((h_k - e_k) ** 2))),
        "ensemble_mean": float(e_k.mean()),
    }
    if task == "classification":
        fidelity |= label_agreement(summaries["ensemble"]["test"], summaries["hydra"]["test"])
    for method in ("kd", "hydra"):
        for name in data.ood:
            ens = methods["ensemble"]["ood"][name]["auroc"]
            own = methods[method]["ood"][name]["auroc"]
            entry = methods[method]["ood"][name]
            entry["retention"] = retention(own, ens)
            entry["retention_ci95"] = retention_interval(
                [summaries[k]["test"].score(methods[k]["ood_score"]) for k in ("ensemble", method)],
                [summaries[k][name].score(methods[k]["ood_score"]) for k in ("ensemble", method)],
            )

    # The served OOD statistic: with a density, the combination normalised on the validation split
    # and calibrated on the calibration split (two different ID splits: the guarantee stays exact).
    density = {name: graph_scores(task, out) for name, out in raw["hydra"].items()}
    combined = None
    if density["val"]:
        reference = {hydra_score: summaries["hydra"]["val"].score(hydra_score)} | density["val"]
        combined = fit_combined_score(hydra_score, reference)
    statistics = {
        name: ood_statistics(summaries["hydra"][name], density[name], hydra_score, combined) for name in sets
    }
    served = "combined" if combined is not None else hydra_score
    ood_scores = {
        name: {
            k: round(ood_metrics(statistics["test"][k], v)["auroc"], 4) for k, v in statistics[name].items()
        }
        for name in data.ood
    }
    cal_scores = np.sort(statistics["cal"][served])
    calibrator = ConformalOODCalibrator(cal_scores)
    test_scores = statistics["test"][served]
    conformal = {
        "score": served,
        "components": list(combined.names) if combined is not None else [hydra_score],
        "n_calibration": calibrator.n,
        "n_test": len(test_scores),
        "false_alarm_rate": {str(a): float(calibrator.flags(test_scores, a).mean()) for a in ALPHAS},
        "ood_flag_rate": {
            name: float(calibrator.flags(statistics[name][served], default_alpha).mean()) for name in data.ood
        },
        "default_alpha": default_alpha,
    }
    report = {
        "dataset": data.name,
        "task": task,
        "sizes": {
            "train": len(data.train),
            "val": len(data.val),
            "cal": len(data.cal),
            "test": len(data.test),
        }
        | {name: len(x) for name, x in data.ood.items()},
        "ood_sets": data.ood_notes,
        "methods": methods,
        "fidelity": fidelity,
        "conformal": conformal,
        "hydra_ood_scores": ood_scores,  # per OOD set: AUROC of the score, the density, the combination
    }
    return Evaluation(
        report=report,
        calibration_scores=cal_scores,
        summaries=summaries,
        combined=combined,
    )
