"""Open Inference Protocol (KServe V2 / Triton HTTP) codec: request bodies in, response bodies out.

Pure functions over bytes and numpy arrays; no web framework here, so the codec is testable alone.
This module is its one import point; the parts live in `v2_types` (datatypes, records, the error),
`v2_decode` (requests) and `v2_encode` (responses).

The two request body forms (JSON; JSON + binary tensors) and the error contract are described in
`v2_decode`.
"""

from service.protocol.v2_decode import (
    parse_header_length,
    parse_infer_request,
    parse_input_tensor,
    parse_parameters,
    parse_requested_outputs,
    select_outputs,
)
from service.protocol.v2_encode import (
    bytes_elements,
    datatype_of,
    encode_infer_response,
    serialize_bytes_tensor,
    tensor_bytes,
)
from service.protocol.v2_types import (
    BINARY_MEDIA_TYPE,
    DATATYPES,
    HEADER_LENGTH,
    JSON_MEDIA_TYPE,
    NUMERIC_DATATYPES,
    NUMPY_DTYPES,
    EncodedResponse,
    InferRequest,
    InputTensor,
    OutputTensor,
    RequestedOutput,
    V2ProtocolError,
)

__all__ = [
    "BINARY_MEDIA_TYPE",
    "DATATYPES",
    "HEADER_LENGTH",
    "JSON_MEDIA_TYPE",
    "NUMERIC_DATATYPES",
    "NUMPY_DTYPES",
    "EncodedResponse",
    "InferRequest",
    "InputTensor",
    "OutputTensor",
    "RequestedOutput",
    "V2ProtocolError",
    "bytes_elements",
    "datatype_of",
    "encode_infer_response",
    "parse_header_length",
    "parse_infer_request",
    "parse_input_tensor",
    "parse_parameters",
    "parse_requested_outputs",
    "select_outputs",
    "serialize_bytes_tensor",
    "tensor_bytes",
]
