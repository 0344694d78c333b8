"""From raw head outputs to the named answer tensors of the serving contract (docs/SERVING.md).

Two steps, both vectorised over the batch:
- `summarise` (once per executed batch, in the worker thread): everything that does not depend on
  request parameters — mean prediction, uncertainty scores, OOD score and conformal p-value,
  per-head outputs. Float64 until the end.
- `finalise` (per request, on its slice of the batch): the parts that depend on the request's α and
  interval level, dropping per-head tensors unless asked, casting to the contract's dtypes.

The math is `service.uncertainty`, the same module the training evaluation uses.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.batch_request import RowSlice
from service.manifest import ModelManifest
from service.protocol.v2_types import NUMPY_DTYPES
from service.uncertainty import (
    DENSITY_SCORE,
    INPUT_DENSITY_SCORE,
    UNSEEN_VALUES_SCORE,
    ClassificationUncertainty,
    ConformalOODCalibrator,
    FloatArray,
    RegressionUncertainty,
    classification_uncertainty,
    gaussian_interval,
    regression_uncertainty,
)

Tensors = dict[str, NDArray[np.generic]]

# (name, V2 datatype, shape after the batch axis) — order is the order of answers.
_CLASSIFICATION_SCALARS = (
    "label",
    "label_name",
    "confidence",
    "variance",
    "disagreement",
    "mutual_information",
    "expected_entropy",
    "total_entropy",
    "epkl",
    "density_score",
    "input_density_score",
    "unseen_values",
    "ood_score",
    "ood_p_value",
    "ood_flag",
    "ood_alpha",
)
_REGRESSION_SCALARS = (
    "mean",
    "variance",
    "aleatoric_variance",
    "epistemic_variance",
    "total_variance",
    "disagreement",
    "density_score",
    "input_density_score",
    "unseen_values",
    "interval_lower",
    "interval_upper",
    "interval_level",
    "ood_score",
    "ood_p_value",
    "ood_flag",
    "ood_alpha",
)
_DATATYPES = {"label": "INT64", "label_name": "BYTES", "ood_flag": "BOOL", "unseen_values": "INT64"}
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT64_LOWEST = float(np.finfo(np.float64).min)
# scores the graph outputs itself, by the answer name each is served under
GRAPH_SCORES = {
    DENSITY_SCORE: "density_score",
    INPUT_DENSITY_SCORE: "input_density_score",
    UNSEEN_VALUES_SCORE: "unseen_values",
}
CLASSIFICATION_HEAD_OUTPUTS = ("heads",)
REGRESSION_HEAD_OUTPUTS = ("heads_mean", "heads_variance")


def scalar_outputs(manifest: ModelManifest) -> tuple[str, ...]:
    """The per-row answer names of this model, in answer order (density scores where the graph has them)."""
    return _scalars(manifest.task, _graph_outputs(manifest))


GraphOutputs = tuple[bool, bool, bool]  # has density, input_density, unseen_values


def _graph_outputs(manifest: ModelManifest) -> GraphOutputs:
    return manifest.has_density, manifest.has_input_density, manifest.has_unseen_values


@functools.cache
def _scalars(task: str, graph_outputs: GraphOutputs) -> tuple[str, ...]:
    names = _CLASSIFICATION_SCALARS if task == "classification" else _REGRESSION_SCALARS
    absent = {
        n
        for n, present in zip(
            ("density_score", "input_density_score", "unseen_values"), graph_outputs, strict=True
        )
        if not present
    }
    return tuple(n for n in names if n not in absent)


def output_specs(manifest: ModelManifest) -> list[tuple[str, str, list[int]]]:
    """Every output tensor a model can answer with: (name, V2 datatype, shape with -1 for the batch)."""
    m = manifest.heads
    scalars = [(n, _DATATYPES.get(n, "FP32"), [-1]) for n in scalar_outputs(manifest)]
    if manifest.task == "classification":
        k = manifest.num_classes or 0
        return [("probabilities", "FP32", [-1, k]), *scalars, ("heads", "FP32", [-1, m, k])]
    return [*scalars, ("heads_mean", "FP32", [-1, m]), ("heads_variance", "FP32", [-1, m])]


def ood_statistic(
    manifest: ModelManifest,
    u: ClassificationUncertainty | RegressionUncertainty,
    graph_scores: Mapping[str, FloatArray],
) -> FloatArray:
    """The manifest's OOD score for each row: one uncertainty score, or the combined statistic.

    `graph_scores`: the scores the graph computes itself (`density`, `input_density`, `unseen_values`)."""
    combiner = manifest.ood.combiner
    if combiner is None:
        return u.score(manifest.ood.score)
    missing = [n for n in combiner.names if n in GRAPH_SCORES and n not in graph_scores]
    if missing:
        raise ValueError(f"the combined OOD score reads graph outputs {missing}, which this graph lacks")
    return combiner({n: graph_scores[n] if n in GRAPH_SCORES else u.score(n) for n in combiner.names})


def _finite_density(density: NDArray[np.floating]) -> FloatArray:
    """The density output in float64, overflow replaced by the largest float32.

    A finite row far enough out (|x| ~ 1e20) overflows the graph's float32 squared distance to inf (or
    NaN, inf − inf in the whitening): that row is as far from the data as it gets. Left as is, the
    density and the combined `ood_score` would be non-finite and JSON would answer them as null."""
    # fmin takes the number where one side is NaN; two ufuncs cost a quarter of nan_to_num per batch
    clipped = np.fmin(np.asarray(density, dtype=np.float64), _FLOAT32_MAX)  # NaN, +inf -> largest
    out: FloatArray = np.fmax(clipped, _FLOAT64_LOWEST)  # -inf -> lowest float64, as nan_to_num did
    return out


def head_output_names(manifest: ModelManifest) -> tuple[str, ...]:
    return CLASSIFICATION_HEAD_OUTPUTS if manifest.task == "classification" else REGRESSION_HEAD_OUTPUTS


def summarise(
    manifest: ModelManifest, calibrator: ConformalOODCalibrator, raw: Mapping[str, NDArray[np.floating]]
) -> Tensors:
    """Per-batch summaries from raw graph outputs (`log_probs`, or `mean` + `variance`; densities)."""
    graph_scores = {name: _finite_density(raw[name]) for name in GRAPH_SCORES if name in raw}
    extra: Tensors = {GRAPH_SCORES[name]: v for name, v in graph_scores.items()}
    if manifest.task == "classification":
        log_p = np.asarray(raw["log_probs"], dtype=np.float64)  # (batch, heads, classes)
        u = classification_uncertainty(log_p)
        score = ood_statistic(manifest, u, graph_scores)
        labels = np.asarray(manifest.labels, dtype=object)
        return extra | {
            "probabilities": u.mean_probs,
            "label": u.label,
            "label_name": labels[u.label],
            "confidence": u.confidence,
            "variance": u.variance,
            "disagreement": u.disagreement,
            "mutual_information": u.mutual_information,
            "expected_entropy": u.expected_entropy,
            "total_entropy": u.total_entropy,
            "epkl": u.epkl,
            "ood_score": score,
            "ood_p_value": calibrator.p_values(score),
            "heads": u.head_probs,  # renormalised exactly as the summaries above saw them
        }
    mu = np.asarray(raw["mean"], dtype=np.float64)  # (batch, heads)
    var = np.asarray(raw["variance"], dtype=np.float64)
    r = regression_uncertainty(mu, var)
    score = ood_statistic(manifest, r, graph_scores)
    return extra | {
        "mean": r.mean,
        "variance": r.epistemic_variance,
        "aleatoric_variance": r.aleatoric_variance,
        "epistemic_variance": r.epistemic_variance,
        "total_variance": r.total_variance,
        "disagreement": r.disagreement,
        "ood_score": score,
        "ood_p_value": calibrator.p_values(score),
        "heads_mean": mu,
        "heads_variance": var,
    }


def answer_order(manifest: ModelManifest, include_heads: bool = False) -> tuple[str, ...]:
    """Every answer tensor of this model, in answer order (the per-head ones with `include_heads`)."""
    return _answer_order(manifest.task, _graph_outputs(manifest), include_heads)


@functools.cache
def _answer_order(task: str, graph_outputs: GraphOutputs, heads: bool) -> tuple[str, ...]:
    order = _scalars(task, graph_outputs)
    if task == "classification":
        order = ("probabilities", *order)
    if heads:
        order = (
            *order,
            *(CLASSIFICATION_HEAD_OUTPUTS if task == "classification" else REGRESSION_HEAD_OUTPUTS),
        )
    return order


def finalise(
    manifest: ModelManifest,
    summary: Mapping[str, NDArray[np.generic]],
    *,
    alpha: float,
    level: float = 0.95,
    include_heads: bool = False,
    only: Collection[str] | None = None,
) -> Tensors:
    """The answer tensors for one request's rows (a slice of `summarise`'s output), contract dtypes;
    `only`: just these names (the outputs a request asked for), the rest neither computed nor cast.
    `alpha` and `level` in (0, 1): the request edges (V1's body model, `service.v2_core`) checked them."""
    order = answer_order(manifest, include_heads)
    if only is not None:
        order = tuple(name for name in order if name in only)
    n = next(iter(summary.values())).shape[0]
    interval: tuple[FloatArray, FloatArray] | None = None
    out: Tensors = {}
    for name in order:
        dtype = _dtype(name)
        if name == "ood_flag":  # the conformal rule: flag when p ≤ α
            value: NDArray[np.generic] = np.asarray(summary["ood_p_value"], dtype=np.float64) <= alpha
        elif name == "ood_alpha":
            value = np.full(n, alpha, dtype=np.float32)
        elif name == "interval_level":
            value = np.full(n, level, dtype=np.float32)
        elif name in ("interval_lower", "interval_upper"):
            if interval is None:
                interval = gaussian_interval(
                    np.asarray(summary["mean"], dtype=np.float64),
                    np.asarray(summary["total_variance"], dtype=np.float64),
                    level,
                )
            value = interval[0] if name == "interval_lower" else interval[1]
        elif isinstance(summary, RowSlice):  # a request's rows of a batch: converted once per batch
            value = summary.cast(name, dtype)
        else:
            value = summary[name]
        out[name] = np.asarray(value, dtype=dtype)
    return out


def _dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype answer `name` is sent in (BYTES: a Python str per element; codecs encode UTF-8)."""
    return NUMPY_DTYPES[_DATATYPES.get(name, "FP32")]
