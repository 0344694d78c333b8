"""The inference routes' lean path (service/routes/infer.py) and their FastAPI declarations give the
same answers: with the edge taken out of the app, FastAPI's routes serve every inference request
through the same handlers, with the same statuses and bodies."""

from __future__ import annotations

import gzip
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.app import create_app
from service.settings import Settings
from tests.service.support import CLF_FEATURES, REG_FEATURES

with warnings.catch_warnings():  # starlette's own deprecation notice about its httpx backend
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

ROW = [0.25] * CLF_FEATURES
V2 = {"inputs": [{"name": "input", "shape": [1, CLF_FEATURES], "datatype": "FP32", "data": ROW}]}
LEAN = V2 | {"outputs": [{"name": n} for n in ("probabilities", "mutual_information", "variance")]}

# (path, body bytes, extra headers): answers, refusals of bad input, unknown models and versions
REQUESTS: list[tuple[str, bytes, dict[str, str]]] = [
    ("/v2/models/clf/infer", orjson.dumps(V2), {}),
    ("/v2/models/clf/versions/1/infer", orjson.dumps(LEAN), {}),
    ("/v2/models/clf/infer", gzip.compress(orjson.dumps(LEAN)), {"Content-Encoding": "gzip"}),
    ("/v2/models/clf/infer", b'{"inputs": [', {}),
    ("/v2/models/clf/infer", orjson.dumps(V2 | {"outputs": [{"name": "nope"}]}), {}),
    ("/v2/models/nope/infer", orjson.dumps(V2), {}),
    ("/v2/models/clf/versions/7/infer", orjson.dumps(V2), {}),
    ("/v1/models/clf:predict", orjson.dumps({"instances": [ROW, ROW]}), {}),
    ("/v1/models/reg:predict", orjson.dumps({"instances": [[0.5] * REG_FEATURES]}), {}),
    ("/v1/models/clf:predict", orjson.dumps({"instances": []}), {}),
    ("/v1/models/nope:predict", orjson.dumps({"instances": [ROW]}), {}),
]


@pytest.fixture(scope="module")
def client(model_repository: Path) -> Iterator[tuple[TestClient, Any]]:
    app = create_app(Settings(model_repository=model_repository, grpc_port=0))
    with TestClient(app) as test_client:
        yield test_client, app


def _answers(test_client: TestClient) -> list[tuple[int, Any]]:
    out = []
    for path, body, headers in REQUESTS:
        response = test_client.post(
            path, content=body, headers={"Content-Type": "application/json", **headers}
        )
        out.append((response.status_code, response.json()))
    return out


def test_the_fastapi_declarations_answer_as_the_edge_does(client: tuple[TestClient, Any]) -> None:
    test_client, app = client
    through_edge = _answers(test_client)
    front = app.front
    app.front = None  # every request now goes through FastAPI's stack and its declared routes
    try:
        through_fastapi = _answers(test_client)
    finally:
        app.front = front
    assert [status for status, _ in through_edge] == [200, 200, 200, 400, 400, 404, 404, 200, 200, 400, 404]
    assert through_fastapi == through_edge
    lean = through_edge[1][1]
    assert [o["name"] for o in lean["outputs"]] == ["probabilities", "mutual_information", "variance"]


def test_edge_counts_its_requests_under_the_route_template(client: tuple[TestClient, Any]) -> None:
    test_client, _ = client
    test_client.post("/v2/models/nope/infer", content=orjson.dumps(V2))
    text = test_client.get("/metrics").text
    counted = [
        line
        for line in text.splitlines()
        if line.startswith("hydra_requests_total{")
        and 'route="/v2/models/{model_name}/infer"' in line
        and 'code="404"' in line
    ]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) >= 1
