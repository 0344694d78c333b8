"""The ensemble contract every teacher file is held to, its errors, and what the checks found.

Errors (one line each, naming the file and the mismatch):

  ValueError
   └── TeacherContractError   a teacher file, or the set of them, breaks the contract
        └── StackingError     the stacked graph does not build, check or agree with the teachers
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnxruntime as ort

Task = Literal["classification", "regression"]
Kind = Literal["logits", "probs", "gaussian"]

PROB_FLOOR = 1e-12  # probabilities are clipped to [PROB_FLOOR, 1] before the log


class TeacherContractError(ValueError):
    """A teacher file (or the set of them) breaks the ensemble contract; the message names the file."""


class StackingError(TeacherContractError):
    """The stacked ensemble graph cannot be built or checked, or disagrees with its teachers."""


@dataclass(frozen=True)
class TeacherSpec:
    """What one checked teacher file computes."""

    path: Path
    sha256: str  # of the file bytes
    input_name: str
    row_shape: tuple[int, ...]  # input shape without the batch axis
    outputs: tuple[str, ...]  # graph outputs used, in role order: (probs|logits,), (mean_var,), (mean, var)
    kind: Kind
    classes: int | None  # classification: C


def session_options(threads: int = 1) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: a user's graph may warn about unused initialisers
    return options


def open_session(path: Path, threads: int = 1) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises several types (Fail, InvalidGraph, InvalidProtobuf, ...)
        raise TeacherContractError(f"{path}: ONNX Runtime cannot load it: {one_line(exc)}") from exc


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def common_task(specs: Sequence[TeacherSpec]) -> Task:
    if not specs:
        raise ValueError("no teachers")
    tasks = {"regression" if s.kind == "gaussian" else "classification" for s in specs}
    if len(tasks) > 1 or len({s.row_shape for s in specs}) > 1 or len({s.classes for s in specs}) > 1:
        raise ValueError("teacher specs disagree on task, row shape or classes: run inspect_teachers")
    return "regression" if "regression" in tasks else "classification"


def ensure_unchanged(spec: TeacherSpec) -> None:
    if file_sha256(spec.path) != spec.sha256:
        raise TeacherContractError(f"{spec.path}: the file changed since it was inspected (sha256 differs)")
