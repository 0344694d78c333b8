"""Open Inference Protocol (KServe V2 / Triton HTTP) codec: request bodies in, response bodies out.

Pure functions over bytes and numpy arrays; no web framework here, so the codec is testable alone.

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

from __future__ import annotations

import math
import struct
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import orjson
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

# Python types a JSON `data` element may have, per datatype family (bool is not a number here).
_JSON_ELEMENT_TYPES: dict[str, frozenset[type]] = {
    "BOOL": frozenset({bool}),
    "INT": frozenset({int}),
    "FP": frozenset({int, float}),
    "BYTES": frozenset({str}),
}
_MAX_DIMS = 32
_MAX_ELEMENTS = 2**40  # far beyond any body the server accepts; below numpy's index range
_LENGTH_PREFIX = struct.Struct("<I")


class V2ProtocolError(ValueError):
    """A request that does not follow the protocol; the message says what is wrong (→ HTTP 400)."""


@dataclass(frozen=True)
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: NDArray[Any]  # already shaped; object array of `bytes` for BYTES
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool | None  # None: follow the request's `binary_data_output`
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    parameters: dict[str, Any]
    inputs: dict[str, InputTensor]  # in request order
    outputs: list[RequestedOutput] | None  # None: the client asked for every output

    @property
    def binary_data_output(self) -> bool:
        return self.parameters.get("binary_data_output") is True


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    data: NDArray[Any]
    binary: bool = False


@dataclass(frozen=True)
class EncodedResponse:
    body: bytes
    media_type: str
    header_length: int | None  # set (the JSON length) when binary tensors follow the JSON

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.header_length is None else {HEADER_LENGTH: str(self.header_length)}


# ---------------------------------------------------------------------------------------- requests


def parse_header_length(value: str | None, body_length: int) -> int | None:
    """The `Inference-Header-Content-Length` header as an int within the body (None when absent)."""
    if value is None:
        return None
    text = value.strip()
    if not text.isascii() or not text.isdigit():
        raise V2ProtocolError(f"{HEADER_LENGTH} must be a non-negative integer, got {value!r}")
    length = int(text)
    if length == 0 or length > body_length:
        raise V2ProtocolError(f"{HEADER_LENGTH} is {length} but the body has {body_length} bytes")
    return length


def parse_infer_request(
    body: bytes, header_length: str | None = None, *, accepted_datatypes: Collection[str] = DATATYPES
) -> InferRequest:
    """Parse a V2 infer request body: JSON, or JSON + binary tensors when `header_length` (the
    `Inference-Header-Content-Length` header's value) is given.

    An input whose datatype is not in `accepted_datatypes` is refused before its data is decoded
    (BYTES decoding is a loop per element: a server that cannot use BYTES should not pay for it).
    """
    json_length = parse_header_length(header_length, len(body))
    header = body if json_length is None else body[:json_length]
    try:
        document = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise V2ProtocolError(f"request JSON is malformed: {exc}") from None
    if not isinstance(document, dict):
        raise V2ProtocolError("request JSON must be an object with an 'inputs' list")

    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise V2ProtocolError("'id' must be a string")
    parameters = _parameters(document.get("parameters"), "request")

    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise V2ProtocolError("'inputs' must be a non-empty list of tensors")
    binary = memoryview(body)[json_length:] if json_length is not None else None
    offset = 0
    inputs: dict[str, InputTensor] = {}
    for position, raw in enumerate(raw_inputs):
        tensor, offset = _parse_input(raw, position, binary, offset, accepted_datatypes)
        if tensor.name in inputs:
            raise V2ProtocolError(f"input {tensor.name!r} appears more than once")
        inputs[tensor.name] = tensor
    if binary is not None and offset != len(binary):
        raise V2ProtocolError(
            f"body has {len(binary) - offset} bytes after the binary tensors declared in the header "
            f"({len(binary)} binary bytes received, {offset} declared)"
        )

    return InferRequest(
        id=request_id,
        parameters=parameters,
        inputs=inputs,
        outputs=_parse_outputs(document.get("outputs")),
    )


def parse_input_tensor(
    raw: dict[str, Any], position: int, binary: bytes | None, accepted_datatypes: Collection[str]
) -> InputTensor:
    """One input tensor from its decoded fields (the JSON request's form): `binary`, when given, is
    all of its raw bytes (declared by `parameters.binary_data_size`). The gRPC transport decodes its
    protobuf inputs through this, so both protocols apply the same checks with the same messages."""
    view = memoryview(binary) if binary is not None else None
    tensor, offset = _parse_input(raw, position, view, 0, accepted_datatypes)
    if view is not None and offset != len(view):
        raise V2ProtocolError(f"input {tensor.name!r}: {len(view) - offset} bytes left after the tensor")
    return tensor


def parse_parameters(raw: object, where: str) -> dict[str, Any]:
    """A `parameters` object as a dict (or V2ProtocolError naming `where`)."""
    return _parameters(raw, where)


def parse_requested_outputs(raw: object) -> list[RequestedOutput] | None:
    """The request's `outputs` list (names, binary flags), checked as for JSON."""
    return _parse_outputs(raw)


def _parameters(raw: object, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise V2ProtocolError(f"{where} 'parameters' must be an object")
    return raw


def _parse_input(
    raw: object, position: int, binary: memoryview | None, offset: int, accepted: Collection[str]
) -> tuple[InputTensor, int]:
    if not isinstance(raw, dict):
        raise V2ProtocolError(f"inputs[{position}] must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise V2ProtocolError(f"inputs[{position}] needs a non-empty string 'name'")
    where = f"input {name!r}"
    datatype = raw.get("datatype")
    if not isinstance(datatype, str) or datatype not in NUMPY_DTYPES:
        raise V2ProtocolError(f"{where}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
    if datatype not in accepted:
        expected = ", ".join(d for d in DATATYPES if d in accepted)
        raise V2ProtocolError(
            f"{where}: datatype {datatype} is not accepted here (expected one of {expected})"
        )
    shape = _parse_shape(raw.get("shape"), where)
    count = math.prod(shape)  # a Python int: huge shapes cannot overflow, they just mismatch below
    # ... except an empty one: numpy refuses to shape even 0 elements as [0, 2**62, 4] (its index
    # range is checked on the non-zero dimensions), so such a shape is refused here, by name
    if count == 0 and math.prod(d for d in shape if d) > _MAX_ELEMENTS:
        raise V2ProtocolError(f"{where}: 'shape' {list(shape)} is too large")
    parameters = _parameters(raw.get("parameters"), where)
    size = parameters.get("binary_data_size")
    has_data = "data" in raw

    if size is None:
        if not has_data:
            raise V2ProtocolError(f"{where} has neither 'data' nor parameters.binary_data_size")
        array = _array_from_json(raw["data"], datatype, count, where)
    else:
        if has_data:
            raise V2ProtocolError(f"{where} has both 'data' and parameters.binary_data_size")
        if type(size) is not int or size < 0:
            raise V2ProtocolError(f"{where}: binary_data_size must be a non-negative integer, got {size!r}")
        if binary is None:
            raise V2ProtocolError(
                f"{where} declares binary_data_size but the request has no {HEADER_LENGTH} header"
            )
        available = len(binary) - offset
        if size > available:
            raise V2ProtocolError(
                f"{where}: binary_data_size {size} but only {available} binary bytes remain in the body"
            )
        array = _array_from_binary(binary[offset : offset + size], datatype, count, where)
        offset += size
    return InputTensor(name, datatype, shape, array.reshape(shape), parameters), offset


def _parse_shape(raw: object, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or len(raw) > _MAX_DIMS:
        raise V2ProtocolError(f"{where}: 'shape' must be a list of at most {_MAX_DIMS} integers")
    if any(type(d) is not int or d < 0 for d in raw):
        raise V2ProtocolError(f"{where}: 'shape' dimensions must be non-negative integers, got {raw}")
    return tuple(raw)


def _flatten(data: object, where: str) -> list[Any]:
    """Row-major elements of flat or nested `data` (each nesting level all lists or all scalars)."""
    if not isinstance(data, list):
        raise V2ProtocolError(f"{where}: 'data' must be a (flat or nested) list")
    level: list[Any] = data
    while level and any(type(x) is list for x in level):
        if not all(type(x) is list for x in level):
            raise V2ProtocolError(f"{where}: 'data' mixes nested lists and scalars at the same depth")
        level = list(chain.from_iterable(level))
    return level


def _family(datatype: str) -> str:
    if datatype in ("BOOL", "BYTES"):
        return datatype
    return "FP" if datatype.startswith("FP") else "INT"


def _array_from_json(data: object, datatype: str, count: int, where: str) -> NDArray[Any]:
    elements = _flatten(data, where)
    if len(elements) != count:
        raise V2ProtocolError(f"{where}: shape needs {count} elements but 'data' has {len(elements)}")
    allowed = _JSON_ELEMENT_TYPES[_family(datatype)]
    wrong = {type(x) for x in elements} - allowed
    if wrong:
        got = ", ".join(sorted(t.__name__ for t in wrong))
        raise V2ProtocolError(f"{where}: {datatype} 'data' cannot hold values of type {got}")
    if datatype == "BYTES":
        out = np.empty(count, dtype=np.object_)
        out[:] = [s.encode("utf-8") for s in elements]
        return out
    try:
        with np.errstate(over="ignore"):  # FP16/FP32 overflow → ±inf; the model rejects non-finite rows
            return np.array(elements, dtype=NUMPY_DTYPES[datatype])
    except (OverflowError, ValueError) as exc:
        raise V2ProtocolError(f"{where}: value out of range for {datatype} ({exc})") from None


def _array_from_binary(raw: memoryview, datatype: str, count: int, where: str) -> NDArray[Any]:
    if datatype == "BYTES":
        return _deserialize_bytes(raw, count, where)
    dtype = NUMPY_DTYPES[datatype]
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise V2ProtocolError(
            f"{where}: binary_data_size is {len(raw)} bytes but shape x {datatype} needs {expected}"
        )
    if datatype == "BOOL":
        as_bytes = np.frombuffer(raw, dtype=np.uint8)
        if as_bytes.size and as_bytes.max() > 1:
            raise V2ProtocolError(f"{where}: BOOL bytes must be 0 or 1")
        return as_bytes.astype(np.bool_)
    return np.frombuffer(raw, dtype=dtype)


def _deserialize_bytes(raw: memoryview, count: int, where: str) -> NDArray[Any]:
    # Each element needs at least its 4-byte length prefix: refuse before looping over `count`.
    if count * _LENGTH_PREFIX.size > len(raw):
        raise V2ProtocolError(f"{where}: {len(raw)} bytes cannot hold {count} BYTES elements")
    out = np.empty(count, dtype=np.object_)
    offset = 0
    for i in range(count):
        if offset + _LENGTH_PREFIX.size > len(raw):
            raise V2ProtocolError(f"{where}: BYTES element {i} is truncated")
        (length,) = _LENGTH_PREFIX.unpack_from(raw, offset)
        offset += _LENGTH_PREFIX.size
        if offset + length > len(raw):
            raise V2ProtocolError(f"{where}: BYTES element {i} is truncated")
        out[i] = bytes(raw[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise V2ProtocolError(f"{where}: {len(raw) - offset} bytes left after {count} BYTES elements")
    return out


def _parse_outputs(raw: object) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise V2ProtocolError("'outputs' must be a list of {name, parameters?} objects")
    outputs: list[RequestedOutput] = []
    seen: set[str] = set()
    for position, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise V2ProtocolError(f"outputs[{position}] must be an object with a string 'name'")
        name: str = item["name"]
        if name in seen:
            raise V2ProtocolError(f"output {name!r} is requested more than once")
        seen.add(name)
        parameters = _parameters(item.get("parameters"), f"output {name!r}")
        if parameters.get("classification"):
            raise V2ProtocolError(f"output {name!r}: the classification extension is not supported")
        binary = parameters.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise V2ProtocolError(f"output {name!r}: parameters.binary_data must be true or false")
        outputs.append(RequestedOutput(name, binary, parameters))
    return outputs


def select_outputs(request: InferRequest, available: Iterable[str]) -> list[tuple[str, bool]]:
    """(name, binary?) of each output to return: the requested ones in request order, else all."""
    names = list(available)
    default_binary = request.binary_data_output
    if request.outputs is None:
        return [(name, default_binary) for name in names]
    known = set(names)
    for output in request.outputs:
        if output.name not in known:
            raise V2ProtocolError(f"unknown output {output.name!r}; this model has: {', '.join(names)}")
    return [(o.name, default_binary if o.binary is None else o.binary) for o in request.outputs]


# --------------------------------------------------------------------------------------- responses


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
    return b"".join(chain.from_iterable((_LENGTH_PREFIX.pack(len(e)), e) for e in elements))


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
