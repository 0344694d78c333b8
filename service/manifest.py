"""The model package contract: `models/<name>/<version>/manifest.json`.

The service owns this schema (the consumer defines what it needs); `training/` writes it.
A manifest describes everything the server needs to run `model.onnx` — input and output
tensors, class labels, number of heads, the OOD score and its calibration — so nothing about a
model is hard-coded in the service.

Output contract of `model.onnx` (Hydra) and `ensemble.onnx` (the stacked teachers), identical:
  classification: one output, per-head log-probabilities, shape (batch, heads, classes)
  regression:     two outputs, per-head means and variances, shape (batch, heads) each,
                  in the original target units (target scaling is baked into the graph)
Inputs are raw features: feature standardisation is baked into the graph too.

Schema version 2 adds an optional feature-density output (`outputs.density`, shape (batch,): the
class-conditional Mahalanobis distance of the row's shared-body features, training/density.py) and
a combined OOD score (`ood.components` + `ood.combination`): the calibration scores are then the
combined statistic's. Version 1 packages (one score, no density) load and serve as before.

Schema version 3 adds an optional unseen-value count (`outputs.unseen_values`, shape (batch,): how
many of the row's discrete columns hold a value no training row has, training/density.py) that the
combined statistic ranks ahead of its components (`ood.priority`). Versions 1 and 2 load as before.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cached_property
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.uncertainty import (
    CLASSIFICATION_SCORES,
    DENSITY_SCORE,
    INPUT_DENSITY_SCORE,
    REGRESSION_SCORES,
    UNSEEN_VALUES_SCORE,
    CombinedOODScore,
    LogScaleNormaliser,
)

MANIFEST_FILENAME = "manifest.json"
SCHEMA_VERSION: Literal[3] = 3
COMBINED_SCORE = "combined"

Task = Literal["classification", "regression"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One ONNX graph input or output. `-1` marks a variable dimension (the batch axis)."""

    name: str = Field(min_length=1)
    shape: list[int] = Field(description="Dimensions; -1 for variable (batch) dimensions.")
    dtype: Literal["float32", "float64", "int64"] = "float32"

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: list[int]) -> list[int]:
        if not shape or any(d == 0 or d < -1 for d in shape):
            raise ValueError(f"shape must be non-empty with dims > 0 or -1, got {shape}")
        return shape


class OutputNames(_Strict):
    """Which graph outputs carry what. Classification sets `log_probs`; regression `mean` and `variance`."""

    log_probs: str | None = Field(default=None, description="(batch, heads, classes) log-probabilities")
    mean: str | None = Field(default=None, description="(batch, heads) Gaussian means")
    variance: str | None = Field(default=None, description="(batch, heads) Gaussian variances")
    density: str | None = Field(
        default=None, description="(batch,) feature-density score: Mahalanobis distance² on the body"
    )
    input_density: str | None = Field(
        default=None, description="(batch,) input typicality: Mahalanobis distance² of the standardised row"
    )
    unseen_values: str | None = Field(
        default=None,
        description="(batch,) how many of the row's discrete columns hold a value no training row has",
    )


class OODComponent(_Strict):
    """One score inside a combined OOD statistic, with its log-scale normalisation (z = (log s − m) / iqr)."""

    score: str = Field(description="An uncertainty score of the task, `density` or `input_density`.")
    log_median: float
    log_iqr: float = Field(gt=0.0)
    tails: Literal["upper", "both"] = Field(
        default="upper", description="upper: high is unusual; both: unusually high or low (typicality)."
    )
    log_lower_scale: float | None = Field(default=None, gt=0.0, description="both: 2 (median − q25) of log s")
    log_upper_scale: float | None = Field(default=None, gt=0.0, description="both: 2 (q75 − median) of log s")
    fitted_on: str = Field(default="", description="Which held-out split the normalisation was fitted on.")

    @classmethod
    def from_normaliser(cls, n: LogScaleNormaliser, fitted_on: str = "") -> OODComponent:
        return cls(**dataclasses.asdict(n), fitted_on=fitted_on)

    def normaliser(self) -> LogScaleNormaliser:
        return LogScaleNormaliser(**self.model_dump(exclude={"fitted_on"}))


