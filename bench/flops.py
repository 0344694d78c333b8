"""FLOPs of an ONNX graph, counted from its nodes after ONNX shape inference.

Conventions (stated in docs/BENCHMARKS.md):
- MatMul / Gemm / Conv / ConvTranspose: 2 FLOPs per multiply-accumulate (a MAC is one multiply and
  one add), plus one FLOP per output element for a bias (Gemm's C, Conv's B).
- Element-wise arithmetic and activations (Add, Relu, Exp, ...): one FLOP per output element.
- Softmax / LogSoftmax: five FLOPs per element (max, subtract, exp, sum, divide or log).
- Pooling: one FLOP per input element the windows read (kernel size per output element).
- Shape plumbing (Reshape, Transpose, Concat, Gather, Shape, Unsqueeze, ...) counts zero.

The batch axis is fixed to a concrete size before shape inference, so every count is exact for that
batch; `count_flops(..., batch=1)` gives FLOPs per row for graphs whose work is linear in the batch.
An op outside these lists raises `UnknownOp` rather than being silently counted as free.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import shape_inference

MATMUL_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose"}
ELEMENTWISE_OPS = {
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "Exp",
    "Log",
    "Sqrt",
    "Neg",
    "Abs",
    "Pow",
    "Erf",
    "Max",
    "Min",
    "Clip",
    "Softplus",
    "Reciprocal",
    "Where",
    # comparisons: one per output element, like the arithmetic ops (the unseen-value count's `>`)
    "Greater",
    "Less",
    "GreaterOrEqual",
    "LessOrEqual",
    "Equal",
    "Gelu",
    "HardSigmoid",
    "Elu",
    "Selu",
    "BatchNormalization",
}
SOFTMAX_OPS = {"Softmax", "LogSoftmax"}
POOL_OPS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}
REDUCE_OPS = {"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceLogSumExp"}
FREE_OPS = {
    "Reshape",
    "Transpose",
    "Concat",
    "Gather",
    "Shape",
    "Unsqueeze",
    "Squeeze",
    "Flatten",
    "Identity",
    "Constant",
    "Cast",
    "Slice",
    "Split",
    "Expand",
    "ConstantOfShape",
    "Dropout",
}
SOFTMAX_FLOPS_PER_ELEMENT = 5


class UnknownOp(ValueError):
    """A node whose cost this counter does not model (refuse rather than under-count)."""


@dataclass
class FlopCount:
    total: int = 0
    by_op: Counter[str] = field(default_factory=Counter)

    def add(self, op: str, flops: int) -> None:
        self.total += flops
        self.by_op[op] += flops

    @property
    def matmul_share(self) -> float:
        """Fraction of the FLOPs in MatMul/Gemm/Conv (the part a faster kernel can speed up)."""
        dense = sum(v for k, v in self.by_op.items() if k in MATMUL_OPS)
        return dense / self.total if self.total else 0.0


def _with_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy whose graph inputs have a concrete leading (batch) dimension."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    initializers = {t.name for t in fixed.graph.initializer}
    for value in fixed.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = batch
    return fixed


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    inferred = shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    shapes: dict[str, tuple[int, ...]] = {}
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    for value in values:
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    for tensor in inferred.graph.initializer:
        shapes[tensor.name] = tuple(int(d) for d in tensor.dims)
    return shapes


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _ints(node: onnx.NodeProto, name: str) -> list[int]:
    for a in node.attribute:
        if a.name == name:
            return [int(v) for v in a.ints]
    return []


def _need(shapes: dict[str, tuple[int, ...]], name: str, node: onnx.NodeProto) -> tuple[int, ...]:
    if name not in shapes:
        raise UnknownOp(f"shape of {name!r} (input/output of {node.op_type} {node.name!r}) is unknown")
    return shapes[name]


def node_flops(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int:
    op = node.op_type
    if op in FREE_OPS:
        return 0
    out = _need(shapes, node.output[0], node)
    n_out = math.prod(out)
    if op == "MatMul":
        a = _need(shapes, node.input[0], node)
        k = a[-1]  # (..., m, k) @ (..., k, n) -> (..., m, n): k MACs per output element
        return 2 * n_out * k
    if op == "Gemm":
        a = _need(shapes, node.input[0], node)
        k = a[0] if _attr(node, "transA", 0) else a[1]
        bias = n_out if len(node.input) > 2 and node.input[2] else 0
        return 2 * n_out * k + bias
    if op in ("Conv", "ConvTranspose"):
        # weight: Conv (C_out, C_in/group, *k); ConvTranspose (C_in, C_out/group, *k)
        w = _need(shapes, node.input[1], node)
        kernel = math.prod(w[2:])
        if op == "Conv":
            macs = n_out * w[1] * kernel
        else:
            x = _need(shapes, node.input[0], node)
            macs = math.prod(x) * w[1] * kernel  # each input element scatters into C_out/group * k
        bias = n_out if len(node.input) > 2 and node.input[2] else 0
        return 2 * macs + bias
    if op in ELEMENTWISE_OPS:
        return n_out
    if op in SOFTMAX_OPS:
        return SOFTMAX_FLOPS_PER_ELEMENT * n_out
    if op in POOL_OPS:
        if op.startswith("Global"):
            return math.prod(_need(shapes, node.input[0], node))
        return n_out * math.prod(_ints(node, "kernel_shape") or [1])
    if op in REDUCE_OPS:
        return math.prod(_need(shapes, node.input[0], node))
    raise UnknownOp(f"no FLOP rule for op {op!r} (node {node.name!r})")


def count_flops(model: onnx.ModelProto | Path | str, batch: int = 1) -> FlopCount:
    """FLOPs of one run of `model` on `batch` rows."""
    proto = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
    shapes = _shapes(_with_batch(proto, batch))
    count = FlopCount()
    for node in proto.graph.node:
        count.add(node.op_type, node_flops(node, shapes))
    return count
