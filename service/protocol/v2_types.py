"""Open Inference Protocol (V2) vocabulary: datatypes, the decoded request and response tensors, and
the protocol error. Shared by the decoder (`v2_decode`), the encoder (`v2_encode`) and gRPC.

The records are plain slotted dataclasses, not frozen ones: a frozen dataclass sets each field
through `object.__setattr__`, a cost paid several times per request on the hot path (issue 13).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_MEDIA_TYPE = "application/json"
BINARY_MEDIA_TYPE = "application/octet-stream"

# V2 datatype → little-endian numpy dtype. BYTES is variable-length: object arrays of `bytes`.
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}
DATATYPES: tuple[str, ...] = tuple(NUMPY_DTYPES)
NUMERIC_DATATYPES: frozenset[str] = frozenset(NUMPY_DTYPES) - {"BOOL", "BYTES"}

# BYTES elements on the wire: a 4-byte little-endian length, then the bytes
LENGTH_PREFIX = struct.Struct("<I")


class V2ProtocolError(ValueError):
    """A request that does not follow the protocol; the message says what is wrong (→ HTTP 400)."""


@dataclass(slots=True)
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: NDArray[Any]  # already shaped; object array of `bytes` for BYTES
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool | None  # None: follow the request's `binary_data_output`
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferRequest:
    id: str | None
    parameters: dict[str, Any]
    inputs: dict[str, InputTensor]  # in request order
    outputs: list[RequestedOutput] | None  # None: the client asked for every output

    @property
    def binary_data_output(self) -> bool:
        return self.parameters.get("binary_data_output") is True


@dataclass(slots=True)
class OutputTensor:
    name: str
    datatype: str
    data: NDArray[Any]
    binary: bool = False


@dataclass(slots=True)
class EncodedResponse:
    body: bytes
    media_type: str
    header_length: int | None  # set (the JSON length) when binary tensors follow the JSON

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.header_length is None else {HEADER_LENGTH: str(self.header_length)}
