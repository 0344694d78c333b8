"""Open Inference Protocol (V2) request decoding: JSON, or JSON + binary tensors, into `InferRequest`.

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
from collections.abc import Collection, Iterable
from itertools import chain
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray

from service.protocol.v2_types import (
    DATATYPES,
    HEADER_LENGTH,
    LENGTH_PREFIX,
    NUMPY_DTYPES,
    InferRequest,
    InputTensor,
    RequestedOutput,
    V2ProtocolError,
)

# Python types a JSON `data` element may have, per datatype family (bool is not a number here).
_JSON_ELEMENT_TYPES: dict[str, frozenset[type]] = {
    "BOOL": frozenset({bool}),
    "INT": frozenset({int}),
    "FP": frozenset({int, float}),
    "BYTES": frozenset({str}),
}
_MAX_DIMS = 32
_MAX_ELEMENTS = 2**40  # far beyond any body the server accepts; below numpy's index range


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
    if count * LENGTH_PREFIX.size > len(raw):
        raise V2ProtocolError(f"{where}: {len(raw)} bytes cannot hold {count} BYTES elements")
    out = np.empty(count, dtype=np.object_)
    offset = 0
    for i in range(count):
        if offset + LENGTH_PREFIX.size > len(raw):
            raise V2ProtocolError(f"{where}: BYTES element {i} is truncated")
        (length,) = LENGTH_PREFIX.unpack_from(raw, offset)
        offset += LENGTH_PREFIX.size
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
