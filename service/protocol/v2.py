"""Open Inference Protocol (KServe V2 / Triton HTTP) codec: request bodies in, response bodies out.

Pure functions over bytes and numpy arrays; no web framework here, so the codec is testable alone.
This module is its one import point; the parts live in `v2_types` (datatypes, records, the error),
`v2_decode` (requests) and `v2_encode` (responses).

Request bodies come in two forms (both what stock `tritonclient.http` sends):
  JSON           the whole body is the JSON request; each input carries `data` (flat or nested,
                 row-major).
  binary tensor  the first `Inference-Header-Content-Length` bytes are the JSON request; each binary
                 input carries `"parameters": {"binary_data_size": N}` and no `data`, and its N raw
                 little-endian bytes follow the JSON, in input order, with nothing after the last.
                 BYTES elements are each a 4-byte little-endian length followed by that many bytes.

Every malformed request raises `V2ProtocolError` (the routes answer it with 400) with a message that
names the problem. Sizes are checked against the bytes actually received *before* anything is
allocated, so a request cannot make the server allocate more than its own length.
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
