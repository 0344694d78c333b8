"""Hypothesis over the protobuf fields of ModelInferRequest (and over raw bytes) against a real server.

Requests are built field by field: model names and versions that exist or not, parameters of every
InferParameter kind (and none) under the names the server reads, input tensors with any datatype,
shape (negative, huge, empty), typed contents in the right or wrong field, raw contents of the right
or wrong size, requested outputs that exist or not. Half of them are made valid enough to reach the
batcher. Checked on every answer: OK or a client-error status code with a message — never INTERNAL
or UNKNOWN — and the server stays up. Each drawn request goes to a one-process server and to a
two-worker one. `make test` sends each a few hundred; the slow variant 10,000.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.oip_grpc.third_party import grpc_predict_v2_pb2 as pb
from service.protocol.v2 import DATATYPES
from tests.service.support import CLF_FEATURES, REG_FEATURES, Server, running_server

INFER = "/inference.GRPCInferenceService/ModelInfer"
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,  # queue full under the fuzzer's own load
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
FEATURES = {"clf": CLF_FEATURES, "reg": REG_FEATURES}
OUTPUT_NAMES = ["probabilities", "label_name", "mean", "ood_flag", "heads", "heads_mean", "nope", ""]
CONTENT_FIELDS = [
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
    "bytes_contents",
]

text = st.text(max_size=12)
int64 = st.integers(-(2**63), 2**63 - 1)


@st.composite
def parameter(draw: st.DrawFn) -> pb.InferParameter:
    value = pb.InferParameter()
    kind = draw(st.sampled_from(["none", "bool", "int64", "string", "double", "uint64"]))
    if kind == "bool":
        value.bool_param = draw(st.booleans())
    elif kind == "int64":
        value.int64_param = draw(int64)
    elif kind == "string":
        value.string_param = draw(text)
    elif kind == "double":
        value.double_param = draw(st.floats(allow_nan=True, allow_infinity=True))
    elif kind == "uint64":
        value.uint64_param = draw(st.integers(0, 2**64 - 1))
    return value


parameter_names = (
    st.sampled_from(
        ["alpha", "interval_level", "heads", "timeout", "binary_data_output", "binary_data", "priority"]
    )
    | text
)


def fill_parameters(target: object, drawn: dict[str, pb.InferParameter]) -> None:
    for key, value in drawn.items():
        target[key].CopyFrom(value)  # type: ignore[index]


@st.composite
def infer_request(draw: st.DrawFn) -> bytes:
    model = draw(st.sampled_from(["clf", "reg", "", "nope"]) | text)
    request = pb.ModelInferRequest(
        model_name=model,
        model_version=draw(st.sampled_from(["", "1", "2", "01", "-1"]) | text),
        id=draw(text),
    )
    fill_parameters(request.parameters, draw(st.dictionaries(parameter_names, parameter(), max_size=4)))
    valid_shape = draw(st.booleans())
    features = FEATURES.get(model, CLF_FEATURES)
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        rows = draw(st.integers(0, 5))
        shape = (
            [rows, features]
            if valid_shape
            else draw(st.lists(st.integers(-3, 2**40) | int64, max_size=draw(st.integers(0, 40))))
        )
        tensor = request.inputs.add(
            name=draw(st.sampled_from(["input", ""]) | text),
            datatype=draw(st.sampled_from([*DATATYPES, "FP8", ""]) | text),
            shape=shape,
        )
        fill_parameters(tensor.parameters, draw(st.dictionaries(parameter_names, parameter(), max_size=2)))
        count = int(np.prod(shape)) if valid_shape else draw(st.integers(0, 64))
        if raw:
            size = count * 4 if draw(st.booleans()) else draw(st.integers(0, 300))
            request.raw_input_contents.append(draw(st.binary(min_size=size, max_size=size)))
        else:
            field = draw(st.sampled_from(CONTENT_FIELDS))
            n = count if draw(st.booleans()) else draw(st.integers(0, 70))
            if field == "bytes_contents":
                values: list[object] = draw(st.lists(st.binary(max_size=4), min_size=n, max_size=n))
            elif field == "bool_contents":
                values = draw(st.lists(st.booleans(), min_size=n, max_size=n))
            elif field in ("fp32_contents", "fp64_contents"):
                width = 32 if field == "fp32_contents" else 64
                values = draw(st.lists(st.floats(width=width), min_size=n, max_size=n))
            elif field in ("int_contents",):
                values = draw(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=n, max_size=n))
            elif field == "int64_contents":
                values = draw(st.lists(int64, min_size=n, max_size=n))
            elif field == "uint_contents":
                values = draw(st.lists(st.integers(0, 2**32 - 1), min_size=n, max_size=n))
            else:
                values = draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n))
            getattr(tensor.contents, field).extend(values)
    if draw(st.booleans()) and request.inputs:  # a stray raw entry, or one too many
        request.raw_input_contents.append(draw(st.binary(max_size=16)))
    for name in draw(st.lists(st.sampled_from(OUTPUT_NAMES) | text, max_size=3)):
        output = request.outputs.add(name=name)
        fill_parameters(output.parameters, draw(st.dictionaries(parameter_names, parameter(), max_size=2)))
    serialized = request.SerializeToString()
    mangle = draw(st.sampled_from(["none", "none", "none", "truncate", "flip", "garbage"]))
    if mangle == "truncate" and serialized:
        serialized = serialized[: draw(st.integers(0, len(serialized) - 1))]
    elif mangle == "flip" and serialized:
        at = draw(st.integers(0, len(serialized) - 1))
        serialized = serialized[:at] + bytes([serialized[at] ^ 0xFF]) + serialized[at + 1 :]
    elif mangle == "garbage":
        serialized = draw(st.binary(max_size=200))
    return serialized


@st.composite
def nearly_valid_request(draw: st.DrawFn) -> bytes:
    """A request that reaches the batcher unless one drawn detail (parameter, output) is off."""
    model = draw(st.sampled_from(["clf", "reg"]))
    rows = draw(st.integers(1, 4))
    request = pb.ModelInferRequest(model_name=model, model_version=draw(st.sampled_from(["", "1"])))
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[rows, FEATURES[model]])
    values = draw(
        st.lists(
            st.floats(-1e3, 1e3, width=32), min_size=rows * FEATURES[model], max_size=rows * FEATURES[model]
        )
    )
    if draw(st.booleans()):
        request.raw_input_contents.append(np.asarray(values, dtype="<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(values)
    fill_parameters(request.parameters, draw(st.dictionaries(parameter_names, parameter(), max_size=2)))
    for name in draw(st.lists(st.sampled_from(OUTPUT_NAMES[:4]), max_size=2, unique=True)):
        request.outputs.add(name=name)
    return request.SerializeToString()


@pytest.fixture(scope="module")
def fuzz_servers(model_repository: Path) -> Iterator[dict[str, Server]]:
    """One server with a single process, one with two workers sharing the gRPC port: every drawn
    request goes to both, so Hypothesis draws the requests once."""
    with (
        running_server(model_repository, request_timeout_s="5", workers="1") as one,
        running_server(model_repository, request_timeout_s="5", workers="2") as two,
    ):
        yield {"1-worker": one, "2-workers": two}


def fuzz(servers: dict[str, Server], examples: int) -> dict[str, Counter[str]]:
    """The status codes each server answered, by its name."""
    codes: dict[str, Counter[str]] = {name: Counter() for name in servers}
    failures: list[tuple[str, str, str, bytes]] = []
    with contextlib.ExitStack() as stack:
        calls = {
            name: stack.enter_context(grpc.insecure_channel(server.grpc_target)).unary_unary(INFER)
            for name, server in servers.items()
        }

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=[
                HealthCheck.too_slow,
                HealthCheck.data_too_large,
                HealthCheck.large_base_example,
            ],
        )
        @given(infer_request() | nearly_valid_request())
        def send(request: bytes) -> None:
            for name, call in calls.items():
                try:
                    call(request, timeout=30)
                    codes[name]["OK"] += 1
                except grpc.RpcError as error:
                    code = error.code()
                    codes[name][code.name] += 1
                    if code not in CLIENT_ERRORS or not error.details():
                        failures.append((name, code.name, str(error.details()), request[:200]))

        send()
    for name, counted in codes.items():
        print(f"\nGRPC FUZZ {name} " + json.dumps(dict(counted)))
    assert not failures, failures[:5]
    for name, server in servers.items():
        assert server.process.poll() is None, name
    return codes


def test_fuzz_model_infer_short(fuzz_servers: dict[str, Server]) -> None:
    for name, codes in fuzz(fuzz_servers, examples=300).items():
        assert sum(codes.values()) >= 300, name
        # all paths reached
        assert codes["OK"] > 0 and codes["INVALID_ARGUMENT"] > 0 and codes["NOT_FOUND"] > 0, name


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fuzz_model_infer_10k(fuzz_servers: dict[str, Server]) -> None:
    for name, codes in fuzz(fuzz_servers, examples=10_000).items():
        assert sum(codes.values()) >= 10_000, name
