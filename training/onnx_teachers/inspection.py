"""Finding the teacher files and checking each one up front: its input, and which outputs are the
logits / probabilities (classification) or the Gaussian mean and variance (regression)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
from onnx import TensorProto

from training.onnx_teachers.contract import (
    Kind,
    Task,
    TeacherContractError,
    TeacherSpec,
    file_sha256,
    one_line,
    open_session,
)

SUM_TOLERANCE = 1e-3  # a row of probabilities sums to 1 within this
PROBE_ROWS = 8  # standard-normal rows (plus the zero row) that every teacher is run on

# Output element types read as floats (cast to float32 in the stacked graph).
FLOAT_TYPES = {
    "tensor(float)": TensorProto.FLOAT,
    "tensor(double)": TensorProto.DOUBLE,
    "tensor(float16)": TensorProto.FLOAT16,
}
_MEAN_WORDS = {"mean", "mu"}
_VARIANCE_WORDS = {"variance", "var", "sigma2"}


def find_teacher_files(paths: Sequence[Path]) -> list[Path]:
    """A folder -> its `*.onnx` sorted by name; a file -> itself. An ensemble needs at least 2."""
    files: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise TeacherContractError(f"{path}: no such teacher file or folder")
        if path.is_dir():
            found = sorted((p for p in path.glob("*.onnx") if p.is_file()), key=lambda p: p.name)
            if not found:
                raise TeacherContractError(f"{path}: folder holds no .onnx teacher files")
            files += found
        elif path.suffix.lower() != ".onnx":
            raise TeacherContractError(f"{path}: not an .onnx file")
        else:
            files.append(path)
    seen: dict[Path, Path] = {}
    for file in files:
        if file.resolve() in seen:
            raise TeacherContractError(f"{file}: listed twice (also as {seen[file.resolve()]})")
        seen[file.resolve()] = file
    if len(files) < 2:
        named = ", ".join(map(str, files)) or "none"
        raise TeacherContractError(f"{named}: an ensemble needs at least 2 teachers, got {len(files)}")
    return files


def inspect_teachers(
    files: Sequence[Path],
    task: Task,
    row_shape: tuple[int, ...] | None = None,
    teacher_output: Literal["logits", "probs"] | None = None,
) -> list[TeacherSpec]:
    """Check every teacher against the contract (the first breach raises) and describe each one.

    `row_shape`: the shape of the user's data rows, which every teacher must take; `teacher_output`
    overrides the logits/probs detection for all classification teachers."""
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be classification or regression, got {task!r}")
    if len(files) < 2:
        named = ", ".join(map(str, files)) or "none"
        raise TeacherContractError(f"{named}: an ensemble needs at least 2 teachers, got {len(files)}")
    specs = [_inspect(Path(f), task, row_shape, teacher_output) for f in files]
    _same(specs, "row_shape")
    if task == "classification":
        _same(specs, "classes")
    digests: dict[str, Path] = {}
    for spec in specs:
        if spec.sha256 in digests:
            raise TeacherContractError(
                f"{spec.path}: the same model as {digests[spec.sha256]} (sha256 {spec.sha256[:12]}): "
                "copies of one teacher carry no ensemble diversity"
            )
        digests[spec.sha256] = spec.path
    return specs


def _same(specs: list[TeacherSpec], field: str) -> None:
    """All specs agree on `field`; else name the first file off the majority, with both values."""
    values = Counter(getattr(s, field) for s in specs)
    if len(values) <= 1:
        return
    majority = values.most_common(1)[0][0]
    odd = next(s for s in specs if getattr(s, field) != majority)
    others = ", ".join(s.path.name for s in specs if getattr(s, field) == majority)
    if field == "row_shape":
        what = f"takes rows of shape {odd.row_shape}, but {others} take rows of shape {majority}"
    else:
        what = f"has {odd.classes} classes, but {others} have {majority}"
        if odd.classes == 2:
            what += " (a regression teacher's [batch, 2] mean/variance output also looks like 2 classes)"
    raise TeacherContractError(f"{odd.path}: {what}")


def _probe_rows(row_shape: tuple[int, ...]) -> np.ndarray:
    """Deterministic standard-normal rows plus the zero row, float32 (PROBE_ROWS + 1, *row_shape)."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((PROBE_ROWS, *row_shape))
    return np.concatenate([rows, np.zeros((1, *row_shape))]).astype(np.float32)


