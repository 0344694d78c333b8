"""Open Inference Protocol (V2) response encoding: output tensors into a JSON body, or JSON + raw
little-endian tensors when any output is binary (the binary tensor extension)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray

from service.protocol.v2_types import (
    BINARY_MEDIA_TYPE,
    JSON_MEDIA_TYPE,
    LENGTH_PREFIX,
    NUMPY_DTYPES,
    EncodedResponse,
    OutputTensor,
)


def datatype_of(array: NDArray[Any]) -> str:
    """The V2 datatype of a numpy array (strings and bytes → BYTES)."""
    if array.dtype.kind in "OUS":
        return "BYTES"
    for name, dtype in NUMPY_DTYPES.items():
        if name != "BYTES" and array.dtype.newbyteorder("<") == dtype:
            return name
    raise ValueError(f"no V2 datatype for numpy dtype {array.dtype}")


def _as_bytes_elements(array: NDArray[Any]) -> list[bytes]:
    return [x if isinstance(x, bytes) else str(x).encode("utf-8") for x in array.ravel().tolist()]


def serialize_bytes_tensor(array: NDArray[Any]) -> bytes:
    """BYTES wire format: per element a 4-byte little-endian length, then the element's bytes."""
    elements = _as_bytes_elements(array)
    return b"".join(chain.from_iterable((LENGTH_PREFIX.pack(len(e)), e) for e in elements))


def _tensor_bytes(tensor: OutputTensor) -> bytes:
    if tensor.datatype == "BYTES":
        return serialize_bytes_tensor(tensor.data)
    dtype = NUMPY_DTYPES[tensor.datatype]
    return np.ascontiguousarray(tensor.data, dtype=dtype).tobytes()


def bytes_elements(array: NDArray[Any]) -> list[bytes]:
    """A BYTES tensor's elements as `bytes` (strings UTF-8 encoded), row-major."""
    return _as_bytes_elements(array)


def tensor_bytes(tensor: OutputTensor) -> bytes:
    """An output tensor's raw little-endian bytes (BYTES: length-prefixed elements)."""
    return _tensor_bytes(tensor)


def _json_data(tensor: OutputTensor) -> object:
    if tensor.datatype == "BYTES":
        # JSON BYTES elements are strings; undecodable bytes are escaped rather than dropped.
        return [e.decode("utf-8", errors="backslashreplace") for e in _as_bytes_elements(tensor.data)]
    # orjson serialises contiguous numeric numpy arrays natively (no per-element Python objects).
    return np.ascontiguousarray(tensor.data, dtype=NUMPY_DTYPES[tensor.datatype]).ravel()


def encode_infer_response(
    *,
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: Sequence[OutputTensor],
    parameters: dict[str, Any] | None = None,
) -> EncodedResponse:
    """A V2 infer response: plain JSON, or JSON + raw tensors when any output is binary."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for tensor in outputs:
        if tensor.datatype not in NUMPY_DTYPES:
            raise ValueError(f"output {tensor.name!r}: unknown datatype {tensor.datatype!r}")
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.data.shape),
        }
        if tensor.binary:
            blob = _tensor_bytes(tensor)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(tensor)
        entries.append(entry)
    document: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        document["id"] = request_id
    if parameters:
        document["parameters"] = parameters
    document["outputs"] = entries
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return EncodedResponse(header, JSON_MEDIA_TYPE, None)
    return EncodedResponse(header + b"".join(blobs), BINARY_MEDIA_TYPE, len(header))
