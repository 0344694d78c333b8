"""The user's own ONNX teachers in the pipeline (`python -m training run --teachers PATH…`).

`training/onnx_teachers/` checks, runs and stacks the files; this module is the glue the stages
use: which files a run distils (`teacher_specs`), the teachers as the distillation's labeller in
its training space (`OnnxLabeller`), labels for a `--data` file without a target column
(`label_function`), and the provenance the manifest records (`provenance`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from training.config import RunConfig
from training.data import LabelFn, TaskData
from training.models import MIN_VARIANCE
from training.onnx_teachers import OnnxTeachers, TeacherSpec, find_teacher_files, inspect_teachers

SPECS_FILE = "teachers.json"  # in the run directory: what was inspected, with hashes


def teacher_specs(cfg: RunConfig) -> list[TeacherSpec]:
    """Inspect the run's teacher files (errors name the file and the mismatch)."""
    files = find_teacher_files([Path(p) for p in cfg.external.paths])
    task = cfg.data.task
    if task not in ("classification", "regression"):
        raise ValueError("--teachers needs --task classification or regression")
    output = cfg.external.output
    if output not in (None, "logits", "probs"):
        raise ValueError(f"--teacher-output must be logits or probs, got {output!r}")
    return inspect_teachers(files, task, teacher_output=output)  # type: ignore[arg-type]


def save_specs(specs: list[TeacherSpec], run_dir: Path, seconds: float) -> dict[str, Any]:
    info = {"seconds": seconds, "teachers": provenance(specs)}
    (run_dir / SPECS_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def provenance(specs: list[TeacherSpec]) -> list[dict[str, Any]]:
    return [
        {
            "file": s.path.name,
            "path": str(s.path),
            "sha256": s.sha256,
            "kind": s.kind,
            "outputs": list(s.outputs),
            "input": s.input_name,
            "row_shape": list(s.row_shape),
        }
        for s in specs
    ]


def check_unchanged(specs: list[TeacherSpec], run_dir: Path) -> None:
    """A later stage must distil / export the very files the run inspected."""
    path = run_dir / SPECS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the teachers stage first")
    recorded = {t["path"]: t["sha256"] for t in json.loads(path.read_text())["teachers"]}
    for s in specs:
        if recorded.get(str(s.path)) != s.sha256:
            raise ValueError(f"teacher {s.path} changed since the teachers stage (sha256 differs)")


class OnnxLabeller:
    """The user's teachers as `distill.TeacherLabeller`: raw outputs in the training space.

    Classification: log-probabilities (valid logits: softmax(log p / T) is the teacher's tempered
    distribution). Regression: means standardised with the run's target scaling and variances as
    the inverse of the student's softplus, so `regression_outputs` recovers them exactly.
    """

    def __init__(self, teachers: OnnxTeachers, task: str, y_mean: float = 0.0, y_std: float = 1.0) -> None:
        self.teachers = teachers
        self.task = task
        self.y_mean, self.y_std = y_mean, y_std

    @property
    def heads(self) -> int:
        return self.teachers.heads

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        rows = x.detach().cpu().numpy()
        if self.task == "classification":
            return torch.from_numpy(self.teachers.log_probs(rows).astype(np.float32))
        mean, variance = self.teachers.gaussians(rows)
        mean_std = (mean - self.y_mean) / self.y_std
        var_std = np.maximum(variance / self.y_std**2 - MIN_VARIANCE, 1e-12)
        raw_var = var_std + np.log(-np.expm1(-var_std))  # softplus⁻¹(v) = log(eᵛ − 1), stably
        return torch.from_numpy(np.stack([mean_std, raw_var], axis=-1).astype(np.float32))


def label_function(specs: list[TeacherSpec], task: str) -> LabelFn:
    """Labels for rows without a target: the ensemble's class (mean probability) or mean."""
    teachers = OnnxTeachers(specs)

    def label(x: np.ndarray) -> np.ndarray:
        rows = x.reshape(len(x), *specs[0].row_shape)
        if task == "classification":
            out: np.ndarray = np.exp(teachers.log_probs(rows)).mean(axis=1).argmax(axis=1)
            return out
        return teachers.gaussians(rows)[0].mean(axis=1)

    return label


def fit_to_teachers(data: TaskData, specs: list[Any]) -> TaskData:
    """Reshape the (flat) rows to the teachers' input shape; check feature and class counts."""
    shape = tuple(specs[0].row_shape)
    size = int(np.prod(shape))
    if int(np.prod(data.row_shape)) != size:
        raise ValueError(
            f"the teachers take {size} input values per row {list(shape)}, "
            f"--data has {int(np.prod(data.row_shape))} feature columns"
        )
    if data.task == "classification":
        classes = int(specs[0].classes)
        if not data.labelled:
            data = replace(data, labels=[str(i) for i in range(classes)])
        elif len(data.labels or []) != classes:
            raise ValueError(
                f"the teachers predict {classes} classes, the target column has {len(data.labels or [])}"
            )
    if shape == data.row_shape:
        return data

    def reshaped(split: Any) -> Any:
        return replace(split, x=split.x.reshape(len(split.x), *shape))

    return replace(
        data,
        row_shape=shape,
        kind="image" if len(shape) == 2 else data.kind,
        image_hw=(shape[0], shape[1]) if len(shape) == 2 else None,
        train=reshaped(data.train),
        val=reshaped(data.val),
        cal=reshaped(data.cal),
        test=reshaped(data.test),
        ood={k: v.reshape(len(v), *shape) for k, v in data.ood.items()},
        feature_names=None,
    )
