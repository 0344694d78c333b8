"""One ensemble member as its own ONNX graph, cut out of `ensemble.onnx`.

`ensemble.onnx` (training/export.py) computes every member on the shared input, concatenates their
per-head outputs on axis 1 and applies the output op(s) once (LogSoftmax for classification):

    input -> member_0 ... member_{M-1} -> Concat(axis=1) -> LogSoftmax -> log_probs (batch, M, K)

`extract_member` keeps only the subgraph that computes member `m`'s Concat input and re-applies the
ops between the Concat and the output, so the result honours the same contract with M = 1: the
single model the ensemble is made of, measured with the same kernels the ensemble graph uses.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper, shape_inference, utils

INPUT_NAME = "input"


class NotAnEnsembleGraph(ValueError):
    """The graph does not end in Concat(members) -> element-wise output ops."""


def _producer(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def extract_member(ensemble: onnx.ModelProto, member: int = 0, output: str = "log_probs") -> onnx.ModelProto:
    graph = ensemble.graph
    producers = _producer(graph)
    tail: list[onnx.NodeProto] = []  # ops between the Concat and the output, last first
    name = output
    while True:
        node = producers.get(name)
        if node is None:
            raise NotAnEnsembleGraph(f"output {output!r} is not produced by a Concat of members")
        if node.op_type == "Concat":
            break
        if len(node.input) != 1:
            raise NotAnEnsembleGraph(
                f"{node.op_type} {node.name!r} between Concat and {output!r} has several inputs"
            )
        tail.append(node)
        name = node.input[0]
    concat = node
    if not 0 <= member < len(concat.input):
        raise ValueError(f"member {member} out of range: the ensemble has {len(concat.input)} members")
    member_out = concat.input[member]
    # the Extractor needs value_info for the cut point: infer it first
    cut = utils.Extractor(shape_inference.infer_shapes(ensemble)).extract_model([INPUT_NAME], [member_out])
    previous = member_out
    for i, node in enumerate(reversed(tail)):
        final = i == len(tail) - 1
        out = output if final else f"{node.output[0]}__member"
        cut.graph.node.append(
            helper.make_node(node.op_type, [previous], [out], name=f"{node.name}__member", domain=node.domain)
        )
        cut.graph.node[-1].attribute.extend(node.attribute)
        previous = out
    kept = [o for o in graph.output if o.name == output]
    del cut.graph.output[:]
    cut.graph.output.extend(kept)
    # the member's output has 1 head where the ensemble's had M: leave that dim to shape inference
    dims = cut.graph.output[0].type.tensor_type.shape.dim
    if len(dims) > 1:
        dims[1].Clear()
        dims[1].dim_param = "heads"
    onnx.checker.check_model(cut, full_check=True)
    return cut


def write_member(ensemble_path: Path, out_path: Path, member: int = 0) -> Path:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(extract_member(onnx.load(str(ensemble_path)), member), str(out_path))
    return out_path