def _input_shape(path: Path, session: ort.InferenceSession) -> tuple[str, tuple[int, ...]]:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(f"{i.name} {i.type}" for i in inputs)
        raise TeacherContractError(f"{path}: teachers take exactly one input, this one takes {names}")
    (arg,) = inputs
    if arg.type != "tensor(float)":
        raise TeacherContractError(
            f"{path}: input {arg.name} is {arg.type}; teachers must take float32 rows (tensor(float))"
        )
    shape = list(arg.shape)
    if len(shape) < 2:
        raise TeacherContractError(
            f"{path}: input {arg.name} has shape {shape}; teachers take (batch, *row_shape), rank >= 2"
        )
    if isinstance(shape[0], int):
        raise TeacherContractError(
            f"{path}: input {arg.name} has a fixed batch size {shape[0]}; export it with a dynamic "
            f"batch axis (torch: dynamic_axes={{{arg.name!r}: {{0: 'batch'}}}})"
        )
    if not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        raise TeacherContractError(
            f"{path}: input {arg.name} has shape {shape}; only the batch axis may be symbolic"
        )
    return arg.name, tuple(int(d) for d in shape[1:])


@dataclass(frozen=True)
class _Probe:
    """One teacher's interface and its float outputs on the probe rows, grouped by row shape."""

    path: Path
    sha256: str
    input_name: str
    row_shape: tuple[int, ...]
    wide: dict[str, np.ndarray]  # float (batch, k >= 2) outputs
    scalar: dict[str, np.ndarray]  # float (batch,) or (batch, 1) outputs, flattened to (batch,)
    maps: list[str]  # sequence / map outputs (skl2onnx's ZipMap)
    others: list[str]  # integer, string, bool outputs (a classifier's label)
    listing: str  # every output, for messages

    def fail(self, what: str) -> TeacherContractError:
        return TeacherContractError(f"{self.path}: {what} (outputs: {self.listing})")


def _inspect(
    path: Path,
    task: Task,
    row_shape: tuple[int, ...] | None,
    teacher_output: Literal["logits", "probs"] | None,
) -> TeacherSpec:
    if path.suffix.lower() != ".onnx" or not path.is_file():
        raise TeacherContractError(f"{path}: not an .onnx file")
    sha256 = file_sha256(path)
    session = open_session(path)
    input_name, shape = _input_shape(path, session)
    if row_shape is not None and shape != tuple(row_shape):
        same_size = int(np.prod(shape)) == int(np.prod(row_shape))
        note = " (the same number of features, laid out differently)" if same_size else ""
        raise TeacherContractError(
            f"{path}: takes rows of shape {shape}, but the data rows have shape {tuple(row_shape)}{note}"
        )
    outputs = session.get_outputs()
    floats = [o.name for o in outputs if o.type in FLOAT_TYPES]
    maps = [o.name for o in outputs if o.type.startswith(("seq(", "map("))]
    others = [o.name for o in outputs if o.name not in floats and o.name not in maps]
    x = _probe_rows(shape)
    try:
        values = dict(zip(floats, session.run(floats, {input_name: x}), strict=True)) if floats else {}
    except Exception as exc:
        raise TeacherContractError(
            f"{path}: fails on {len(x)} rows of shape {shape}: {one_line(exc)}"
        ) from exc
    rows = {n: v.astype(np.float64) for n, v in values.items() if v.ndim >= 1 and v.shape[0] == len(x)}
    listing = "; ".join(
        f"{o.name} {o.type} {list(values[o.name].shape) if o.name in values else o.shape}" for o in outputs
    )
    probe = _Probe(
        path,
        sha256,
        input_name,
        shape,
        wide={n: v for n, v in rows.items() if v.ndim == 2 and v.shape[1] >= 2},
        scalar={n: v.reshape(-1) for n, v in rows.items() if v.ndim == 1 or v.shape[1:] == (1,)},
        maps=maps,
        others=others,
        listing=listing,
    )
    for name, v in (*probe.wide.items(), *probe.scalar.items()):
        if not np.isfinite(v).all():
            raise probe.fail(f"output {name} is not finite on the probe rows (standard-normal and zero rows)")
    return _classifier(probe, teacher_output) if task == "classification" else _regressor(probe)


