"""Open Inference Protocol against a real server process, with stock `tritonclient.http` and httpx
(readiness with a broken model: the app in process).

Answers are compared with a direct in-process ONNX Runtime run of the same rows and the independent
test oracle (`ReferenceModel`, tests/oracle.py), output by output; datatypes and shapes with the
contract the server declares (`inference.output_specs`).
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service import inference
from tests.service.support import ReferenceModel, in_process, running_server, write_model
from tests.service.test_v2_codec import binary_body

FEATURES = {"clf": 8, "reg": 5}


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(base_url.removeprefix("http://"), network_timeout=30.0)
    yield client
    client.close()


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=30.0) as http:
        yield http


@pytest.fixture(scope="module")
def references(model_repository: Path) -> dict[str, ReferenceModel]:
    return {name: ReferenceModel(model_repository / name / "1") for name in FEATURES}


def rows_for(model: str, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.5, (n, FEATURES[model])).astype(np.float32)


def specs(reference: ReferenceModel) -> dict[str, tuple[str, list[int]]]:
    return {name: (dt, shape) for name, dt, shape in inference.output_specs(reference.manifest)}


def assert_matches_reference(
    outputs: dict[str, tuple[str, np.ndarray]], expected: dict[str, np.ndarray], reference: ReferenceModel
) -> None:
    """Same output names; each with the contract's datatype, the batch's shape and the reference values."""
    assert set(outputs) == set(expected)
    contract = specs(reference)
    for name, (datatype, got) in outputs.items():
        want = expected[name]
        assert datatype == contract[name][0], name
        assert got.shape == want.shape, name
        assert [-1, *got.shape[1:]] == contract[name][1], name
        if datatype == "BYTES":
            decoded = [x.decode() if isinstance(x, bytes) else x for x in got.ravel().tolist()]
            assert decoded == want.ravel().tolist(), name
        elif datatype in ("BOOL", "INT64"):
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6, err_msg=name)


def triton_outputs(result: triton.InferResult) -> dict[str, tuple[str, np.ndarray]]:
    return {o["name"]: (o["datatype"], result.as_numpy(o["name"])) for o in result.get_response()["outputs"]}


def triton_infer(
    client: triton.InferenceServerClient,
    model: str,
    rows: np.ndarray,
    *,
    binary_inputs: bool,
    outputs: list[triton.InferRequestedOutput] | None = None,
    parameters: dict[str, Any] | None = None,
    **kwargs: Any,
) -> triton.InferResult:
    tensor = triton.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=binary_inputs)
    return client.infer(model, [tensor], outputs=outputs, parameters=parameters, **kwargs)


# -------------------------------------------------------------------------------- health, metadata


def test_server_metadata_and_health(client: triton.InferenceServerClient, http: httpx.Client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "hydra-serve" and "binary_tensor_data" in metadata["extensions"]
    ready = http.get("/v2/health/ready").json()
    assert ready == {"ready": True, "models": {"clf": True, "reg": True}}
    assert http.get("/v2/health/live").json() == {"live": True}
    for model in FEATURES:
        assert client.is_model_ready(model) and client.is_model_ready(model, "1")
        assert http.get(f"/v2/models/{model}/versions/1/ready").json() == {
            "name": model,
            "version": "1",
            "ready": True,
        }
    assert not client.is_model_ready("clf", "2")
    assert http.get("/v2/models/nope/ready").status_code == 404


@pytest.mark.parametrize("model", list(FEATURES))
def test_model_metadata_exposes_contract_and_manifest(
    model: str, client: triton.InferenceServerClient, references: dict[str, ReferenceModel]
) -> None:
    manifest = references[model].manifest
    for metadata in (client.get_model_metadata(model), client.get_model_metadata(model, "1")):
        assert metadata["name"] == model and metadata["versions"] == ["1"]
        assert metadata["platform"] == "onnxruntime_onnx"
        assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, FEATURES[model]]}]
        assert metadata["outputs"] == [
            {"name": n, "datatype": d, "shape": s} for n, d, s in inference.output_specs(manifest)
        ]
        parameters = metadata["parameters"]
        assert parameters["task"] == manifest.task and parameters["heads"] == manifest.heads
        assert parameters["labels"] == manifest.labels
        assert parameters["default_alpha"] == manifest.ood.default_alpha
        assert parameters["ood_score"] == manifest.ood.score
        assert parameters["execution_provider"] == "CPUExecutionProvider"
        assert parameters["evaluation"] == manifest.evaluation


# --------------------------------------------------------------------------------------- inference


@pytest.mark.parametrize("model", list(FEATURES))
@pytest.mark.parametrize(
    ("binary_inputs", "output_mode"),
    [(True, "default"), (False, "json"), (True, "json"), (False, "binary")],
    ids=["binary-in-default-out", "json-in-json-out", "binary-in-json-out", "json-in-binary-out"],
)
def test_tritonclient_answers_match_direct_onnxruntime(
    model: str,
    binary_inputs: bool,
    output_mode: str,
    client: triton.InferenceServerClient,
    references: dict[str, ReferenceModel],
) -> None:
    reference = references[model]
    rows = rows_for(model, 7, seed=sum(map(ord, f"{model}{binary_inputs}{output_mode}")))
    names = [n for n in specs(reference) if n not in inference.head_output_names(reference.manifest)]
    requested = (
        None
        if output_mode == "default"  # tritonclient then asks for every output in binary
        else [triton.InferRequestedOutput(n, binary_data=output_mode == "binary") for n in names]
    )
    result = triton_infer(client, model, rows, binary_inputs=binary_inputs, outputs=requested)
    response = result.get_response()
    assert response["model_name"] == model and response["model_version"] == "1"
    binary_out = {"parameters" in o for o in response["outputs"]}
    assert binary_out == {output_mode != "json"}
    assert_matches_reference(triton_outputs(result), reference.answer(rows), reference)


def test_request_parameters_alpha_level_and_heads(
    client: triton.InferenceServerClient, references: dict[str, ReferenceModel]
) -> None:
    rows = rows_for("reg", 9, seed=5)
    parameters = {"alpha": 0.5, "interval_level": 0.8, "heads": True}
    result = triton_infer(client, "reg", rows, binary_inputs=True, parameters=parameters, request_id="r-1")
    assert result.get_response()["id"] == "r-1"
    expected = references["reg"].answer(rows, alpha=0.5, level=0.8, heads=True)
    assert_matches_reference(triton_outputs(result), expected, references["reg"])
    assert expected["ood_flag"].any() and not expected["ood_flag"].all()  # α = 0.5 splits these rows


def test_outputs_field_selects_and_orders_outputs(
    client: triton.InferenceServerClient, references: dict[str, ReferenceModel]
) -> None:
    rows = rows_for("clf", 4, seed=6)
    wanted = ["heads", "label_name", "ood_flag"]  # naming "heads" asks for the per-head tensor
    requested = [triton.InferRequestedOutput(n, binary_data=n != "label_name") for n in wanted]
    result = triton_infer(client, "clf", rows, binary_inputs=True, outputs=requested)
    assert [o["name"] for o in result.get_response()["outputs"]] == wanted
    expected = references["clf"].answer(rows, heads=True)
    assert_matches_reference(triton_outputs(result), {n: expected[n] for n in wanted}, references["clf"])
    assert result.as_numpy("heads").shape == (4, 4, 3)


@pytest.mark.parametrize("datatype", ["FP64", "INT32", "UINT8", "FP16"])
def test_json_request_casts_any_numeric_datatype_and_nested_data(
    datatype: str, http: httpx.Client, references: dict[str, ReferenceModel]
) -> None:
    rows = np.random.default_rng(7).integers(0, 9, (3, 8))
    body = {
        "id": "nested",
        "inputs": [{"name": "input", "shape": [3, 8], "datatype": datatype, "data": rows.tolist()}],
    }
    response = http.post("/v2/models/clf/versions/1/infer", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    assert document["id"] == "nested" and document["model_version"] == "1"
    outputs = {
        o["name"]: (o["datatype"], np.array(o["data"]).reshape(o["shape"])) for o in document["outputs"]
    }
    assert_matches_reference(outputs, references["clf"].answer(rows.astype(np.float32)), references["clf"])


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_from_tritonclient(
    algorithm: str, client: triton.InferenceServerClient, references: dict[str, ReferenceModel]
) -> None:
    rows = rows_for("clf", 5, seed=8)
    result = triton_infer(client, "clf", rows, binary_inputs=True, request_compression_algorithm=algorithm)
    assert_matches_reference(triton_outputs(result), references["clf"].answer(rows), references["clf"])


def test_concurrent_binary_requests_each_get_their_own_rows(
    base_url: str, references: dict[str, ReferenceModel]
) -> None:
    """Many in-flight V2 requests with distinct rows share batches; each answer is its own rows'."""
    client = triton.InferenceServerClient(base_url.removeprefix("http://"), concurrency=32)
    try:
        batches = [rows_for("clf", 1 + i % 3, seed=1000 + i) for i in range(200)]
        pending = []
        for rows in batches:
            tensor = triton.InferInput("input", list(rows.shape), "FP32")
            tensor.set_data_from_numpy(rows)
            pending.append(client.async_infer("clf", [tensor]))
        for rows, request in zip(batches, pending, strict=True):
            result = request.get_result(timeout=30)
            want = references["clf"].answer(rows)
            np.testing.assert_allclose(result.as_numpy("probabilities"), want["probabilities"], rtol=2e-5)
            np.testing.assert_allclose(result.as_numpy("ood_p_value"), want["ood_p_value"], rtol=1e-6)
    finally:
        client.close()


