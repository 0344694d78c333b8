"""Model repository over HTTP: index, API-key-guarded load/unload, reload under load with zero failed
requests, and broken packages refused while the serving version carries on."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.http_load import until_answered
from tests.service.support import (
    API_KEY,
    AUTH,
    CLF_FEATURES,
    InProcessClient,
    ReferenceModel,
    Server,
    connect,
    held_batches,
    in_process,
    read_response,
    running_server,
    write_model,
)
from tests.service.test_v1 import assert_matches

# Repository control is the app's, whatever the transport: the app in process (httpx over ASGI), with
# requests kept in flight during a reload as asyncio tasks on its loop; a real server where a request
# must be half-sent on a socket during the reload, and for SIGTERM.
Client = httpx.Client | InProcessClient


@pytest.fixture(scope="module")
def shared_keyed(model_repository: Path) -> Iterator[InProcessClient]:
    """The app in process for the read-only tests (they change no model)."""
    with in_process(model_repository, api_key=API_KEY) as client:
        yield client


@pytest.fixture
def keyed(repo: Path) -> Iterator[InProcessClient]:
    """The app in process over a private copy of the repository, for tests that load, unload or break
    models."""
    with in_process(repo, api_key=API_KEY, max_queue_delay_ms=2) as client:
        yield client


@contextlib.contextmanager
def client_of(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def load(client: Client, name: str, headers: dict[str, str] | None = AUTH) -> httpx.Response:
    return client.post(f"/v2/repository/models/{name}/load", headers=headers)


def predict(client: Client, rows: list[list[float]], headers: dict[str, str] | None = AUTH) -> httpx.Response:
    return client.post("/v1/models/clf:predict", json={"instances": rows}, headers=headers)


ROWS = np.random.default_rng(5).normal(0, 2, (3, CLF_FEATURES)).tolist()


def test_api_key_guards_prediction_and_repository_control(shared_keyed: InProcessClient) -> None:
    assert predict(shared_keyed, ROWS, headers=None).status_code == 401
    assert predict(shared_keyed, ROWS, headers={"X-API-Key": "wrong"}).status_code == 401
    assert predict(shared_keyed, ROWS, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert predict(shared_keyed, ROWS).status_code == 200
    refused = load(shared_keyed, "clf", headers={"Authorization": "Bearer nope"})
    assert refused.status_code == 401 and "API key" in refused.json()["error"]
    assert shared_keyed.get("/v2/health/live").status_code == 200  # probes stay open


def test_index_get_and_post(shared_keyed: InProcessClient) -> None:
    expected = [
        {"name": "clf", "version": "1", "state": "READY", "reason": ""},
        {"name": "reg", "version": "1", "state": "READY", "reason": ""},
    ]
    assert shared_keyed.get("/v2/repository/index", headers=AUTH).json() == expected
    posted = shared_keyed.post("/v2/repository/index", headers=AUTH, json={"ready": True})
    assert posted.json() == expected


def test_reload_under_load_fails_no_request(keyed: InProcessClient, repo: Path) -> None:
    """Eight clients keep a request each in flight (asyncio tasks on the app's loop) while clf/2
    is loaded."""
    stop = threading.Event()
    answers: list[tuple[list[list[float]], httpx.Response]] = []
    seen_by_worker: dict[int, list[str]] = {i: [] for i in range(8)}

    async def hammer(client: httpx.AsyncClient, worker: int) -> None:
        rng = np.random.default_rng(worker)
        while not stop.is_set():
            rows = rng.normal(0, 2, (int(rng.integers(1, 4)), CLF_FEATURES)).tolist()
            response = await client.post("/v1/models/clf:predict", json={"instances": rows}, headers=AUTH)
            answers.append((rows, response))
            if response.status_code == 200:
                seen_by_worker[worker].append(response.json()["model_version"])

    async def load_while_hammering(client: httpx.AsyncClient) -> httpx.Response:
        workers = [asyncio.create_task(hammer(client, i)) for i in range(8)]
        await until_answered(answers, 24)
        write_model(repo, "clf", 2, "classification", seed=42)
        reloaded = await client.post("/v2/repository/models/clf/load", headers=AUTH)
        await until_answered(answers, len(answers) + 24)
        stop.set()
        await asyncio.gather(*workers)
        return reloaded

    reloaded = keyed.run(load_while_hammering)
    assert reloaded.status_code == 200, reloaded.text
    assert reloaded.json()["version"] == "2"
    assert answers and all(r.status_code == 200 for _, r in answers), [
        r.text for _, r in answers if r.is_error
    ]
    versions = [r.json()["model_version"] for _, r in answers]
    assert versions[0] == "1" and versions[-1] == "2" and set(versions) == {"1", "2"}
    # Never back to the old version once switched: each worker sends its next request only after
    # the last answer, so its own sequence must be ordered. Across workers, two answers finished
    # in the same instant may reach the client in either order, so the global list need not be.
    for worker, seen in seen_by_worker.items():
        assert seen == sorted(seen), (worker, seen)
    references = {v: ReferenceModel(repo / "clf" / v) for v in ("1", "2")}
    for (rows, response), version in zip(answers[::10], versions[::10], strict=True):
        assert_matches(response.json()["predictions"], references[version].answer(np.asarray(rows)))


def test_broken_versions_are_refused_and_the_old_version_keeps_serving(
    keyed: InProcessClient, repo: Path
) -> None:
    write_model(repo, "clf", 2, "classification", seed=42)
    (repo / "clf" / "2" / "model.onnx").write_bytes(b"\x08\x07garbage, not a protobuf")
    refused = load(keyed, "clf")
    assert refused.status_code == 400
    assert "model 'clf' version 2" in refused.json()["error"] and "model.onnx" in refused.json()["error"]
    ok = predict(keyed, ROWS)
    assert ok.status_code == 200 and ok.json()["model_version"] == "1"

    shutil.rmtree(repo / "clf" / "2")
    write_model(repo, "clf", 3, "classification", seed=43, heads=2)
    manifest = repo / "clf" / "3" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"heads": 2', '"heads": 5'))  # graph has 2 heads
    refused = load(keyed, "clf")
    assert refused.status_code == 400 and "(batch, heads, classes)" in refused.json()["error"]

    manifest.write_text("{ not json")
    refused = load(keyed, "clf")
    assert refused.status_code == 400 and "not valid JSON" in refused.json()["error"]
    assert predict(keyed, ROWS).json()["model_version"] == "1"
    index = keyed.get("/v2/repository/index", headers=AUTH).json()
    assert {"name": "clf", "version": "1", "state": "READY", "reason": ""} in index


def test_unload_then_load_again(keyed: InProcessClient) -> None:
    unloaded = keyed.post("/v2/repository/models/reg/unload", headers=AUTH)
    assert unloaded.status_code == 200
    gone = keyed.post("/v1/models/reg:predict", json={"instances": [[0.0] * 5]}, headers=AUTH)
    assert gone.status_code == 404 and "'reg'" in gone.json()["error"]
    index = keyed.get("/v2/repository/index", headers=AUTH).json()
    assert {"name": "reg", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"} in index
    assert keyed.get("/v1/models", headers=AUTH).json() == {"models": ["clf"]}
    assert load(keyed, "reg").status_code == 200
    back = keyed.post("/v1/models/reg:predict", json={"instances": [[0.0] * 5]}, headers=AUTH)
    assert back.status_code == 200


def test_load_of_invalid_or_unknown_names_is_404(shared_keyed: InProcessClient) -> None:
    for name in ["%2E%2E", "%2Ehidden", "a%20b", "x" * 65, "nope"]:
        response = load(shared_keyed, name)
        assert response.status_code == 404, name
        error = response.json()["error"]
        assert "invalid model name" in error or "'nope' not found in repository" in error, error


def test_requests_queued_on_the_old_version_finish_there(repo: Path) -> None:
    with in_process(repo, api_key=API_KEY, headers=AUTH, **held_batches(1500)) as app:

        async def scenario(
            client: httpx.AsyncClient,
        ) -> tuple[list[httpx.Response], httpx.Response, httpx.Response]:
            queued = [
                asyncio.create_task(client.post("/v1/models/clf:predict", json={"instances": ROWS}))
                for _ in range(5)
            ]
            for _ in range(200):  # until all five wait in version 1's queue
                if (await client.get("/v1/models/clf")).json()["batching"]["queued_requests"] == 5:
                    break
                await asyncio.sleep(0.01)
            write_model(repo, "clf", 2, "classification", seed=42)
            reloaded = await client.post("/v2/repository/models/clf/load")
            # a full batch (256 rows) runs at once instead of waiting out the 1.5 s delay
            after = await client.post("/v1/models/clf:predict", json={"instances": [ROWS[0]] * 256})
            return await asyncio.gather(*queued), reloaded, after

        queued, reloaded, after = app.run(scenario)
    assert reloaded.status_code == 200
    assert [r.status_code for r in queued] == [200] * 5
    assert {r.json()["model_version"] for r in queued} == {"1"}
    assert after.json()["model_version"] == "2"


def test_request_that_looked_up_the_old_version_before_a_reload_is_answered_by_it(repo: Path) -> None:
    """The V2 route looks the model up as soon as the headers arrive, then reads the body: a reload
    in between must not fail the request. Sent by hand: headers and half the body, reload, the rest.

    A server whose in-flight limit is 2 (queue 1 + batch 1) refuses a third request with 503 "in
    flight" once both half-sent requests are admitted (at once: admission_wait_s 0, no wait for a
    turn): that is the signal to reload (polled, not slept)."""
    row = [0.5] * CLF_FEATURES
    body = orjson.dumps(
        {"inputs": [{"name": "input", "shape": [1, CLF_FEATURES], "datatype": "FP32", "data": row}]}
    )
    limits = {
        "max_queue_delay_ms": "1",
        "max_queue_size": "1",
        "max_batch_size": "1",
        "admission_wait_s": "0",
    }
    with running_server(repo, api_key=API_KEY, **limits) as server:
        host = server.url.removeprefix("http://").split(":")[0]
        head = (
            f"POST /v2/models/clf/infer HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        with contextlib.ExitStack() as stack:
            conns = [stack.enter_context(connect(server.url)) for _ in "ab"]
            for conn in conns:
                conn.sendall(head.encode() + body[:20])
            for _ in range(500):  # until both are admitted: their route has looked up clf (version 1)
                probe = httpx.post(f"{server.url}/v2/models/clf/infer", headers=AUTH, json={}, timeout=5)
                if probe.status_code == 503 and "in flight" in probe.text:
                    break
                time.sleep(0.01)
            assert probe.status_code == 503, probe.text
            write_model(repo, "clf", 2, "classification", seed=42)
            with client_of(server) as client:
                assert load(client, "clf").json()["version"] == "2"
            answers = []
            for conn in conns:
                conn.sendall(body[20:])
                answers.append(read_response(conn))
        for status, _, payload in answers:
            assert status == 200, payload
            assert orjson.loads(payload)["model_version"] == "1"
        with client_of(server) as client:
            fresh = predict(client, ROWS)
        assert fresh.status_code == 200 and fresh.json()["model_version"] == "2"
        # SIGTERM while version 1 is still retiring: it is drained at once, not after its grace period
        t0 = time.monotonic()
        assert server.terminate() == 0
        assert time.monotonic() - t0 < 10


def _model_ready_series(client: InProcessClient) -> dict[tuple[str, str], float]:
    families = text_string_to_metric_families(client.get("/metrics").text)
    ready = next(f for f in families if f.name == "hydra_model_ready")
    return {(s.labels["model"], s.labels["version"]): s.value for s in ready.samples}


def test_a_model_nothing_serves_is_exported_not_ready_until_it_loads(repo: Path) -> None:
    """HydraModelNotReady watches hydra_model_ready == 0: a broken model must show up there."""
    write_model(repo, "broken", 1, "classification", seed=7)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    with in_process(repo, api_key=API_KEY) as client:  # live once the lifespan has run
        assert client.get("/v2/health/live").status_code == 200
        ready = _model_ready_series(client)
        assert ready[("broken", "1")] == 0.0 and ready[("clf", "1")] == 1.0
        # α is exported as soon as a model loads, before any traffic, so dashboards can draw it
        families = text_string_to_metric_families(client.get("/metrics").text)
        alpha = next(f for f in families if f.name == "hydra_ood_alpha")
        assert {s.labels["model"] for s in alpha.samples if s.value > 0} >= {"clf", "reg"}

        write_model(repo, "broken", 2, "classification", seed=8)  # a good version 2 appears
        assert load(client, "broken").status_code == 200
        ready = _model_ready_series(client)
        assert ready[("broken", "2")] == 1.0 and ("broken", "1") not in ready