class OODCalibration(_Strict):
    """Conformal OOD calibration: scores of held-out in-distribution inputs, sorted ascending.

    With `components`, `score` is `combined` and the calibration scores are the combined statistic's
    (computed on a split other than the one the components were normalised on)."""

    score: str = Field(description="Name of the uncertainty score used as OOD score (higher = more OOD).")
    components: list[OODComponent] = Field(default_factory=list)
    combination: Literal["sum_pos_log_z", "max_log_z"] | None = Field(
        default=None,
        description="How components combine: sum_pos_log_z = Σ max(z, 0) of the normalised log-scores; "
        "max_log_z = the largest of them.",
    )
    priority: Literal["unseen_values"] | None = Field(
        default=None,
        description="A count ranked ahead of the combination: statistic = count + 1/2 + S / (2 (1 + |S|)), "
        "S the combination (schema 3).",
    )
    calibration_scores: list[float] = Field(min_length=1)
    default_alpha: float = Field(default=0.05, gt=0.0, lt=1.0, description="Flag when p-value <= alpha.")

    @field_validator("calibration_scores")
    @classmethod
    def _sorted_finite(cls, scores: list[float]) -> list[float]:
        if any(b < a for a, b in pairwise(scores)):
            raise ValueError("calibration_scores must be sorted ascending")
        if any(s != s or s in (float("inf"), float("-inf")) for s in scores):
            raise ValueError("calibration_scores must be finite")
        return scores

    @model_validator(mode="after")
    def _combined(self) -> OODCalibration:
        if self.components:
            if self.score != COMBINED_SCORE or self.combination is None:
                raise ValueError("ood.components need ood.score 'combined' and an ood.combination")
            names = [c.score for c in self.components]
            if len(set(names)) != len(names):
                raise ValueError(f"ood.components repeat a score: {names}")
        elif self.score == COMBINED_SCORE or self.combination is not None or self.priority is not None:
            raise ValueError("ood.score 'combined' / ood.combination / ood.priority need ood.components")
        return self

    @cached_property
    def combiner(self) -> CombinedOODScore | None:
        """The combined statistic, or None when the OOD score is one score as in schema version 1.

        Built once per loaded manifest: `inference.summarise` reads it for every executed batch."""
        if not self.components:
            return None
        rule = self.combination or CombinedOODScore.RULE
        return CombinedOODScore([c.normaliser() for c in self.components], rule=rule, priority=self.priority)

    @property
    def score_names(self) -> tuple[str, ...]:
        """The scores the OOD statistic reads (one, or the components and the priority count)."""
        if not self.components:
            return (self.score,)
        return tuple(c.score for c in self.components) + ((self.priority,) if self.priority else ())


class Provenance(_Strict):
    model_config = ConfigDict(extra="allow", frozen=True)

    dataset: str
    data_sha256: str | None = None
    seed: int | None = None
    git_commit: str | None = None
    created_at: str | None = None
    training_seconds: float | None = None
    packages: dict[str, str] = Field(default_factory=dict)


class ModelManifest(_Strict):
    schema_version: Literal[1, 2, 3] = SCHEMA_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    version: int = Field(ge=1)
    task: Task
    description: str = ""
    input: TensorSpec
    feature_names: list[str] | None = None
    labels: list[str] | None = Field(default=None, description="Class names, index = class id.")
    heads: int = Field(ge=1, description="Number of heads (ensemble members imitated).")
    outputs: OutputNames
    temperature: float = Field(default=1.0, gt=0.0, description="Distillation temperature (informational).")
    ood: OODCalibration
    evaluation: dict[str, Any] = Field(default_factory=dict, description="Summary of the evaluation report.")
    provenance: Provenance

    @model_validator(mode="after")
    def _consistent(self) -> ModelManifest:
        if self.input.shape[0] != -1:
            raise ValueError("input shape must start with the variable batch dimension -1")
        has_graph_scores = self.outputs.density is not None or self.outputs.input_density is not None
        if self.schema_version < 2 and (has_graph_scores or self.ood.components):
            raise ValueError(
                "outputs.density, outputs.input_density and ood.components need schema_version 2"
            )
        if self.schema_version < 3 and (self.outputs.unseen_values is not None or self.ood.priority):
            raise ValueError("outputs.unseen_values and ood.priority need schema_version 3")
        if self.task == "classification":
            if self.outputs.log_probs is None:
                raise ValueError("classification manifest needs outputs.log_probs")
            if not self.labels or len(self.labels) < 2:
                raise ValueError("classification manifest needs at least two labels")
            known: tuple[str, ...] = CLASSIFICATION_SCORES
        else:
            if self.outputs.mean is None or self.outputs.variance is None:
                raise ValueError("regression manifest needs outputs.mean and outputs.variance")
            known = REGRESSION_SCORES
        for graph_score, output in (
            (DENSITY_SCORE, self.outputs.density),
            (INPUT_DENSITY_SCORE, self.outputs.input_density),
            (UNSEEN_VALUES_SCORE, self.outputs.unseen_values),
        ):
            if output is not None:
                known = (*known, graph_score)
            elif graph_score in self.ood.score_names:
                raise ValueError(
                    f"ood score {graph_score!r} reads the {graph_score} graph output: "
                    f"outputs.{graph_score} is not set"
                )
        for score in self.ood.score_names:
            if score not in known:
                raise ValueError(f"ood score {score!r} not in {known}")
        if self.feature_names is not None:
            n_features = 1
            for d in self.input.shape[1:]:
                n_features *= d
            if len(self.feature_names) != n_features:
                raise ValueError(
                    f"{len(self.feature_names)} feature_names for an input of {n_features} features"
                )
        return self

    @property
    def has_density(self) -> bool:
        return self.outputs.density is not None

    @property
    def has_input_density(self) -> bool:
        return self.outputs.input_density is not None

    @property
    def has_unseen_values(self) -> bool:
        return self.outputs.unseen_values is not None

    @property
    def num_classes(self) -> int | None:
        return len(self.labels) if self.labels else None

    @property
    def row_shape(self) -> tuple[int, ...]:
        """Shape of one input row (the input shape without its batch axis)."""
        return tuple(self.input.shape[1:])

    @classmethod
    def load(cls, path: Path) -> ModelManifest:
        """Read and validate a manifest file (a directory means `<dir>/manifest.json`)."""
        if path.is_dir():
            path = path / MANIFEST_FILENAME
        return cls.model_validate(json.loads(path.read_text()))

    def dump(self, path: Path) -> None:
        if path.is_dir():
            path = path / MANIFEST_FILENAME
        path.write_text(self.model_dump_json(indent=2) + "\n")
