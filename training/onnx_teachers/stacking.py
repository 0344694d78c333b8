"""The teachers written as ONE graph with the contract of `ensemble.onnx`, checked against them."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, compose, helper, numpy_helper, version_converter

from training.onnx_teachers.contract import (
    PROB_FLOOR,
    StackingError,
    Task,
    TeacherSpec,
    common_task,
    ensure_unchanged,
    one_line,
    session_options,
)
from training.onnx_teachers.runner import OnnxTeachers

INPUT_NAME = "input"
MIN_OPSET = 17  # the project's export opset (training/export.py)
STACK_TOLERANCE = 1e-4  # stacked graph vs the teachers run one by one


def _default_opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def stack_teachers(specs: Sequence[TeacherSpec], out_path: Path, input_name: str = INPUT_NAME) -> None:
    """Write the teachers as one graph with the ensemble contract, checked against `OnnxTeachers`.

    Each teacher's default-domain opset is converted to the largest among them (at least
    MIN_OPSET); other domains (ai.onnx.ml for tree ensembles) are declared at their largest
    version. Every name of teacher m gets the prefix `t{m}_`; the helper nodes are `hydra_*`.
    Nothing is written unless the graph passes the full ONNX check and agrees with the teachers.
    """
    task = common_task(specs)
    if re.match(r"hydra_|t\d+_", input_name) or input_name in ("log_probs", "mean", "variance"):
        raise ValueError(f"input name {input_name!r} collides with the stacked graph's own names")
    for spec in specs:
        ensure_unchanged(spec)
    protos = []
    for spec in specs:
        try:
            protos.append(onnx.load(str(spec.path)))
        except Exception as exc:
            raise StackingError(f"{spec.path}: onnx cannot load it: {one_line(exc)}") from exc
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
            f"{where}: the stacked graph fails the ONNX check: {one_line(exc)}{hint}"
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
                    f"{spec.path}: cannot convert opset {_default_opset(proto)} to {opset}: {one_line(exc)}"
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
            model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise StackingError(
            f"{out_path}: ONNX Runtime cannot load the stacked graph: {one_line(exc)}"
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
