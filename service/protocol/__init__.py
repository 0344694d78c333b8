"""Wire protocols spoken by the server. `v2`: the Open Inference Protocol (KServe V2 / Triton HTTP) codec."""

from service.protocol.v2 import (
    DATATYPES,
    HEADER_LENGTH,
    EncodedResponse,
    InferRequest,
    InputTensor,
    OutputTensor,
    RequestedOutput,
    V2ProtocolError,
    encode_infer_response,
    parse_infer_request,
    select_outputs,
)

__all__ = [
    "DATATYPES",
    "HEADER_LENGTH",
    "EncodedResponse",
    "InferRequest",
    "InputTensor",
    "OutputTensor",
    "RequestedOutput",
    "V2ProtocolError",
    "encode_infer_response",
    "parse_infer_request",
    "select_outputs",
]
