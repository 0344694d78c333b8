"""Protobuf ↔ the Open Inference Protocol's decoded form (`service.protocol.v2`).

A `ModelInferRequest` is turned into the same `InferRequest` the HTTP transport builds, through the
same per-tensor checks (`parse_input_tensor`, `parse_requested_outputs`): so a bad tensor gets the
same message on both protocols. Tensors come in `raw_input_contents` (what tritonclient.grpc sends)
or in typed `contents`.

Answers go out raw (`raw_output_contents`, what tritonclient.grpc reads; Triton answers raw always)
unless the request sent typed `contents` and asked no output as binary data: then in typed
`contents` (what the KServe SDK and MLServer clients read). Raw and typed never mix in one answer.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from service.oip_grpc.third_party import grpc_predict_v2_pb2 as pb
from service.protocol.v2 import (
    NUMPY_DTYPES,
    InferRequest,
    InputTensor,
    OutputTensor,
    V2ProtocolError,
    bytes_elements,
    parse_input_tensor,
    parse_parameters,
    parse_requested_outputs,
    tensor_bytes,
)

# The typed `InferTensorContents` field of each datatype (FP16 has none: raw only).
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameter_value(parameter: pb.InferParameter, where: str) -> bool | int | float | str:
    kind = parameter.WhichOneof("parameter_choice")
    if kind is None:
        raise V2ProtocolError(f"{where} has no value (set bool_param, int64_param, double_param, ...)")
    value: bool | int | float | str = getattr(parameter, kind)
    return value


def parameters_dict(parameters: Mapping[str, pb.InferParameter], where: str) -> dict[str, Any]:
    return {key: parameter_value(value, f"{where} parameter {key!r}") for key, value in parameters.items()}


def _typed_data(tensor: pb.ModelInferRequest.InferInputTensor, where: str) -> list[Any]:
    field = CONTENTS_FIELD.get(tensor.datatype)
    present = [descriptor.name for descriptor, _ in tensor.contents.ListFields()]
    if field is None:
        raise V2ProtocolError(
            f"{where}: {tensor.datatype} has no typed contents field; send raw_input_contents"
        )
    wrong = [name for name in present if name != field]
    if wrong:
        raise V2ProtocolError(
            f"{where}: {tensor.datatype} data goes in contents.{field}, got {', '.join(wrong)}"
        )
    return list(getattr(tensor.contents, field))


def decode_infer_request(
    request: pb.ModelInferRequest, accepted_datatypes: Collection[str]
) -> tuple[InferRequest, bool]:
    """(the decoded request, whether its tensors came raw). V2ProtocolError names what is wrong."""
    raw_contents = request.raw_input_contents
    raw = len(raw_contents) > 0
    if raw and len(raw_contents) != len(request.inputs):
        raise V2ProtocolError(
            f"raw_input_contents has {len(raw_contents)} entries for {len(request.inputs)} inputs "
            "(one per input, in input order)"
        )
    if not request.inputs:
        raise V2ProtocolError("'inputs' must be a non-empty list of tensors")
    inputs: dict[str, InputTensor] = {}
    for position, tensor in enumerate(request.inputs):
        where = f"input {tensor.name!r}" if tensor.name else f"inputs[{position}]"
        fields: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
            "parameters": parameters_dict(tensor.parameters, where),
        }
        binary: bytes | None = None
        if raw:
            if tensor.HasField("contents"):
                raise V2ProtocolError(f"{where} has typed contents, but the request uses raw_input_contents")
            binary = raw_contents[position]
            fields["parameters"]["binary_data_size"] = len(binary)
        elif tensor.datatype in NUMPY_DTYPES and tensor.datatype in accepted_datatypes:
            if not tensor.HasField("contents"):
                raise V2ProtocolError(f"{where} has neither contents nor raw_input_contents")
            fields["data"] = _typed_data(tensor, where)
        else:
            fields["data"] = []  # the datatype is refused by name below, before any data is read
        parsed = parse_input_tensor(fields, position, binary, accepted_datatypes)
        if parsed.name in inputs:
            raise V2ProtocolError(f"input {parsed.name!r} appears more than once")
        inputs[parsed.name] = parsed
    outputs = None
    if request.outputs:
        outputs = parse_requested_outputs(
            [
                {"name": o.name, "parameters": parameters_dict(o.parameters, f"output {o.name!r}")}
                for o in request.outputs
            ]
        )
    decoded = InferRequest(
        id=request.id or None,
        parameters=parse_parameters(parameters_dict(request.parameters, "request"), "request"),
        inputs=inputs,
        outputs=outputs,
    )
    return decoded, raw


def answer_raw(sent_raw: bool, outputs: Sequence[OutputTensor]) -> bool:
    """Raw unless the request came typed and asked no output binary (or an output has no typed field)."""
    return sent_raw or any(t.binary or t.datatype not in CONTENTS_FIELD for t in outputs)


def encode_infer_response(
    *, model_name: str, model_version: str, request_id: str | None, outputs: Sequence[OutputTensor], raw: bool
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id or "")
    for tensor in outputs:
        out = response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.data.shape)
        if raw:
            response.raw_output_contents.append(tensor_bytes(tensor))
        elif tensor.datatype == "BYTES":
            out.contents.bytes_contents.extend(bytes_elements(tensor.data))
        else:
            elements = np.ascontiguousarray(tensor.data, dtype=NUMPY_DTYPES[tensor.datatype]).ravel()
            getattr(out.contents, CONTENTS_FIELD[tensor.datatype]).extend(elements.tolist())
    return response
