"""Open Inference Protocol over gRPC against a real server process, with stock `tritonclient.grpc`
(sync and asyncio) and raw grpc calls.

Answers are compared output by output with the same server's V2 HTTP answers (stock
tritonclient.http) and with a direct ONNX Runtime + `service.inference` computation (`ReferenceModel`).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.grpc.aio as tga
import tritonclient.http as th
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.utils import InferenceServerException

from bench.http_load import until_answered
from tests.service.support import (
    CLF_FEATURES,
    ReferenceModel,
    Server,
    held_batches,
    running_server,
    start_server,
    write_model,
)
from tests.service.test_v2_server import FEATURES, assert_matches_reference, rows_for, specs

INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def grpc_client(server: Server) -> Iterator[tg.InferenceServerClient]:
    client = tg.InferenceServerClient(server.grpc_target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def http_client(server: Server) -> Iterator[th.InferenceServerClient]:
    client = th.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=30.0)
    yield client
    client.close()


@pytest.fixture(scope="module")
def references(model_repository: Path) -> dict[str, ReferenceModel]:
    return {name: ReferenceModel(model_repository / name / "1") for name in FEATURES}


@pytest.fixture(scope="module")
def channel(server: Server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield channel


def grpc_input(rows: np.ndarray) -> tg.InferInput:
    tensor = tg.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    return tensor


def http_input(rows: np.ndarray) -> th.InferInput:
    tensor = th.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    return tensor


def grpc_outputs(result: tg.InferResult) -> dict[str, tuple[str, np.ndarray]]:
    response = result.get_response()
    return {o.name: (o.datatype, result.as_numpy(o.name)) for o in response.outputs}


def http_outputs(result: th.InferResult) -> dict[str, tuple[str, np.ndarray]]:
    return {o["name"]: (o["datatype"], result.as_numpy(o["name"])) for o in result.get_response()["outputs"]}


def assert_same_answers(
    got: dict[str, tuple[str, np.ndarray]], want: dict[str, tuple[str, np.ndarray]]
) -> None:
    """The same outputs in the same order, each with the same datatype, shape and bytes."""
    assert list(got) == list(want)
    for name, (datatype, array) in got.items():
        assert datatype == want[name][0], name
        assert array.shape == want[name][1].shape, name
        if datatype == "BYTES":
            assert array.tolist() == want[name][1].tolist(), name
        else:
            np.testing.assert_array_equal(array, want[name][1], err_msg=name)


def raw_call(channel: grpc.Channel, request: bytes, method: str = INFER) -> bytes:
    call = channel.unary_unary(method)
    response: bytes = call(request, timeout=30)
    return response


# -------------------------------------------------------------------------------- health, metadata


def test_health_and_readiness_with_stock_client(
    grpc_client: tg.InferenceServerClient, channel: grpc.Channel
) -> None:
    assert grpc_client.is_server_live() and grpc_client.is_server_ready()
    for model in FEATURES:
        assert grpc_client.is_model_ready(model) and grpc_client.is_model_ready(model, "1")
    for name, version in (("clf", "2"), ("nope", ""), ("clf", "x")):
        with pytest.raises(InferenceServerException) as caught:
            grpc_client.is_model_ready(name, version)
        assert caught.value.status() == "StatusCode.NOT_FOUND", (name, version)
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ("", "inference.GRPCInferenceService", "clf", "reg"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == serving
    with pytest.raises(grpc.RpcError) as unknown:
        health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_server_and_model_metadata_match_http(
    grpc_client: tg.InferenceServerClient, http_client: th.InferenceServerClient, channel: grpc.Channel
) -> None:
    server = grpc_client.get_server_metadata(as_json=True)
    assert (
        server["name"] == "hydra-serve" and server["version"] == http_client.get_server_metadata()["version"]
    )
    for model in FEATURES:
        want = http_client.get_model_metadata(model)
        for version in ("", "1"):
            got = grpc_client.get_model_metadata(model, version, as_json=True)
            assert got["name"] == want["name"] and got["versions"] == want["versions"]
            assert got["platform"] == want["platform"]
            for key in ("inputs", "outputs"):
                assert [{**t, "shape": [int(d) for d in t["shape"]]} for t in got[key]] == want[key], key
        # `properties` (not in Triton's proto, so read with ours): HTTP's metadata parameters, as strings
        from service.oip_grpc.third_party import grpc_predict_v2_pb2 as pb

        raw = raw_call(
            channel,
            pb.ModelMetadataRequest(name=model).SerializeToString(),
            "/inference.GRPCInferenceService/ModelMetadata",
        )
        properties = dict(pb.ModelMetadataResponse.FromString(raw).properties)
        assert properties["task"] == want["parameters"]["task"]
        assert int(properties["heads"]) == want["parameters"]["heads"]
        assert float(properties["default_alpha"]) == want["parameters"]["default_alpha"]


# --------------------------------------------------------------------------------------- inference


@pytest.mark.parametrize("model", list(FEATURES))
@pytest.mark.parametrize(
    "parameters",
    [None, {"alpha": 0.5, "interval_level": 0.8, "heads": True}],
    ids=["defaults", "alpha-heads"],
)
def test_answers_equal_http_v2_and_the_reference(
    model: str,
    parameters: dict[str, object] | None,
    grpc_client: tg.InferenceServerClient,
    http_client: th.InferenceServerClient,
    references: dict[str, ReferenceModel],
) -> None:
    rows = rows_for(model, 7, seed=len(model) + (0 if parameters is None else 1))
    got = grpc_client.infer(model, [grpc_input(rows)], parameters=parameters, request_id="g-1")
    want = http_client.infer(model, [http_input(rows)], parameters=parameters)
    response = got.get_response()
    assert (response.model_name, response.model_version, response.id) == (model, "1", "g-1")
    assert len(response.raw_output_contents) == len(response.outputs)  # raw, as tritonclient reads
    assert_same_answers(grpc_outputs(got), http_outputs(want))
    p = parameters or {}
    expected = references[model].answer(
        rows, alpha=p.get("alpha"), level=p.get("interval_level", 0.95), heads=bool(p.get("heads"))
    )
    assert_matches_reference(grpc_outputs(got), expected, references[model])


def test_outputs_select_and_order_like_http(
    grpc_client: tg.InferenceServerClient, http_client: th.InferenceServerClient
) -> None:
    rows = rows_for("clf", 4, seed=6)
    wanted = ["heads", "label_name", "ood_flag"]
    got = grpc_client.infer("clf", [grpc_input(rows)], outputs=[tg.InferRequestedOutput(n) for n in wanted])
    want = http_client.infer("clf", [http_input(rows)], outputs=[th.InferRequestedOutput(n) for n in wanted])
    assert [o.name for o in got.get_response().outputs] == wanted
    assert_same_answers(grpc_outputs(got), http_outputs(want))


def test_typed_contents_in_typed_contents_out(
    channel: grpc.Channel, references: dict[str, ReferenceModel]
) -> None:
    """A client that sends typed `contents` (KServe SDK, MLServer style) gets typed contents back."""
    rows = rows_for("reg", 3, seed=9)
    request = triton_pb.ModelInferRequest(model_name="reg", id="typed")
    tensor = request.inputs.add(name="input", datatype="FP64", shape=list(rows.shape))
    tensor.contents.fp64_contents.extend(rows.astype(np.float64).ravel().tolist())
    response = triton_pb.ModelInferResponse.FromString(raw_call(channel, request.SerializeToString()))
    assert response.id == "typed" and len(response.raw_output_contents) == 0
    expected = references["reg"].answer(rows)
    contract = specs(references["reg"])
    assert {o.name for o in response.outputs} == set(expected)
    for output in response.outputs:
        field = {"FP32": "fp32_contents", "INT64": "int64_contents", "BOOL": "bool_contents"}[output.datatype]
        got = np.asarray(getattr(output.contents, field)).reshape(list(output.shape))
        assert output.datatype == contract[output.name][0]
        np.testing.assert_allclose(got, expected[output.name], rtol=2e-5, atol=1e-6, err_msg=output.name)


def test_asyncio_client_200_concurrent_distinct_requests(
    server: Server, references: dict[str, ReferenceModel]
) -> None:
    """Many in-flight calls with distinct rows share batches; each answer is its own rows'."""
    batches = [rows_for("clf", 1 + i % 3, seed=2000 + i) for i in range(200)]

    async def scenario() -> list[tga.InferResult]:
        async with tga.InferenceServerClient(server.grpc_target) as client:
            assert await client.is_server_ready()
            return await asyncio.gather(*(client.infer("clf", [grpc_input(rows)]) for rows in batches))

    results = asyncio.run(scenario())
    for rows, result in zip(batches, results, strict=True):
        want = references["clf"].answer(rows)
        np.testing.assert_allclose(result.as_numpy("probabilities"), want["probabilities"], rtol=2e-5)
        np.testing.assert_allclose(result.as_numpy("ood_p_value"), want["ood_p_value"], rtol=1e-6)


