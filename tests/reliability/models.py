"""Real ONNX model packages for the fault and overload tests, built with `onnx.helper` (no mocks).

Every package follows the model contract (`service/manifest.py`): input "input" [-1, 8] float32,
output "log_probs" [-1, heads, 3], and a manifest whose calibration scores come from running the
graph itself, like `tests.service.support.write_model`.

- `make_wide_classifier`: the same contract with a wide, deep body, so that model compute (not HTTP)
  bounds the server's capacity in the overload tests.
- `make_fragile_classifier`: the test classifier, except that a batch containing any value above
  `POISON_THRESHOLD` makes ONNX Runtime fail (its Reshape target gets one row too many): a real
  graph that raises at run time on one particular input.
- `make_nan_classifier`: the test classifier with a NaN weight, so every output is NaN.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from service.manifest import ModelManifest
from tests import oracle
from tests.service.support import (
    CLF_CLASSES,
    CLF_FEATURES,
    HEADS,
    calibration_inputs,
    classifier_model,
    finish_model,
    make_classifier,
)

POISON_THRESHOLD = 1.0e6
LABELS = ["setosa", "versicolor", "virginica"]


def make_wide_classifier(hidden: int, layers: int, seed: int = 0, heads: int = HEADS) -> onnx.ModelProto:
    """input [-1, 8] → `layers` × (MatMul hidden×hidden + Relu) → heads×3 → log_softmax."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    previous, width = "input", CLF_FEATURES
    for i in range(layers):
        w = rng.normal(0, 1.0 / np.sqrt(width), (width, hidden)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(np.zeros(hidden, np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [previous, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [f"h{i}"]),
        ]
        previous, width = f"h{i}", hidden
    w_out = rng.normal(0, 1.5 / np.sqrt(width), (width, heads * CLF_CLASSES)).astype(np.float32)
    inits += [
        numpy_helper.from_array(w_out, "w_out"),
        numpy_helper.from_array(np.array([-1, heads, CLF_CLASSES], dtype=np.int64), "shape"),
    ]
    nodes += [
        helper.make_node("MatMul", [previous, "w_out"], ["z"]),
        helper.make_node("Reshape", ["z", "shape"], ["logits"]),
        helper.make_node("LogSoftmax", ["logits"], ["log_probs"], axis=-1),
    ]
    return classifier_model(nodes, inits, "wide_clf", heads)


def make_fragile_classifier(seed: int = 0) -> onnx.ModelProto:
    """`make_classifier(seed)` plus a Gather that reads index 0 of a one-element zero vector, or index
    1000 when the batch holds a value above `POISON_THRESHOLD`; its result (0.0) is added to the
    log-probabilities.

    For ordinary batches the answers equal `make_classifier(seed)`'s; a batch holding the poison
    value makes ONNX Runtime fail at run time (Gather index out of bounds).
    """
    model = make_classifier(seed)
    graph = model.graph
    graph.output[0].name = "log_probs"
    softmax = next(node for node in graph.node if node.op_type == "LogSoftmax")
    softmax.output[0] = "clean_log_probs"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([POISON_THRESHOLD], dtype=np.float32), "poison_threshold"),
            numpy_helper.from_array(np.array([1000], dtype=np.int64), "poison_index"),
            numpy_helper.from_array(np.zeros(1, dtype=np.float32), "one_zero"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("ReduceMax", ["input"], ["input_max"], keepdims=1),  # (1, 1)
            helper.make_node("Greater", ["input_max", "poison_threshold"], ["poisoned"]),
            helper.make_node("Cast", ["poisoned"], ["poison_flag"], to=TensorProto.INT64),
            helper.make_node("Mul", ["poison_flag", "poison_index"], ["gather_index"]),  # 0 or 1000
            helper.make_node("Gather", ["one_zero", "gather_index"], ["zero"], axis=0),  # (1, 1)
            helper.make_node("Add", ["clean_log_probs", "zero"], ["log_probs"]),
        ]
    )
    return finish_model(graph)


def make_nan_classifier(seed: int = 0) -> onnx.ModelProto:
    """`make_classifier(seed)` with one NaN in its output bias: every answer is NaN."""
    model = make_classifier(seed)
    bias = next(t for t in model.graph.initializer if t.name == "b2")
    values = numpy_helper.to_array(bias).copy()
    values[0] = np.nan
    bias.CopyFrom(numpy_helper.from_array(values, "b2"))
    return model


def write_classifier_package(root: Path, name: str, version: int, model: onnx.ModelProto) -> Path:
    """`root/name/version/{model.onnx, manifest.json}` for a classifier; calibration by running it."""
    directory = root / name / str(version)
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, directory / "model.onnx")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (log_probs,) = session.run(["log_probs"], {"input": calibration_inputs("classification")})
    scores = np.nan_to_num(oracle.classification(log_probs)["mutual_information"], nan=0.0)
    heads = int(log_probs.shape[1])
    manifest: dict[str, Any] = {
        "name": name,
        "version": version,
        "task": "classification",
        "description": f"reliability test classifier {name}",
        "input": {"name": "input", "shape": [-1, CLF_FEATURES]},
        "labels": LABELS,
        "heads": heads,
        "outputs": {"log_probs": "log_probs"},
        "ood": {
            "score": "mutual_information",
            "calibration_scores": sorted(float(s) for s in scores),
            "default_alpha": 0.05,
        },
        "evaluation": {"note": "synthetic test model"},
        "provenance": {"dataset": "synthetic", "seed": 0},
    }
    ModelManifest.model_validate(manifest).dump(directory)
    return directory


def write_wrong_schema_manifest(directory: Path, schema_version: int = 99) -> None:
    """Rewrite `directory/manifest.json` claiming a schema version this server does not know."""
    path = directory / "manifest.json"
    document = json.loads(path.read_text())
    document["schema_version"] = schema_version
    path.write_text(json.dumps(document, indent=2))


def make_nan_off_zero_classifier(seed: int = 0) -> onnx.ModelProto:
    """`make_classifier(seed)` plus 0 × sum(sqrt(input)) per row: finite on a zero input, NaN for
    any row with a negative feature (so a warm-up on zeros alone would pass it)."""
    model = make_classifier(seed)
    graph = model.graph
    softmax = next(node for node in graph.node if node.op_type == "LogSoftmax")
    softmax.output[0] = "clean_log_probs"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([1], dtype=np.int64), "sum_axes"),
            numpy_helper.from_array(np.array([-1, 1, 1], dtype=np.int64), "row_scalar_shape"),
            numpy_helper.from_array(np.zeros(1, dtype=np.float32), "zero_scale"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Sqrt", ["input"], ["root"]),  # NaN where a feature is negative
            helper.make_node("ReduceSum", ["root", "sum_axes"], ["root_sum"], keepdims=1),  # (n, 1)
            helper.make_node("Reshape", ["root_sum", "row_scalar_shape"], ["root_sum3"]),  # (n, 1, 1)
            helper.make_node("Mul", ["root_sum3", "zero_scale"], ["nan_or_zero"]),
            helper.make_node("Add", ["clean_log_probs", "nan_or_zero"], ["log_probs"]),
        ]
    )
    return finish_model(graph)
