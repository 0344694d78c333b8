"""The V2 codec against the stock Triton client's own encoder and decoder (no server involved).

Round trips: tensors encoded by `tritonclient.http` (binary and JSON) parse back to the same arrays;
responses we encode decode in `tritonclient.http` to the same arrays. Malformed bodies of every kind
raise `V2ProtocolError` — and nothing else.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service.protocol.v2 import (
    DATATYPES,
    NUMPY_DTYPES,
    OutputTensor,
    V2ProtocolError,
    datatype_of,
    encode_infer_response,
    parse_infer_request,
    select_outputs,
    serialize_bytes_tensor,
)

FIXED_SIZE = [d for d in DATATYPES if d != "BYTES"]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4)


@st.composite
def tensors(draw: st.DrawFn, *, json_safe: bool) -> tuple[str, np.ndarray]:
    """A (datatype, array) pair; `json_safe` keeps to values JSON can carry (finite, UTF-8 text)."""
    datatype = draw(st.sampled_from(DATATYPES))
    shape = draw(shapes)
    if datatype == "BYTES":
        element = st.text(max_size=6).map(str.encode) if json_safe else st.binary(max_size=6)
        values = draw(st.lists(element, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
        array = np.empty(len(values), dtype=np.object_)
        array[:] = values
        return datatype, array.reshape(shape)
    dtype = NUMPY_DTYPES[datatype]
    elements = (
        st.floats(width=8 * dtype.itemsize, allow_nan=False, allow_infinity=False)
        if json_safe and dtype.kind == "f"
        else None
    )
    return datatype, draw(hnp.arrays(dtype, shape, elements=elements))


def client_body(
    named: list[tuple[str, str, np.ndarray]], *, binary: bool, outputs: list[Any] | None = None
) -> tuple[bytes, str | None]:
    inputs = []
    for name, datatype, array in named:
        tensor = triton.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    body, json_size = triton.InferenceServerClient.generate_request_body(inputs, outputs=outputs)
    body = body if isinstance(body, bytes) else body.encode()
    return body, None if json_size is None else str(json_size)


def assert_same(datatype: str, got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    if datatype == "BYTES":
        assert got.ravel().tolist() == want.ravel().tolist()
    else:
        assert got.dtype == NUMPY_DTYPES[datatype]
        np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------------- round trips


@SETTINGS
@given(st.lists(tensors(json_safe=False), min_size=1, max_size=3))
def test_binary_request_from_tritonclient_round_trips(pairs: list[tuple[str, np.ndarray]]) -> None:
    named = [(f"in{i}", dt, arr) for i, (dt, arr) in enumerate(pairs)]
    body, header = client_body(named, binary=True)
    request = parse_infer_request(body, header)
    assert list(request.inputs) == [n for n, _, _ in named]
    for name, datatype, array in named:
        parsed = request.inputs[name]
        assert parsed.datatype == datatype
        assert_same(datatype, parsed.data, array)
    assert request.binary_data_output  # the client's default when it names no outputs


@SETTINGS
@given(st.lists(tensors(json_safe=True), min_size=1, max_size=3))
def test_json_request_from_tritonclient_round_trips(pairs: list[tuple[str, np.ndarray]]) -> None:
    named = [(f"in{i}", dt, arr) for i, (dt, arr) in enumerate(pairs)]
    body, header = client_body(named, binary=False)
    assert header is None
    request = parse_infer_request(body, header)
    for name, datatype, array in named:
        assert_same(datatype, request.inputs[name].data, array)


@SETTINGS
@given(
    st.lists(st.tuples(tensors(json_safe=True), st.booleans()), min_size=1, max_size=4),
    st.one_of(st.none(), st.text(max_size=8)),
)
def test_response_decodes_in_tritonclient(
    outputs: list[tuple[tuple[str, np.ndarray], bool]], request_id: str | None
) -> None:
    tensors_out = [
        OutputTensor(f"out{i}", datatype, array, binary)
        for i, ((datatype, array), binary) in enumerate(outputs)
    ]
    encoded = encode_infer_response(
        model_name="m", model_version="3", request_id=request_id, outputs=tensors_out
    )
    any_binary = any(t.binary for t in tensors_out)
    assert (encoded.header_length is not None) == any_binary
    assert encoded.media_type == ("application/octet-stream" if any_binary else "application/json")
    result = triton.InferenceServerClient.parse_response_body(
        encoded.body, header_length=encoded.header_length
    )
    response = result.get_response()
    assert response["model_name"] == "m" and response["model_version"] == "3"
    assert response.get("id") == request_id
    for tensor in tensors_out:
        got = result.as_numpy(tensor.name)
        if tensor.datatype == "BYTES":
            # tritonclient yields bytes from binary BYTES and str from JSON BYTES
            decoded = [x if isinstance(x, bytes) else x.encode() for x in got.ravel().tolist()]
            assert got.shape == tensor.data.shape
            assert decoded == tensor.data.ravel().tolist()
        else:
            assert_same(tensor.datatype, got.astype(NUMPY_DTYPES[tensor.datatype]), tensor.data)


def test_nested_and_flat_json_data_agree() -> None:
    flat = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6.5]}]}
    nested = {
        "inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[1, 2, 3], [4, 5, 6.5]]}]
    }
    a = parse_infer_request(orjson.dumps(flat)).inputs["x"].data
    b = parse_infer_request(orjson.dumps(nested)).inputs["x"].data
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 3) and a.dtype == np.float32


def test_bytes_wire_format_is_length_prefixed_little_endian() -> None:
    array = np.array([b"ab", b"", "\u00e9"], dtype=np.object_)
    assert serialize_bytes_tensor(array) == b"\x02\x00\x00\x00ab\x00\x00\x00\x00\x02\x00\x00\x00\xc3\xa9"


def test_label_names_as_numpy_strings_encode_as_bytes() -> None:
    labels = np.array(["cat", "dog"])
    assert datatype_of(labels) == "BYTES"
    encoded = encode_infer_response(
        model_name="m",
        model_version="1",
        request_id="r",
        outputs=[OutputTensor("label_name", "BYTES", labels)],
    )
    assert orjson.loads(encoded.body)["outputs"][0]["data"] == ["cat", "dog"]


def test_output_selection_and_binary_flags() -> None:
    body = orjson.dumps(
        {
            "parameters": {"binary_data_output": True},
            "inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [1]}],
            "outputs": [{"name": "b", "parameters": {"binary_data": False}}, {"name": "a"}],
        }
    )
    request = parse_infer_request(body)
    assert select_outputs(request, ["a", "b", "c"]) == [("b", False), ("a", True)]
    with pytest.raises(V2ProtocolError, match="unknown output 'zz'"):
        select_outputs(parse_infer_request(body.replace(b'"a"', b'"zz"')), ["a", "b"])
    no_outputs = parse_infer_request(orjson.dumps({"inputs": orjson.loads(body)["inputs"]}))
    assert select_outputs(no_outputs, ["a", "b"]) == [("a", False), ("b", False)]


# --------------------------------------------------------------------------------- malformed input


def one_input(**fields: Any) -> bytes:
    tensor = {"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]} | fields
    return orjson.dumps({"inputs": [tensor]})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "malformed"),
        (b"[1, 2]", "must be an object"),
        (orjson.dumps({"inputs": []}), "non-empty list"),
        (orjson.dumps({"inputs": [{"name": "x"}]}), "datatype"),
        (one_input(datatype="FLOAT32"), "datatype 'FLOAT32'"),
        (one_input(datatype="BF16"), "datatype 'BF16'"),
        (one_input(shape=[3]), "needs 3 elements but 'data' has 2"),
        (one_input(shape=[-1]), "non-negative"),
        (one_input(shape=[2.0]), "non-negative integers"),
        (one_input(shape=[10**12, 10**12]), "needs 1000000000000000000000000 elements"),
        (one_input(shape="2"), "'shape' must be a list"),
        (one_input(data=[1.0, "2"]), "cannot hold values of type str"),
        (one_input(data=[1.0, None]), "NoneType"),
        (one_input(data=[1.0, True]), "type bool"),
        (one_input(data=[[1.0], 2.0]), "mixes nested lists"),
        (one_input(datatype="UINT8", data=[1, 256]), "out of range for UINT8"),
        (one_input(datatype="INT8", data=[1, 2.5]), "INT8 'data' cannot hold values of type float"),
        (one_input(datatype="BOOL", data=[0, 1]), "BOOL 'data' cannot hold values of type int"),
        (one_input(data=None, parameters={}), "'data' must be a"),
        (orjson.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}), "neither 'data'"),
        (one_input(parameters={"binary_data_size": 8}), "both 'data' and"),
        (orjson.dumps({"id": 7, "inputs": []}), "'id' must be a string"),
        (one_input(parameters=[1]), "'parameters' must be an object"),
        (
            orjson.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}] * 2}),
            "more than once",
        ),
        (
            orjson.dumps(
                {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "outputs": {}}
            ),
            "'outputs' must be a list",
        ),
        (
            orjson.dumps(
                {
                    "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
                    "outputs": [{"name": "a", "parameters": {"classification": 3}}],
                }
            ),
            "classification extension",
        ),
    ],
)
def test_malformed_json_requests_are_protocol_errors(body: bytes, message: str) -> None:
    with pytest.raises(V2ProtocolError, match=message):
        parse_infer_request(body)


def binary_body(
    sizes: list[Any],
    payload: bytes,
    datatype: str = "FP32",
    shape: list[int] | None = None,
    names: list[str] | None = None,
) -> tuple[bytes, str]:
    """A binary-extension body: one input per declared `binary_data_size` (named x0, x1, … unless
    `names`), then `payload` as is; and its Inference-Header-Content-Length."""
    inputs = [
        {
            "name": names[i] if names else f"x{i}",
            "shape": shape or [2],
            "datatype": datatype,
            "parameters": {"binary_data_size": size},
        }
        for i, size in enumerate(sizes)
    ]
    header = orjson.dumps({"inputs": inputs})
    return header + payload, str(len(header))


@pytest.mark.parametrize(
    ("sizes", "payload", "datatype", "message"),
    [
        ([8], b"\x00" * 7, "FP32", "only 7 binary bytes remain"),
        ([8], b"\x00" * 9, "FP32", "1 bytes after the binary tensors"),
        ([4], b"\x00" * 4, "FP32", "binary_data_size is 4 bytes but shape x FP32 needs 8"),
        ([-8], b"\x00" * 8, "FP32", "non-negative integer"),
        ([2**62], b"\x00" * 8, "FP32", "only 8 binary bytes remain"),
        ([8.0], b"\x00" * 8, "FP32", "non-negative integer"),
        ([True], b"\x00" * 8, "FP32", "non-negative integer"),
        ([8, 8], b"\x00" * 12, "FP32", "only 4 binary bytes remain"),
        ([2], b"\x00\x02", "BOOL", "0 or 1"),
        ([6], b"\x01\x00\x00\x00a\x00", "BYTES", "cannot hold 2 BYTES"),
        ([10], b"\x05\x00\x00\x00ab\x00\x00\x00\x00", "BYTES", "truncated"),
        ([12], b"\x01\x00\x00\x00a\x01\x00\x00\x00b\x00\x00", "BYTES", "2 bytes left after 2 BYTES"),
    ],
)
def test_malformed_binary_requests_are_protocol_errors(
    sizes: list[Any], payload: bytes, datatype: str, message: str
) -> None:
    body, header = binary_body(sizes, payload, datatype)
    with pytest.raises(V2ProtocolError, match=message):
        parse_infer_request(body, header)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("abc", "non-negative integer"),
        ("-3", "non-negative"),
        ("0", "is 0"),
        ("99999", "is 99999 but the body has"),
    ],
)
def test_bad_header_length_is_a_protocol_error(header: str, message: str) -> None:
    body, _ = binary_body([8], b"\x00" * 8)
    with pytest.raises(V2ProtocolError, match=message):
        parse_infer_request(body, header)


def test_binary_input_without_header_is_a_protocol_error() -> None:
    body, _ = binary_body([8], b"")
    with pytest.raises(V2ProtocolError, match="no Inference-Header-Content-Length"):
        parse_infer_request(body, None)


def test_huge_shape_with_binary_is_refused_before_allocating() -> None:
    body, header = binary_body([8], b"\x00" * 8, "BYTES", shape=[2**40])
    with pytest.raises(V2ProtocolError, match="cannot hold 1099511627776 BYTES"):
        parse_infer_request(body, header)
    body, header = binary_body([8], b"\x00" * 8, "FP64", shape=[2**40, 2**20])
    with pytest.raises(V2ProtocolError, match="needs 9223372036854775808"):
        parse_infer_request(body, header)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
input_fields = st.fixed_dictionaries(
    {},
    optional={
        "name": st.one_of(st.just("x"), json_values),
        "datatype": st.one_of(st.sampled_from(DATATYPES), json_values),
        "shape": st.one_of(st.lists(st.integers(-2, 5), max_size=3), json_values),
        "data": json_values,
        "parameters": st.one_of(
            st.fixed_dictionaries({"binary_data_size": st.integers(-5, 64)}), json_values
        ),
    },
)


@settings(max_examples=300, deadline=None)
@given(st.lists(input_fields, min_size=0, max_size=3), st.binary(max_size=64), st.booleans())
def test_arbitrary_requests_parse_or_raise_protocol_error(
    inputs: list[dict[str, Any]], tail: bytes, with_header: bool
) -> None:
    header = orjson.dumps({"inputs": inputs, "outputs": [{"name": "a"}]})
    body = header + tail if with_header else header
    try:
        request = parse_infer_request(body, str(len(header)) if with_header else None)
    except V2ProtocolError:
        return
    for tensor in request.inputs.values():
        assert tensor.data.shape == tensor.shape


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.one_of(st.none(), st.integers(-5, 250).map(str), st.text(max_size=5)))
def test_arbitrary_bytes_never_crash_the_parser(body: bytes, header: str | None) -> None:
    with contextlib.suppress(V2ProtocolError):
        parse_infer_request(body, header)


@settings(max_examples=100, deadline=None)
@given(tensors(json_safe=False), st.integers(min_value=1, max_value=8))
def test_truncated_or_padded_client_bodies_are_refused(pair: tuple[str, np.ndarray], cut: int) -> None:
    datatype, array = pair
    body, header = client_body([("x", datatype, array)], binary=True)
    assert header is not None
    if len(body) - int(header) >= cut:
        with pytest.raises(V2ProtocolError):
            parse_infer_request(body[:-cut], header)
    with pytest.raises(V2ProtocolError):
        parse_infer_request(body + b"\x00" * cut, header)


def test_unaccepted_datatype_is_refused_before_decoding() -> None:
    # 1 MiB of BYTES elements: refused on the datatype, never decoded element by element
    body, header = binary_body([2**20], b"\x00" * 2**20, "BYTES", shape=[2**18])
    with pytest.raises(V2ProtocolError, match="datatype BYTES is not accepted here"):
        parse_infer_request(body, header, accepted_datatypes={"FP32", "FP64"})
    assert parse_infer_request(body, header).inputs["x0"].data.shape == (2**18,)