def test_sync_client_async_infer_keeps_rows_apart(
    grpc_client: tg.InferenceServerClient, references: dict[str, ReferenceModel]
) -> None:
    batches = [rows_for("reg", 1 + i % 4, seed=3000 + i) for i in range(60)]
    done: dict[int, tg.InferResult] = {}

    def callback(index: int, result: tg.InferResult | None, error: InferenceServerException | None) -> None:
        assert error is None, error
        assert result is not None
        done[index] = result

    for i, rows in enumerate(batches):
        grpc_client.async_infer(
            "reg", [grpc_input(rows)], callback=lambda result, error, i=i: callback(i, result, error)
        )
    deadline = time.monotonic() + 30
    while len(done) < len(batches) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(done) == len(batches)
    for i, rows in enumerate(batches):
        np.testing.assert_allclose(
            done[i].as_numpy("mean"), references["reg"].answer(rows)["mean"], rtol=2e-5
        )


# ------------------------------------------------------------------------------------------ errors


def _status(call: object) -> tuple[str, str]:
    assert isinstance(call, InferenceServerException)
    return str(call.status()), str(call.message())


@pytest.mark.parametrize(
    ("model", "version", "rows", "parameters", "code", "fragment"),
    [
        ("nope", "", np.zeros((1, 8), np.float32), None, "NOT_FOUND", "'nope' is not loaded"),
        ("clf", "7", np.zeros((1, 8), np.float32), None, "NOT_FOUND", "version"),
        ("clf", "", np.zeros((2, 5), np.float32), None, "INVALID_ARGUMENT", "model expects [-1, 8]"),
        ("clf", "", np.full((1, 8), np.nan, np.float32), None, "INVALID_ARGUMENT", "finite"),
        ("clf", "", np.zeros((0, 8), np.float32), None, "INVALID_ARGUMENT", "no rows"),
        ("clf", "", np.zeros((1, 8), np.float32), {"alpha": 1.5}, "INVALID_ARGUMENT", "'alpha'"),
        ("clf", "", np.zeros((1, 8), np.float32), {"alpha": "0.1"}, "INVALID_ARGUMENT", "'alpha'"),
        ("clf", "", np.zeros((1, 8), np.float32), {"heads": 3}, "INVALID_ARGUMENT", "'heads'"),
    ],
)
def test_bad_requests_get_status_codes_naming_the_problem(
    model: str,
    version: str,
    rows: np.ndarray,
    parameters: dict[str, object] | None,
    code: str,
    fragment: str,
    grpc_client: tg.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.infer(model, [grpc_input(rows)], model_version=version, parameters=parameters)
    status, message = _status(caught.value)
    assert status == f"StatusCode.{code}" and fragment in message, (status, message)


def test_malformed_messages_are_invalid_argument(
    channel: grpc.Channel, grpc_client: tg.InferenceServerClient
) -> None:
    def expect(request: bytes, fragment: str) -> None:
        with pytest.raises(grpc.RpcError) as caught:
            raw_call(channel, request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert fragment in str(caught.value.details()), caught.value.details()

    expect(b"\x0a\xff\xff", "not a valid ModelInferRequest")
    base = triton_pb.ModelInferRequest(model_name="clf")
    base.inputs.add(name="input", datatype="FP32", shape=[1, 8])
    short = triton_pb.ModelInferRequest()
    short.CopyFrom(base)
    short.raw_input_contents.append(b"\x00" * 12)
    expect(short.SerializeToString(), "needs 32")
    missing = triton_pb.ModelInferRequest()
    missing.CopyFrom(base)
    expect(missing.SerializeToString(), "neither contents nor raw_input_contents")
    two = triton_pb.ModelInferRequest()
    two.CopyFrom(short)
    two.raw_input_contents.append(b"")
    expect(two.SerializeToString(), "2 entries for 1 inputs")
    strings = triton_pb.ModelInferRequest(model_name="clf")
    strings.inputs.add(name="input", datatype="BYTES", shape=[1, 8]).contents.bytes_contents.extend(
        [b"a"] * 8
    )
    expect(strings.SerializeToString(), "not accepted")
    wrong_field = triton_pb.ModelInferRequest(model_name="clf")
    wrong_field.inputs.add(name="input", datatype="FP32", shape=[1, 8]).contents.int_contents.extend([1] * 8)
    expect(wrong_field.SerializeToString(), "contents.fp32_contents")
    unknown_output = triton_pb.ModelInferRequest()
    unknown_output.CopyFrom(short)
    del unknown_output.raw_input_contents[:]
    unknown_output.raw_input_contents.append(b"\x00" * 32)
    unknown_output.outputs.add(name="nope")
    expect(unknown_output.SerializeToString(), "unknown output 'nope'")
    empty_parameter = triton_pb.ModelInferRequest()
    empty_parameter.CopyFrom(unknown_output)
    del empty_parameter.outputs[:]
    empty_parameter.parameters["alpha"].SetInParent()
    expect(empty_parameter.SerializeToString(), "has no value")
    negative_timeout = triton_pb.ModelInferRequest()
    negative_timeout.CopyFrom(unknown_output)
    del negative_timeout.outputs[:]
    negative_timeout.parameters["timeout"].int64_param = -5
    expect(negative_timeout.SerializeToString(), "'timeout' must be a positive integer")
    assert grpc_client.is_server_live()


def test_oversized_message_is_resource_exhausted(model_repository: Path) -> None:
    with running_server(model_repository, max_request_bytes="2048") as small:
        client = tg.InferenceServerClient(small.grpc_target)
        try:
            with pytest.raises(InferenceServerException) as caught:
                client.infer("clf", [grpc_input(np.zeros((200, CLF_FEATURES), np.float32))])
            assert _status(caught.value)[0] == "StatusCode.RESOURCE_EXHAUSTED"
            assert client.infer("clf", [grpc_input(np.zeros((2, CLF_FEATURES), np.float32))]).as_numpy(
                "label"
            ).shape == (2,)
        finally:
            client.close()


def test_deadline_and_full_queue(model_repository: Path) -> None:
    """A client deadline shorter than the batch wait: DEADLINE_EXCEEDED; a full queue: UNAVAILABLE."""
    env = {
        "max_queue_delay_ms": "1500",
        "max_batch_size": "256",
        "max_queue_size": "2",
        "run_when_idle": "false",
    }
    with running_server(model_repository, **env) as slow:
        client = tg.InferenceServerClient(slow.grpc_target)
        rows = np.zeros((1, CLF_FEATURES), np.float32)
        try:
            with pytest.raises(InferenceServerException) as caught:
                client.infer("clf", [grpc_input(rows)], client_timeout=0.3)
            assert _status(caught.value)[0] == "StatusCode.DEADLINE_EXCEEDED"
            results: list[object] = []
            for _ in range(2):  # fill the queue (both wait 1.5 s for the batch)
                client.async_infer(
                    "clf", [grpc_input(rows)], callback=lambda result, error: results.append(result or error)
                )
            for _ in range(500):  # until both wait in the queue
                if httpx.get(f"{slow.url}/v1/models/clf").json()["batching"]["queued_requests"] == 2:
                    break
                time.sleep(0.01)
            with pytest.raises(InferenceServerException) as full:
                client.infer("clf", [grpc_input(rows)])
            status, message = _status(full.value)
            assert status == "StatusCode.UNAVAILABLE" and "queue" in message
            deadline = time.monotonic() + 10
            while len(results) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert all(isinstance(r, tg.InferResult) for r in results), results
            metrics = httpx.get(f"{slow.url}/metrics").text
            route = 'route="/inference.GRPCInferenceService/ModelInfer"'
            assert f'hydra_requests_total{{code="503",method="POST",protocol="grpc",{route}}} 1.0' in metrics
            assert f'hydra_requests_total{{code="200",method="POST",protocol="grpc",{route}}} 2.0' in metrics
        finally:
            client.close()


def test_api_key_as_call_metadata(model_repository: Path) -> None:
    with running_server(model_repository, api_key="s3cret") as locked:
        client = tg.InferenceServerClient(locked.grpc_target)
        rows = np.zeros((1, CLF_FEATURES), np.float32)
        try:
            assert client.is_server_ready()  # health and metadata need no key, as over HTTP
            for headers in (None, {"x-api-key": "wrong"}):
                with pytest.raises(InferenceServerException) as caught:
                    client.infer("clf", [grpc_input(rows)], headers=headers)
                assert _status(caught.value)[0] == "StatusCode.UNAUTHENTICATED"
            for headers in ({"x-api-key": "s3cret"}, {"authorization": "Bearer s3cret"}):
                assert client.infer("clf", [grpc_input(rows)], headers=headers).as_numpy("label").shape == (
                    1,
                )
        finally:
            client.close()


# ---------------------------------------------------------------------------------------- shutdown


def test_sigterm_drains_grpc_calls_in_flight_then_refuses(model_repository: Path) -> None:
    # a 5 s delay, so the 30 calls are still queued at SIGTERM even on a loaded machine (stop()
    # runs them at once)
    with running_server(model_repository, **held_batches(5000)) as server:
        batches = [
            np.random.default_rng(i).normal(size=(1, CLF_FEATURES)).astype(np.float32) for i in range(30)
        ]

        async def scenario() -> list[tga.InferResult]:
            async with tga.InferenceServerClient(server.grpc_target) as client:
                calls = [asyncio.ensure_future(client.infer("clf", [grpc_input(rows)])) for rows in batches]
                async with httpx.AsyncClient(base_url=server.url) as http:
                    for _ in range(400):  # SIGTERM once all 30 wait in the batch queue
                        queued = (await http.get("/v1/models/clf")).json()["batching"]["queued_requests"]
                        if queued == len(batches):
                            break
                        await asyncio.sleep(0.01)
                assert queued == len(batches)
                server.process.send_signal(signal.SIGTERM)
                # while those wait out the delay: health says NOT_SERVING, and a new call (on its own
                # connection) is refused at once
                async with grpc.aio.insecure_channel(server.grpc_target) as channel:
                    health = health_pb2_grpc.HealthStub(channel)
                    for _ in range(400):
                        status = (await health.Check(health_pb2.HealthCheckRequest(service=""))).status
                        if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                            break
                        await asyncio.sleep(0.01)
                    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
                async with tga.InferenceServerClient(server.grpc_target) as late:
                    with pytest.raises(InferenceServerException) as refused:
                        await late.infer("clf", [grpc_input(batches[0])], client_timeout=2)
                    assert _status(refused.value) == ("StatusCode.UNAVAILABLE", "the server is shutting down")
                return await asyncio.gather(*calls)

        try:
            results = asyncio.run(scenario())
        except InferenceServerException as exc:  # the server's side of the story, for a CI failure
            server.process.wait(timeout=30)
            raise AssertionError(f"{exc}\n--- server log ---\n{server.log()}") from exc
        assert [r.as_numpy("label").shape for r in results] == [(1,)] * len(batches)
        assert server.process.wait(timeout=30) == 0, server.log()
        client = tg.InferenceServerClient(server.grpc_target)
        try:
            with pytest.raises(InferenceServerException) as caught:
                client.is_server_live(client_timeout=2)
            assert _status(caught.value)[0] in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")
        finally:
            client.close()


def test_grpc_port_zero_turns_grpc_off_and_port_in_use_fails_start(
    model_repository: Path, server: Server
) -> None:
    with running_server(model_repository, grpc_port="0") as http_only:
        assert httpx.get(f"{http_only.url}/v2/health/ready").status_code == 200
        assert "gRPC" not in http_only.log()
    # the module's server holds its gRPC port: a second server asked for that port cannot start
    second = start_server(model_repository, grpc_port=str(server.grpc_port))
    assert second.process.wait(timeout=60) != 0
    assert "cannot listen for gRPC" in second.log()
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200  # the first one serves on


def test_hot_reload_under_grpc_load_fails_no_call(tmp_path: Path, model_repository: Path) -> None:
    """A version swap (repository load over HTTP) while gRPC calls stream in: every call is answered
    (by the old or the new version), and gRPC then serves and describes the new version."""
    repo = tmp_path / "models"
    shutil.copytree(model_repository, repo)
    key = {"x-api-key": "reload-key"}
    with running_server(repo, api_key="reload-key") as server:

        async def scenario() -> tuple[list[tga.InferResult], httpx.Response]:
            stop = asyncio.Event()
            answers: list[tga.InferResult] = []

            async with tga.InferenceServerClient(server.grpc_target) as client:

                async def hammer(worker: int) -> None:
                    rng = np.random.default_rng(worker)
                    while not stop.is_set():
                        rows = rng.normal(0, 2, (int(rng.integers(1, 4)), CLF_FEATURES)).astype(np.float32)
                        answers.append(await client.infer("clf", [grpc_input(rows)], headers=key))

                workers = [asyncio.create_task(hammer(i)) for i in range(8)]
                await until_answered(answers, 24)
                write_model(repo, "clf", 2, "classification", seed=42)
                async with httpx.AsyncClient(base_url=server.url, headers=key, timeout=30) as http:
                    reloaded = await http.post("/v2/repository/models/clf/load")
                await until_answered(answers, len(answers) + 24)
                stop.set()
                await asyncio.gather(*workers)
            return answers, reloaded

        answers, reloaded = asyncio.run(scenario())
        assert reloaded.status_code == 200 and reloaded.json()["version"] == "2", reloaded.text
        versions = [a.get_response().model_version for a in answers]
        assert set(versions) == {"1", "2"} and versions[-1] == "2"
        client = tg.InferenceServerClient(server.grpc_target)
        try:
            http_versions = httpx.get(f"{server.url}/v2/models/clf").json()["versions"]
            assert client.get_model_metadata("clf", as_json=True)["versions"] == http_versions == ["2"]
            assert client.is_model_ready("clf", "2")
        finally:
            client.close()


def test_calls_in_flight_drain_refuses_new_calls_and_waits_for_the_last() -> None:
    from service.oip_grpc.server import CallsInFlight

    async def scenario() -> None:
        calls = CallsInFlight()
        assert calls.enter() and calls.enter()
        assert not await calls.drain(0.05)  # two still in flight: drain times out
        assert not calls.enter()  # draining: refused
        calls.leave()
        waiting = asyncio.ensure_future(calls.drain(5))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        calls.leave()  # the last one answered
        assert await waiting and calls.count == 0

    asyncio.run(scenario())


def test_connections_linger_only_until_the_window_after_the_last_answer_has_passed() -> None:
    from service.oip_grpc.server import CallsInFlight

    calls = CallsInFlight()
    assert calls.linger_s(0.5) == 0.0  # nothing answered: nobody to wait for
    assert calls.enter()
    calls.leave()
    assert 0.4 < calls.linger_s(0.5) <= 0.5  # just answered: its client may still be reading
    calls.last_answered = time.monotonic() - 0.3
    assert 0.1 < calls.linger_s(0.5) <= 0.2  # only what is left of the window
    calls.last_answered = time.monotonic() - 2.0
    assert calls.linger_s(0.5) == 0.0