def _is_probs(v: np.ndarray) -> bool:
    in_range = bool(((v >= -1e-6) & (v <= 1 + 1e-6)).all())
    return in_range and bool((np.abs(v.sum(axis=1) - 1.0) <= SUM_TOLERANCE).all())


def _classifier(probe: _Probe, teacher_output: Literal["logits", "probs"] | None) -> TeacherSpec:
    if not probe.wide:
        if probe.maps:
            raise probe.fail(
                f"output {probe.maps[0]} is a sequence of maps (skl2onnx's ZipMap): export the classifier "
                "with options={id(model): {'zipmap': False}} (or options={'zipmap': False}) "
                "to get a float [batch, C] probabilities output"
            )
        if probe.scalar:
            raise probe.fail(
                f"looks like a regression teacher (float outputs {', '.join(probe.scalar)} of shape "
                "[batch] / [batch, 1]), not a classifier with one float [batch, C] output"
            )
        raise probe.fail("no float [batch, C] output (C >= 2): a classifier needs exactly one")
    if len(probe.wide) > 1:
        raise probe.fail(
            f"{len(probe.wide)} float [batch, C] outputs ({', '.join(probe.wide)}): "
            "a classifier needs exactly one"
        )
    ((name, v),) = probe.wide.items()
    if teacher_output == "probs" and not bool(((v >= 0.0) & (v <= 1 + 1e-6)).all()):
        raise probe.fail(
            f"teacher_output=probs, but output {name} has values outside [0, 1] "
            f"(min {v.min():.3g}, max {v.max():.3g}): these are not probabilities"
        )
    kind: Kind = teacher_output or ("probs" if _is_probs(v) else "logits")
    return TeacherSpec(probe.path, probe.sha256, probe.input_name, probe.row_shape, (name,), kind, v.shape[1])


def _words(name: str) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", name.lower()))


def _regressor(probe: _Probe) -> TeacherSpec:
    pairs = {n: v for n, v in probe.wide.items() if v.shape[1] == 2}
    scalar = probe.scalar
    if probe.maps or probe.others:
        raise probe.fail(
            f"looks like a classifier (it outputs {', '.join(probe.maps + probe.others)}), "
            "not a regression teacher"
        )
    if len(pairs) == 1 and not scalar:
        ((name, v),) = pairs.items()
        if _is_probs(v):
            raise probe.fail(f"looks like a 2-class classifier: every row of {name} is a probability vector")
        names: tuple[str, ...] = (name,)
        variance = v[:, 1]
    elif scalar and not pairs:
        means = [n for n in scalar if _words(n) & _MEAN_WORDS]
        variances = [n for n in scalar if _words(n) & _VARIANCE_WORDS]
        if len(means) == 1 and len(variances) == 1 and means != variances:
            names = (means[0], variances[0])
        elif len(scalar) == 2:
            names = tuple(scalar)  # graph order: mean, variance
        else:
            raise probe.fail(
                f"{len(scalar)} float [batch] outputs, not two or two named like mean and variance"
            )
        variance = scalar[names[1]]
    elif probe.wide:
        name, v = next(iter(probe.wide.items()))
        what = f"a classifier with {v.shape[1]} classes" if v.shape[1] > 2 else "neither"
        raise probe.fail(
            f"looks like {what} (float output {name} of shape [batch, {v.shape[1]}]); a regression teacher "
            "outputs one float [batch, 2] (mean, variance) or two float [batch] (mean; variance)"
        )
    else:
        raise probe.fail("no float [batch, 2] or pair of float [batch] outputs (mean, variance)")
    if not bool((variance >= 0).all()):
        raise probe.fail(
            f"variance ({names[-1]}) is negative on the probe rows (min {variance.min():.3g}): "
            "teachers must output a variance >= 0 (e.g. softplus), not a log-variance"
        )
    return TeacherSpec(probe.path, probe.sha256, probe.input_name, probe.row_shape, names, "gaussian", None)
