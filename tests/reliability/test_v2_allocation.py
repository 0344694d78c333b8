"""The V2 binary-extension parser never allocates much more than the body it was given.

tests/service/test_v2_codec.py already checks that malformed binary bodies (truncated, header
length off, negative/huge `binary_data_size`, datatype/shape mismatch, duplicate names) raise a
protocol error. What it does not measure is memory: here Hypothesis builds hostile binary requests
— shapes whose element count is astronomically larger than the bytes sent, sizes that lie, BYTES
elements whose length prefixes claim gigabytes — and tracemalloc checks the parser's peak
allocation stays within a small multiple of the body, whether it accepts or refuses.
"""

from __future__ import annotations

import contextlib
import tracemalloc
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.protocol.v2 import V2ProtocolError, parse_infer_request

DATATYPES = ["BOOL", "UINT8", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"]
huge_dims = st.one_of(st.integers(0, 64), st.integers(2**20, 2**40), st.just(2**62))


@st.composite
def hostile_binary_request(draw: st.DrawFn) -> tuple[bytes, str]:
    inputs: list[dict[str, Any]] = []
    payload = b""
    for i in range(draw(st.integers(1, 3))):
        raw = draw(st.binary(max_size=512))
        if draw(st.booleans()):  # BYTES-style length prefixes that claim far more than is there
            raw = draw(st.sampled_from([b"\xff\xff\xff\x7f", b"\x00\x00\x00\x40", b"\x10\x00\x00\x00"])) + raw
        declared = draw(st.one_of(st.just(len(raw)), st.integers(0, 2**40), st.integers(-(2**31), -1)))
        inputs.append(
            {
                "name": draw(st.sampled_from([f"x{i}", "x0"])),  # sometimes a duplicate name
                "datatype": draw(st.sampled_from(DATATYPES)),
                "shape": draw(st.lists(huge_dims, min_size=1, max_size=3)),
                "parameters": {"binary_data_size": declared},
            }
        )
        payload += raw
    header = orjson.dumps({"inputs": inputs})
    declared_header = draw(st.one_of(st.just(len(header)), st.integers(0, len(header) + len(payload) + 8)))
    return header + payload, str(declared_header)


@settings(max_examples=300, deadline=None, database=None)
@given(hostile_binary_request())
def test_hostile_binary_requests_never_over_allocate(request: tuple[bytes, str]) -> None:
    body, header_length = request
    tracemalloc.start()
    try:
        with contextlib.suppress(V2ProtocolError):
            parse_infer_request(body, header_length)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # decoded tensors may be a few times the raw bytes (e.g. BOOL → object-free bool arrays, BYTES →
    # an object array of small bytes), never proportional to a declared shape or size
    assert peak <= 64 * len(body) + 256 * 1024, (peak, len(body))


def test_an_empty_tensor_with_astronomical_dimensions_is_a_clear_error() -> None:
    """Found by the property above: numpy refuses to shape even an empty array whose non-zero
    dimensions overflow its index range, which escaped as a ValueError (a 500) before."""
    for shape in ([0, 2**62, 4], [2**20, 0, 2**40, 2**20]):
        tensor = {"name": "x", "datatype": "FP32", "shape": shape, "parameters": {"binary_data_size": 0}}
        header = orjson.dumps({"inputs": [tensor]})
        with pytest.raises(V2ProtocolError, match="too large"):
            parse_infer_request(header, str(len(header)))
    # an honest empty tensor still parses
    tensor = {"name": "x", "datatype": "FP32", "shape": [0, 64], "parameters": {"binary_data_size": 0}}
    header = orjson.dumps({"inputs": [tensor]})
    (parsed,) = parse_infer_request(header, str(len(header))).inputs.values()
    assert parsed.data.shape == (0, 64)
