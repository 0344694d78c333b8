"""The checked teachers run on raw rows through ONNX Runtime, as the distillation's labeller sees them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.uncertainty import log_softmax
from training.onnx_teachers.contract import (
    PROB_FLOOR,
    Task,
    TeacherSpec,
    common_task,
    ensure_unchanged,
    open_session,
)


class OnnxTeachers:
    """The inspected teachers, one ONNX Runtime session each, run on raw rows in bounded batches."""

    def __init__(self, specs: Sequence[TeacherSpec], threads: int = 1) -> None:
        self.task: Task = common_task(specs)
        self.specs = tuple(specs)
        for spec in self.specs:
            ensure_unchanged(spec)
        self._sessions = [open_session(s.path, threads) for s in self.specs]

    @property
    def heads(self) -> int:
        return len(self.specs)

    def _run(self, x: np.ndarray, batch: int) -> list[list[list[np.ndarray]]]:
        """Per batch, per teacher: its used outputs as float64 arrays."""
        row_shape = self.specs[0].row_shape
        x = np.asarray(x, dtype=np.float32)
        if x.shape[1:] != row_shape:
            raise ValueError(f"rows of shape {x.shape[1:]}, the teachers take {row_shape}")
        chunks = [np.ascontiguousarray(x[i : i + batch]) for i in range(0, len(x), max(1, batch))]
        return [
            [
                [o.astype(np.float64) for o in s.run(list(spec.outputs), {spec.input_name: chunk})]
                for spec, s in zip(self.specs, self._sessions, strict=True)
            ]
            for chunk in chunks
        ]

    def log_probs(self, x: np.ndarray, batch: int = 4096) -> np.ndarray:
        """Per-teacher log-probabilities (n, M, C), float64, of raw rows x (n, *row_shape)."""
        if self.task != "classification":
            raise ValueError("log_probs needs classification teachers")
        classes = self.specs[0].classes
        assert classes is not None
        out = [np.empty((0, self.heads, classes))]
        for per_teacher in self._run(x, batch):
            heads = []
            for spec, (v,) in zip(self.specs, per_teacher, strict=True):
                z = v if spec.kind == "logits" else np.log(np.clip(v, PROB_FLOOR, 1.0))
                heads.append(log_softmax(z, axis=-1))  # (b, C); renormalises probabilities
            out.append(np.stack(heads, axis=1))  # (b, M, C)
        return np.concatenate(out)

    def gaussians(self, x: np.ndarray, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Per-teacher means and variances (n, M) each, float64, target units."""
        if self.task != "regression":
            raise ValueError("gaussians needs regression teachers")
        means, variances = [np.empty((0, self.heads))], [np.empty((0, self.heads))]
        for per_teacher in self._run(x, batch):
            pairs = [(o[0][:, 0], o[0][:, 1]) if len(o) == 1 else (o[0], o[1]) for o in per_teacher]
            means.append(np.stack([m.reshape(-1) for m, _ in pairs], axis=1))
            variances.append(np.stack([v.reshape(-1) for _, v in pairs], axis=1))
        return np.concatenate(means), np.concatenate(variances)