# ------------------------------------------------------------------------------------- bad inputs


def v2_body(data: Any = None, **tensor: Any) -> dict[str, Any]:
    fields = {"name": "input", "shape": [1, 8], "datatype": "FP32", "data": data or [0.5] * 8} | tensor
    return {"inputs": [fields]}


def binary_request(
    rows: np.ndarray, *, declared: int | None = None, tail: bytes = b""
) -> tuple[bytes, dict[str, str]]:
    """`rows` as the binary tensor "input", declaring `declared` bytes (default: their size), `tail`
    after them."""
    raw = rows.astype("<f4").tobytes()
    size = len(raw) if declared is None else declared
    body, header_length = binary_body([size], raw + tail, shape=list(rows.shape), names=["input"])
    return body, {"Inference-Header-Content-Length": header_length}


def _nan_rows() -> np.ndarray:
    rows = np.zeros((2, 8), dtype=np.float32)
    rows[1, 3] = np.nan
    return rows


BAD_JSON = [
    (v2_body(datatype="FLOAT32"), 400, "datatype 'FLOAT32'"),
    (v2_body(datatype="BYTES", data=["a"] * 8), 400, "datatype BYTES is not accepted here"),
    (v2_body(datatype="BOOL", data=[True] * 8), 400, "datatype BOOL is not accepted here"),
    (v2_body(shape=[2, 8]), 400, "shape needs 16 elements but 'data' has 8"),
    (v2_body(shape=[1, 7], data=[0.5] * 7), 400, "model expects [-1, 8]"),
    (v2_body(shape=[8]), 400, "model expects [-1, 8]"),
    (v2_body(shape=[0, 8], data=[[]]), 400, "no rows"),
    (v2_body(data=[0.5] * 7 + ["x"]), 400, "cannot hold values of type str"),
    (v2_body(name="pixels"), 400, "unknown input 'pixels'"),
    (
        v2_body() | {"outputs": [{"name": "probabilities"}, {"name": "logits"}]},
        400,
        "unknown output 'logits'",
    ),
    (v2_body() | {"parameters": {"alpha": 0}}, 400, "'alpha' must be a number in (0, 1)"),
    (v2_body() | {"parameters": {"alpha": 1.0}}, 400, "'alpha' must be a number in (0, 1)"),
    (v2_body() | {"parameters": {"alpha": 1.5}}, 400, "'alpha' must be a number in (0, 1)"),
    (v2_body() | {"parameters": {"alpha": "0.1"}}, 400, "'alpha' must be a number in (0, 1)"),
    (v2_body() | {"parameters": {"interval_level": 1}}, 400, "'interval_level' must be a number"),
    (v2_body() | {"parameters": {"heads": "yes"}}, 400, "'heads' must be true or false"),
    (v2_body() | {"parameters": {"timeout": -5}}, 400, "'timeout' must be a positive integer"),
    ({"inputs": []}, 400, "non-empty list"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_JSON)
def test_bad_json_requests_get_4xx_naming_the_problem(
    body: dict[str, Any], status: int, message: str, http: httpx.Client
) -> None:
    response = http.post("/v2/models/clf/infer", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


@pytest.mark.parametrize(
    ("body_headers", "message"),
    [
        (
            binary_request(np.zeros((2, 8)), declared=60),
            "binary_data_size is 60 bytes but shape x FP32 needs 64",
        ),
        (binary_request(np.zeros((2, 8)), declared=70), "only 64 binary bytes remain"),
        (binary_request(np.zeros((2, 8)), tail=b"\x00" * 4), "4 bytes after the binary tensors"),
        (binary_request(_nan_rows()), "inputs must be finite; row 1"),
        ((b'{"inputs": [', {}), "malformed"),
        ((b"{}", {"Inference-Header-Content-Length": "9"}), "is 9 but the body has 2 bytes"),
        ((b"{}", {"Inference-Header-Content-Length": "x"}), "must be a non-negative integer"),
    ],
    ids=[
        "size-short",
        "size-over-body",
        "trailing-bytes",
        "nan",
        "malformed-json",
        "header-long",
        "header-nan",
    ],
)
def test_bad_binary_requests_get_400(
    body_headers: tuple[bytes, dict[str, str]], message: str, http: httpx.Client
) -> None:
    body, headers = body_headers
    response = http.post(
        "/v2/models/clf/infer", content=body, headers=headers | {"Content-Type": "application/octet-stream"}
    )
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


@pytest.mark.parametrize(
    ("body", "encoding", "status", "message"),
    [
        (gzip.compress(b"\0" * (17 * 2**20)), "gzip", 413, "decompressed request body exceeds"),
        (b"not gzip at all", "gzip", 400, "not valid gzip data"),
        (zlib.compress(orjson.dumps(v2_body()))[:-6], "deflate", 400, "truncated deflate"),
        (orjson.dumps(v2_body()), "br", 400, "unsupported Content-Encoding 'br'"),
    ],
    ids=["gzip-bomb", "bad-gzip", "truncated-deflate", "brotli"],
)
def test_bad_compressed_bodies(
    body: bytes, encoding: str, status: int, message: str, http: httpx.Client
) -> None:
    response = http.post("/v2/models/clf/infer", content=body, headers={"Content-Encoding": encoding})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


@pytest.mark.parametrize(
    "path",
    ["/v2/models/nope/infer", "/v2/models/clf/versions/2/infer", "/v2/models/clf/versions/abc/infer"],
)
def test_unknown_model_or_version_is_404(path: str, http: httpx.Client) -> None:
    response = http.post(path, json=v2_body())
    assert response.status_code == 404
    assert response.json()["error"]
    metadata = http.get(path.removesuffix("/infer"))
    assert metadata.status_code == 404 and metadata.json()["error"]


def test_tritonclient_sees_the_error_message(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as caught:
        triton_infer(client, "clf", rows_for("clf", 2, seed=1), binary_inputs=True, parameters={"alpha": 2})
    assert caught.value.status() == "400"
    assert "'alpha' must be a number in (0, 1)" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        triton_infer(client, "clf", rows_for("reg", 2, seed=1), binary_inputs=True)
    assert caught.value.status() == "400" and "model expects [-1, 8]" in caught.value.message()


def test_timeout_parameter_is_a_queue_deadline_in_microseconds(client: triton.InferenceServerClient) -> None:
    rows = rows_for("clf", 3, seed=2)
    with pytest.raises(InferenceServerException) as caught:
        triton_infer(client, "clf", rows, binary_inputs=True, timeout=1)  # 1 µs: expires while queued
    assert caught.value.status() == "504"
    result = triton_infer(client, "clf", rows, binary_inputs=True, timeout=10_000_000)
    assert result.as_numpy("label").shape == (3,)


def test_infer_needs_the_api_key_when_one_is_set(model_repository: Path) -> None:
    with running_server(model_repository, api_key="s3cret") as server:
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        rows = rows_for("reg", 2, seed=3)
        with pytest.raises(InferenceServerException) as caught:
            triton_infer(client, "reg", rows, binary_inputs=True)
        assert caught.value.status() == "401"
        result = triton_infer(client, "reg", rows, binary_inputs=True, headers={"X-API-Key": "s3cret"})
        assert result.as_numpy("mean").shape == (2,)
        # health and metadata stay open (probes carry no key)
        assert client.is_server_ready() and client.get_model_metadata("reg")["name"] == "reg"
        client.close()


def test_openapi_documents_v2_routes_and_both_body_types(http: httpx.Client) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    for path in ("/v2", "/v2/health/ready", "/v2/models/{model_name}", "/v2/models/{model_name}/infer"):
        assert path in paths
    content = paths["/v2/models/{model_name}/infer"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "application/octet-stream"}
    assert "$ref" not in orjson.dumps(content).decode()  # inlined: resolvable in the served document


# ------------------------------------------------------------------------------------- readiness


def test_server_is_not_ready_while_a_model_failed_to_load(tmp_path: Path) -> None:
    """Strict readiness: one model serves, another failed to load → /v2/health/ready is 503. In
    process: the lifespan has run (the app is live) once `in_process` yields."""
    write_model(tmp_path, "clf", 1, "classification")
    broken = write_model(tmp_path, "broken", 1, "classification")
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    with in_process(tmp_path) as http:
        assert http.get("/v2/health/live").status_code == 200
        ready = http.get("/v2/health/ready")
        assert ready.status_code == 503
        assert ready.json()["models"] == {"broken": False, "clf": True}
        assert "broken" in ready.json()["error"]
        assert http.get("/v2/models/clf/ready").status_code == 200
        assert http.get("/v2/models/broken/ready").status_code == 404
