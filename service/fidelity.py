"""Fidelity of Hydra's served uncertainty to its ensemble's, on the same rows: what the shadow
teacher (service/shadow.py) compares, and the rolling window it keeps.

- `Sample`: rows picked from one served batch with Hydra's summaries for them (`pick`);
- `FidelityWindow`: the last `size` compared rows and their measures —
  `mi_spearman`, Spearman rank correlation of Hydra's and the ensemble's epistemic score (mutual
  information; for regression the epistemic variance); `label_agreement`, the share of rows where
  Hydra's top label is the ensemble's (regression: where |Hydra mean − ensemble mean| ≤ the
  ensemble's predictive sd, √ total variance); `mi_ratio`, mean Hydra epistemic score / mean
  ensemble epistemic score (1 = same scale).

Plain numpy, no locks: the shadow teacher owns the window and guards it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

MEASURES = ("mi_spearman", "label_agreement", "mi_ratio")
# Fewer compared rows than this: the window's measures are not exported (a rank correlation of a
# handful of rows is noise, and an alert on it would be too).
MIN_ROWS = 50

FloatArray = NDArray[np.float64]


def spearman(a: NDArray[np.floating], b: NDArray[np.floating]) -> float:
    """Spearman's rank correlation with average ranks for ties (NaN when either side is constant)."""
    ra, rb = _average_ranks(np.asarray(a, np.float64)), _average_ranks(np.asarray(b, np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0.0 else float("nan")


def _average_ranks(x: FloatArray) -> FloatArray:
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # ties: every run of equal values gets the mean of its positions
    starts = np.flatnonzero(np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]]))
    ends = np.concatenate([starts[1:], [x.size]])
    mean_rank = (starts + ends - 1) / 2.0
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


@dataclass(frozen=True)
class Sample:
    """Rows picked from one executed batch and Hydra's served summaries for them."""

    rows: NDArray[np.float32]
    epistemic: FloatArray  # Hydra's MI (classification) or epistemic variance (regression)
    label: NDArray[np.int64] | None  # classification: Hydra's top label
    mean: FloatArray | None  # regression: Hydra's mean

    @staticmethod
    def joined(samples: list[Sample]) -> Sample:
        """One sample of every row of `samples`, in order (one ensemble run for all of them)."""
        if len(samples) == 1:
            return samples[0]
        first = samples[0]
        return Sample(
            rows=np.concatenate([s.rows for s in samples]),
            epistemic=np.concatenate([s.epistemic for s in samples]),
            label=None
            if first.label is None
            else np.concatenate([s.label for s in samples if s.label is not None]),
            mean=None
            if first.mean is None
            else np.concatenate([s.mean for s in samples if s.mean is not None]),
        )


def pick(
    rng: np.random.Generator,
    fraction: float,
    inputs: NDArray[np.float32],
    summary: Mapping[str, NDArray[np.generic]],
    task: str,
) -> Sample | None:
    """Each row of the batch with probability `fraction`; None when none is picked."""
    n = int(inputs.shape[0])
    chosen = np.arange(n) if fraction >= 1.0 else np.flatnonzero(rng.random(n) < fraction)
    if chosen.size == 0:
        return None
    if task == "classification":
        return Sample(
            rows=np.ascontiguousarray(inputs[chosen]),
            epistemic=np.asarray(summary["mutual_information"], np.float64)[chosen],
            label=np.asarray(summary["label"], np.int64)[chosen],
            mean=None,
        )
    return Sample(
        rows=np.ascontiguousarray(inputs[chosen]),
        epistemic=np.asarray(summary["epistemic_variance"], np.float64)[chosen],
        label=None,
        mean=np.asarray(summary["mean"], np.float64)[chosen],
    )


class FidelityWindow:
    """The last `size` compared rows: Hydra's and the ensemble's epistemic scores, and whether the
    two agree on the point prediction."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._hydra: deque[float] = deque(maxlen=size)
        self._teacher: deque[float] = deque(maxlen=size)
        self._agree: deque[bool] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._hydra)

    def add(self, hydra: FloatArray, teacher: FloatArray, agree: NDArray[np.bool_]) -> None:
        self._hydra.extend(hydra.tolist())
        self._teacher.extend(teacher.tolist())
        self._agree.extend(agree.tolist())

    def measures(self) -> dict[str, float] | None:
        """The window's measures; None while it holds fewer than min(MIN_ROWS, size) rows."""
        n = len(self._hydra)
        if n < min(MIN_ROWS, self.size):
            return None
        hydra = np.fromiter(self._hydra, np.float64, n)
        teacher = np.fromiter(self._teacher, np.float64, n)
        teacher_mean = float(teacher.mean())
        return {
            "mi_spearman": spearman(hydra, teacher),
            "label_agreement": float(np.mean(np.fromiter(self._agree, bool, n))),
            "mi_ratio": float(hydra.mean() / teacher_mean) if teacher_mean > 0.0 else float("nan"),
        }
