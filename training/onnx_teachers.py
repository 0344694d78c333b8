"""The user's own teachers: an ensemble brought as `.onnx` files from any framework.

`find_teacher_files` lists them, `inspect_teachers` checks every one up front against the
ensemble contract and says what each computes (`TeacherSpec`), `OnnxTeachers` runs them on raw
rows (per-teacher log-probabilities, or Gaussian means and variances), and `stack_teachers`
writes them as ONE graph with the contract of `ensemble.onnx` (service/manifest.py):

  input   `input`      float32 (batch, *row_shape), dynamic batch axis
  output  `log_probs`  (batch, M, C)                classification
          `mean`, `variance`  (batch, M) each       regression, target units

Errors (one line each, naming the file and the mismatch):

  ValueError
   └── TeacherContractError   a teacher file, or the set of them, breaks the contract
        └── StackingError     the stacked graph does not build, check or agree with the teachers
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, compose, helper, numpy_helper, version_converter

from service.uncertainty import log_softmax

Task = Literal["classification", "regression"]
Kind = Literal["logits", "probs", "gaussian"]

INPUT_NAME = "input"
MIN_OPSET = 17  # the project's export opset (training/export.py)
PROB_FLOOR = 1e-12  # probabilities are clipped to [PROB_FLOOR, 1] before the log
SUM_TOLERANCE = 1e-3  # a row of probabilities sums to 1 within this
STACK_TOLERANCE = 1e-4  # stacked graph vs the teachers run one by one
PROBE_ROWS = 8  # standard-normal rows (plus the zero row) that every teacher is run on

# Output element types read as floats (cast to float32 in the stacked graph).
_FLOAT_TYPES = {
    "tensor(float)": TensorProto.FLOAT,
    "tensor(double)": TensorProto.DOUBLE,
    "tensor(float16)": TensorProto.FLOAT16,
}
_MEAN_WORDS = {"mean", "mu"}
_VARIANCE_WORDS = {"variance", "var", "sigma2"}


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


def _options(threads: int = 1) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: a user's graph may warn about unused initialisers
    return options


def _session(path: Path, threads: int = 1) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), _options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises several types (Fail, InvalidGraph, InvalidProtobuf, ...)
        raise TeacherContractError(f"{path}: ONNX Runtime cannot load it: {_one_line(exc)}") from exc


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
    sha256 = _sha256(path)
    session = _session(path)
    input_name, shape = _input_shape(path, session)
    if row_shape is not None and shape != tuple(row_shape):
        same_size = int(np.prod(shape)) == int(np.prod(row_shape))
        note = " (the same number of features, laid out differently)" if same_size else ""
        raise TeacherContractError(
            f"{path}: takes rows of shape {shape}, but the data rows have shape {tuple(row_shape)}{note}"
        )
    outputs = session.get_outputs()
    floats = [o.name for o in outputs if o.type in _FLOAT_TYPES]
    maps = [o.name for o in outputs if o.type.startswith(("seq(", "map("))]
    others = [o.name for o in outputs if o.name not in floats and o.name not in maps]
    x = _probe_rows(shape)
    try:
        values = dict(zip(floats, session.run(floats, {input_name: x}), strict=True)) if floats else {}
    except Exception as exc:
        raise TeacherContractError(
            f"{path}: fails on {len(x)} rows of shape {shape}: {_one_line(exc)}"
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


def _task(specs: Sequence[TeacherSpec]) -> Task:
    if not specs:
        raise ValueError("no teachers")
    tasks = {"regression" if s.kind == "gaussian" else "classification" for s in specs}
    if len(tasks) > 1 or len({s.row_shape for s in specs}) > 1 or len({s.classes for s in specs}) > 1:
        raise ValueError("teacher specs disagree on task, row shape or classes: run inspect_teachers")
    return "regression" if "regression" in tasks else "classification"


def _unchanged(spec: TeacherSpec) -> None:
    if _sha256(spec.path) != spec.sha256:
        raise TeacherContractError(f"{spec.path}: the file changed since it was inspected (sha256 differs)")


class OnnxTeachers:
    """The inspected teachers, one ONNX Runtime session each, run on raw rows in bounded batches."""

    def __init__(self, specs: Sequence[TeacherSpec], threads: int = 1) -> None:
        self.task: Task = _task(specs)
        self.specs = tuple(specs)
        for spec in self.specs:
            _unchanged(spec)
        self._sessions = [_session(s.path, threads) for s in self.specs]

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


def _default_opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def stack_teachers(specs: Sequence[TeacherSpec], out_path: Path, input_name: str = INPUT_NAME) -> None:
    """Write the teachers as one graph with the ensemble contract, checked against `OnnxTeachers`.

    Each teacher's default-domain opset is converted to the largest among them (at least
    MIN_OPSET); other domains (ai.onnx.ml for tree ensembles) are declared at their largest
    version. Every name of teacher m gets the prefix `t{m}_`; the helper nodes are `hydra_*`.
    Nothing is written unless the graph passes the full ONNX check and agrees with the teachers.
    """
    task = _task(specs)
    if re.match(r"hydra_|t\d+_", input_name) or input_name in ("log_probs", "mean", "variance"):
        raise ValueError(f"input name {input_name!r} collides with the stacked graph's own names")
    for spec in specs:
        _unchanged(spec)
    protos = []
    for spec in specs:
        try:
            protos.append(onnx.load(str(spec.path)))
        except Exception as exc:
            raise StackingError(f"{spec.path}: onnx cannot load it: {_one_line(exc)}") from exc
    opset = max(MIN_OPSET, *(_default_opset(p) for p in protos))
    versions: dict[str, set[int]] = {}  # other domains: every version the teachers import
    for p in protos:
        for o in p.opset_import:
            if o.domain not in ("", "ai.onnx"):
                versions.setdefault(o.domain, set()).add(o.version)
    domains = {d: max(v) for d, v in versions.items()}

    model = _stacked_model(specs, protos, task, opset, domains, input_name)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        # Name the teacher whose (prefixed) node failed; ONNX converts only the default domain, so
        # an op deprecated in a newer ai.onnx.ml (TreeEnsembleClassifier at 5) cannot be merged.
        found = re.search(r"\bt(\d+)_", str(exc))
        where = specs[int(found.group(1))].path if found and int(found.group(1)) < len(specs) else out_path
        mixed = {d: sorted(v) for d, v in versions.items() if len(v) > 1}
        hint = (
            f"; the teachers import {mixed}, stacked at the highest, where older ops may be deprecated"
            if mixed
            else ""
        )
        raise StackingError(
            f"{where}: the stacked graph fails the ONNX check: {_one_line(exc)}{hint}"
        ) from exc
    _check_stacked(specs, model, task, input_name, out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_path))


def _stacked_model(
    specs: Sequence[TeacherSpec],
    protos: list[onnx.ModelProto],
    task: Task,
    opset: int,
    domains: dict[str, int],
    input_name: str,
) -> onnx.ModelProto:
    heads, row_shape = len(specs), specs[0].row_shape
    graph = helper.make_graph([], "hydra_teacher_ensemble", [], [])
    constants: dict[str, np.ndarray] = {
        "hydra_axis1": np.array([1], dtype=np.int64),
        "hydra_flat": np.array([-1], dtype=np.int64),
        "hydra_col0": np.array(0, dtype=np.int64),
        "hydra_col1": np.array(1, dtype=np.int64),
        "hydra_prob_floor": np.array(PROB_FLOOR, dtype=np.float32),
        "hydra_one": np.array(1.0, dtype=np.float32),
    }
    used: set[str] = set()
    functions: list[onnx.FunctionProto] = []
    columns: dict[str, list[str]] = {"log_probs": [], "mean": [], "variance": []}
    ir_version = 0

    def node(op: str, inputs: list[str], out: str, **attrs: int) -> str:
        used.update(i for i in inputs if i in constants)
        made = helper.make_node(op, inputs, [out], name=out)
        made.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
        graph.node.append(made)
        return out

    for m, (spec, proto) in enumerate(zip(specs, protos, strict=True)):
        if _default_opset(proto) not in (0, opset):
            try:
                proto = version_converter.convert_version(proto, opset)
            except Exception as exc:
                raise StackingError(
                    f"{spec.path}: cannot convert opset {_default_opset(proto)} to {opset}: {_one_line(exc)}"
                ) from exc
        ir_version = max(ir_version, proto.ir_version)
        prefixed = compose.add_prefix(proto, f"t{m}_")
        g = prefixed.graph
        # The teacher's own input becomes an Identity of the shared input; inputs backed by an
        # initialiser (old exporters list those as inputs too) stay initialisers.
        node("Identity", [input_name], f"t{m}_{spec.input_name}")
        graph.node.extend(g.node)
        graph.initializer.extend(g.initializer)
        graph.sparse_initializer.extend(g.sparse_initializer)
        graph.value_info.extend(g.value_info)
        functions.extend(prefixed.functions)
        elem = {o.name: o.type.tensor_type.elem_type for o in g.output}
        outs = []
        for name in spec.outputs:
            src = f"t{m}_{name}"
            if elem.get(src, TensorProto.FLOAT) != TensorProto.FLOAT:
                src = node("Cast", [src], f"hydra_t{m}_{name}_float", to=TensorProto.FLOAT)
            outs.append(src)
        if task == "classification":
            (z,) = outs
            if spec.kind == "probs":  # log(clip(p)), then renormalise like the logits
                z = node("Clip", [z, "hydra_prob_floor", "hydra_one"], f"hydra_t{m}_clipped")
                z = node("Log", [z], f"hydra_t{m}_log")
            z = node("LogSoftmax", [z], f"hydra_t{m}_log_probs", axis=-1)  # (batch, C)
            columns["log_probs"].append(node("Unsqueeze", [z, "hydra_axis1"], f"hydra_t{m}_head"))
        else:
            if len(outs) == 1:  # (batch, 2): (mean, variance) columns
                pair = [
                    node("Gather", [outs[0], f"hydra_col{j}"], f"hydra_t{m}_col{j}", axis=1) for j in (0, 1)
                ]
            else:  # (batch,) or (batch, 1) each
                pair = [node("Reshape", [o, "hydra_flat"], f"hydra_t{m}_flat{j}") for j, o in enumerate(outs)]
            for role, col in zip(("mean", "variance"), pair, strict=True):
                columns[role].append(node("Unsqueeze", [col, "hydra_axis1"], f"hydra_t{m}_{role}"))

    graph.initializer.extend(numpy_helper.from_array(constants[k], k) for k in sorted(used))
    graph.input.append(helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", *row_shape]))
    shapes: dict[str, list[str | int | None]]
    if task == "classification":
        shapes = {"log_probs": ["batch", heads, specs[0].classes]}
    else:
        shapes = {"mean": ["batch", heads], "variance": ["batch", heads]}
    for role, shape in shapes.items():
        node("Concat", columns[role], role, axis=1)
        graph.output.append(helper.make_tensor_value_info(role, TensorProto.FLOAT, shape))

    opsets = [helper.make_opsetid("", opset)] + [
        helper.make_opsetid(d, v) for d, v in sorted(domains.items())
    ]
    model = helper.make_model(
        graph,
        opset_imports=opsets,
        functions=functions,
        producer_name="hydra-serve",
        ir_version=max(ir_version, helper.find_min_ir_version_for(opsets)),
    )
    teachers = [{"file": s.path.name, "sha256": s.sha256, "kind": s.kind} for s in specs]
    helper.set_model_props(model, {"hydra.teachers": json.dumps(teachers)})
    return model


def _check_stacked(
    specs: Sequence[TeacherSpec], model: onnx.ModelProto, task: Task, input_name: str, out_path: Path
) -> None:
    """The stacked graph equals the teachers run one by one on deterministic random rows.

    Absolute error for values within ±1, relative beyond (float32 precision; a log-probability's
    rounding scales with the row's largest |log-probability|, so compare per (row, head) to that)."""
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), _options(), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise StackingError(
            f"{out_path}: ONNX Runtime cannot load the stacked graph: {_one_line(exc)}"
        ) from exc
    teachers = OnnxTeachers(specs)
    rng = np.random.default_rng(1)
    row_shape = specs[0].row_shape
    worst = 0.0
    for n in (17, 1):
        x = rng.standard_normal((n, *row_shape)).astype(np.float32)
        if n > 1:
            x[0] = 0.0  # the zero row, in the batch of several
        if task == "classification":
            (got,) = session.run(["log_probs"], {input_name: x})
            want = teachers.log_probs(x)
            scale = np.maximum(1.0, np.abs(want).max(axis=-1, keepdims=True))
            pairs = [(got, want, scale)]
        else:
            g_mean, g_var = session.run(["mean", "variance"], {input_name: x})
            w_mean, w_var = teachers.gaussians(x)
            pairs = [(g, w, np.maximum(1.0, np.abs(w))) for g, w in ((g_mean, w_mean), (g_var, w_var))]
        for g, w, s in pairs:
            if g.shape != w.shape:
                raise StackingError(
                    f"{out_path}: stacked output shape {g.shape}, the teachers give {w.shape}"
                )
            worst = max(worst, float(np.max(np.abs(g - w) / s)) if g.size else 0.0)
    if not worst <= STACK_TOLERANCE:
        raise StackingError(
            f"{out_path}: the stacked graph differs from its teachers by {worst:.3g} > {STACK_TOLERANCE}"
        )
