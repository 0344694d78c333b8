"""The FLOP counter against graphs whose cost is known by hand."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench.flops import UnknownOp, count_flops


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: list[onnx.TensorProto],
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _weight(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ones(shape, dtype=np.float32), name)


def _mlp() -> onnx.ModelProto:
    # input (batch, 4) -> MatMul (4x3) -> Add bias -> Relu -> Gemm (3x2, transB, with bias) -> LogSoftmax
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["z"], transB=1),
        helper.make_node("LogSoftmax", ["z"], ["out"], axis=-1),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 2])],
        [_weight("w1", 4, 3), _weight("b1", 3), _weight("w2", 2, 3), _weight("b2", 2)],
    )


def test_dense_graph_counts_macs_twice_and_elementwise_once() -> None:
    count = count_flops(_mlp(), batch=1)
    assert count.by_op["MatMul"] == 2 * 4 * 3  # 12 MACs
    assert count.by_op["Add"] == 3
    assert count.by_op["Relu"] == 3
    assert count.by_op["Gemm"] == 2 * 3 * 2 + 2  # 6 MACs + bias
    assert count.by_op["LogSoftmax"] == 5 * 2
    assert count.total == 24 + 3 + 3 + 14 + 10


def test_flops_scale_linearly_with_the_batch() -> None:
    assert count_flops(_mlp(), batch=64).total == 64 * count_flops(_mlp(), batch=1).total


def test_conv_and_pool() -> None:
    # (1, 2, 8) -> Conv1d 2->3 channels, kernel 3, pad 1 -> (1, 3, 8); MaxPool k2 -> (1, 3, 4)
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["c"], kernel_shape=[3], pads=[1, 1]),
        helper.make_node("MaxPool", ["c"], ["out"], kernel_shape=[2], strides=[2]),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3, 4])],
        [_weight("w", 3, 2, 3), _weight("b", 3)],
    )
    count = count_flops(model, batch=1)
    assert count.by_op["Conv"] == 2 * (3 * 8) * (2 * 3) + 3 * 8  # 144 MACs per sample + bias
    assert count.by_op["MaxPool"] == 3 * 4 * 2
    assert count.matmul_share == pytest.approx(count.by_op["Conv"] / count.total)


def test_batched_matmul_over_heads() -> None:
    # the fused Hydra head: (batch, 5) @ (M=4, 5, 3) -> (4, batch, 3): 4*3 outputs per row, 5 MACs each
    nodes = [helper.make_node("MatMul", ["input", "w"], ["out"])]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 5])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, "batch", 3])],
        [_weight("w", 4, 5, 3)],
    )
    assert count_flops(model, batch=2).total == 2 * (4 * 2 * 3) * 5


def test_unknown_op_is_refused_not_counted_as_free() -> None:
    nodes = [helper.make_node("TopK", ["input", "k"], ["values", "indices"], axis=-1)]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 5])],
        [
            helper.make_tensor_value_info("values", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("indices", TensorProto.INT64, ["batch", 2]),
        ],
        [numpy_helper.from_array(np.array([2], dtype=np.int64), "k")],
    )
    with pytest.raises(UnknownOp, match="TopK"):
        count_flops(model)
