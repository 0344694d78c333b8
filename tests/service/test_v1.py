"""KServe V1 through the app in process (httpx over ASGI, its lifespan run: `support.in_process`):
happy paths match a direct ORT run and the test oracle, every bad input is a 4xx. The socket-level
behaviour (limits, signals, overload) is tested on real servers elsewhere."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.routes.v1 import ModelStatus
from tests.service.support import (
    CLF_FEATURES,
    REG_FEATURE_NAMES,
    REG_FEATURES,
    InProcessClient,
    ReferenceModel,
    in_process,
)

CLASSIFICATION_FIELDS = [
    "probabilities", "label", "label_name", "confidence", "variance", "disagreement", "mutual_information",
    "expected_entropy", "total_entropy", "epkl", "ood_score", "ood_p_value", "ood_flag", "ood_alpha",
]  # fmt: skip
REGRESSION_FIELDS = [
    "mean", "variance", "aleatoric_variance", "epistemic_variance", "total_variance", "disagreement",
    "interval_lower", "interval_upper", "interval_level", "ood_score", "ood_p_value", "ood_flag", "ood_alpha",
]  # fmt: skip


def assert_matches(predictions: list[dict[str, Any]], expected: dict[str, np.ndarray]) -> None:
    assert len(predictions) == len(next(iter(expected.values())))
    for name, values in expected.items():
        got = [p[name] for p in predictions]
        if values.dtype.kind in "fc":
            np.testing.assert_allclose(
                np.asarray(got, dtype=np.float64), values, rtol=2e-5, atol=1e-6, err_msg=name
            )
        else:
            assert got == values.tolist(), name


@pytest.fixture(scope="module")
def client(model_repository: Path) -> Iterator[InProcessClient]:
    with in_process(model_repository) as client:
        yield client


def predict(client: InProcessClient, model: str, body: Any, **kwargs: Any) -> httpx.Response:
    return client.post(f"/v1/models/{model}:predict", json=body, timeout=10, **kwargs)


def test_list_and_metadata(client: InProcessClient) -> None:
    assert client.get("/v1/models").json() == {"models": ["clf", "reg"]}
    meta = client.get("/v1/models/clf").json()
    assert meta["name"] == "clf" and meta["ready"] is True and meta["version"] == "1"
    assert meta["labels"] == ["setosa", "versicolor", "virginica"] and meta["heads"] == 4
    assert meta["provider"] == "CPUExecutionProvider"
    assert {o["name"] for o in meta["outputs"]} >= {*CLASSIFICATION_FIELDS, "heads"}
    for model in ("clf", "reg"):  # the declared response model is the whole answer, field for field
        ModelStatus.model_validate(client.get(f"/v1/models/{model}").json())
    assert set(ModelStatus.model_json_schema()["properties"]) == set(meta)
    declared = client.get("/openapi.json").json()["paths"]["/v1/models/{model_name}"]["get"]
    assert declared["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ModelStatus"
    )


def test_classification_rows_match_direct_onnxruntime(
    client: InProcessClient, model_repository: Path
) -> None:
    rows = np.random.default_rng(7).normal(0, 2, (5, CLF_FEATURES)).round(3)
    response = predict(client, "clf", {"instances": rows.tolist()})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "clf" and body["model_version"] == "1"
    assert list(body["predictions"][0]) == CLASSIFICATION_FIELDS
    expected = ReferenceModel(model_repository / "clf" / "1").answer(rows)
    assert_matches(body["predictions"], expected)
    for p in body["predictions"]:
        assert abs(sum(p["probabilities"]) - 1) < 1e-5
        assert p["ood_flag"] == (p["ood_p_value"] <= 0.05) and p["ood_alpha"] == pytest.approx(0.05)


def test_classification_heads_and_alpha_override(client: InProcessClient, model_repository: Path) -> None:
    rows = np.random.default_rng(8).normal(0, 2, (3, CLF_FEATURES))
    body = predict(
        client, "clf", {"instances": rows.tolist(), "parameters": {"alpha": 0.5, "heads": True}}
    ).json()
    expected = ReferenceModel(model_repository / "clf" / "1").answer(rows, alpha=0.5, heads=True)
    assert_matches(body["predictions"], expected)
    assert np.asarray(body["predictions"][0]["heads"]).shape == (4, 3)
    assert all(p["ood_alpha"] == 0.5 for p in body["predictions"])


def test_regression_interval_level_and_heads(client: InProcessClient, model_repository: Path) -> None:
    rows = np.random.default_rng(9).normal(0, 1, (4, REG_FEATURES))
    params = {"interval_level": 0.8, "heads": True}
    body = predict(client, "reg", {"instances": rows.tolist(), "parameters": params}).json()
    assert list(body["predictions"][0])[: len(REGRESSION_FIELDS)] == REGRESSION_FIELDS
    expected = ReferenceModel(model_repository / "reg" / "1").answer(rows, level=0.8, heads=True)
    assert_matches(body["predictions"], expected)
    for p in body["predictions"]:
        assert p["interval_lower"] < p["mean"] < p["interval_upper"] and p["interval_level"] == pytest.approx(
            0.8
        )
        assert p["total_variance"] == pytest.approx(
            p["aleatoric_variance"] + p["epistemic_variance"], rel=1e-5
        )
        assert len(p["heads_mean"]) == len(p["heads_variance"]) == 4


def test_regression_defaults_omit_heads(client: InProcessClient) -> None:
    body = predict(client, "reg", {"instances": [[0.1] * REG_FEATURES]}).json()
    assert list(body["predictions"][0]) == REGRESSION_FIELDS
    assert body["predictions"][0]["interval_level"] == pytest.approx(0.95)


def test_named_instances_for_a_model_with_feature_names(client: InProcessClient) -> None:
    rows = np.random.default_rng(10).normal(0, 1, (3, REG_FEATURES)).round(4)
    named = [dict(zip(reversed(REG_FEATURE_NAMES), reversed(row.tolist()), strict=True)) for row in rows]
    by_name = predict(client, "reg", {"instances": named}).json()["predictions"]
    by_position = predict(client, "reg", {"instances": rows.tolist()}).json()["predictions"]
    assert by_name == by_position


GOOD_CLF = [[0.5] * CLF_FEATURES]
BAD_REQUESTS: list[tuple[str, str, bytes | None, Any, int, str]] = [
    # (case, model, raw body, json body, status, text the error must contain)
    ("malformed JSON", "clf", b'{"instances": [[1, 2,', None, 400, "malformed JSON"),
    ("not an object", "clf", None, [[1.0] * CLF_FEATURES], 400, "JSON object"),
    ("missing instances", "clf", None, {"rows": GOOD_CLF}, 400, "instances"),
    ("empty instances", "clf", None, {"instances": []}, 400, "empty instances"),
    ("too few features", "clf", None, {"instances": [[1.0] * (CLF_FEATURES - 1)]}, 400, "shape [8]"),
    ("too many features", "clf", None, {"instances": [[1.0] * (CLF_FEATURES + 3)]}, 400, "shape [8]"),
    ("flat row", "clf", None, {"instances": [1.0] * CLF_FEATURES}, 400, "shape [8]"),
    ("ragged rows", "clf", None, {"instances": [[1.0] * CLF_FEATURES, [1.0]]}, 400, "rectangular"),
    ("string value", "clf", None, {"instances": [["a"] * CLF_FEATURES]}, 400, "numbers"),
    ("null value", "clf", None, {"instances": [[None] * CLF_FEATURES]}, 400, "numbers"),
    ("bool value", "clf", None, {"instances": [[True] * CLF_FEATURES]}, 400, "numbers"),
    ("NaN literal", "clf", b'{"instances": [[NaN, 1, 1, 1, 1, 1, 1, 1]]}', None, 400, "NaN"),
    ("Infinity literal", "clf", b'{"instances": [[-Infinity, 1, 1, 1, 1, 1, 1, 1]]}', None, 400, "Infinity"),
    ("overflowing number", "clf", b'{"instances": [[1e39, 1, 1, 1, 1, 1, 1, 1]]}', None, 400, "finite"),
    ("alpha zero", "clf", None, {"instances": GOOD_CLF, "parameters": {"alpha": 0}}, 400, "alpha"),
    ("alpha one", "clf", None, {"instances": GOOD_CLF, "parameters": {"alpha": 1.0}}, 400, "alpha"),
    ("alpha text", "clf", None, {"instances": GOOD_CLF, "parameters": {"alpha": "x"}}, 400, "alpha"),
    ("level 1.5", "reg", None, {"instances": [[0.0] * REG_FEATURES], "parameters": {"interval_level": 1.5}},
     400, "interval_level"),
    ("unknown parameter", "clf", None, {"instances": GOOD_CLF, "parameters": {"alfa": 0.1}}, 400, "alfa"),
    ("missing named feature", "reg", None, {"instances": [{"age": 1, "bmi": 2, "bp": 3, "s1": 4}]}, 400,
     "missing features ['s2']"),
    ("named features without names", "clf", None, {"instances": [{"a": 1}]}, 400, "no feature names"),
    ("too many rows", "clf", None, {"instances": [[0.0] * CLF_FEATURES] * 5000}, 400, "max_request_rows"),
    ("unknown model", "nope", None, {"instances": GOOD_CLF}, 404, "'nope'"),
    ("dot-dot model name", "..", None, {"instances": GOOD_CLF}, 404, "'..'"),
    ("slashed model name", "..%2F..%2Fetc", None, {"instances": GOOD_CLF}, 404, "Not Found"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "model", "raw", "payload", "status", "needle"), BAD_REQUESTS,
                         ids=[c[0] for c in BAD_REQUESTS])  # fmt: skip
def test_bad_input_is_a_4xx_naming_the_problem(
    client: InProcessClient, case: str, model: str, raw: bytes | None, payload: Any, status: int, needle: str
) -> None:
    url = f"/v1/models/{model}:predict"
    if raw is not None:
        response = client.post(url, content=raw, headers={"content-type": "application/json"})
    else:
        response = client.post(url, json=payload)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"], response.json()


def test_body_over_byte_limit_is_413_before_parsing(client: InProcessClient) -> None:
    # 20 MB of invalid JSON: a parser would answer 400; the limit answers 413 first
    response = client.post("/v1/models/clf:predict", content=b"[" * (20 * 1024 * 1024))
    assert response.status_code == 413
    assert "max_request_bytes" in response.json()["error"]


def test_chunked_body_over_byte_limit_is_413(client: InProcessClient) -> None:
    def chunks() -> Any:
        for _ in range(40):
            yield b" " * (1024 * 1024)

    response = client.post("/v1/models/clf:predict", content=chunks(), timeout=30)
    assert response.status_code == 413
    assert "max_request_bytes" in response.json()["error"]


def test_unknown_route_and_method_are_json_errors(client: InProcessClient) -> None:
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    wrong = client.get("/v1/models/clf:predict")
    assert wrong.status_code in (404, 405) and "error" in wrong.json()


def test_repository_control_is_disabled_without_a_configured_key(client: InProcessClient) -> None:
    response = client.post("/v2/repository/models/clf/load")
    assert response.status_code == 403 and "HYDRA_API_KEY" in response.json()["error"]


def test_openapi_documents_the_predict_body(client: InProcessClient) -> None:
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/v1/models/{model_name}:predict"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    if "$ref" in schema:  # FastAPI declares the body model once, under components
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    assert "instances" in schema["properties"] and "parameters" in schema["properties"]


def test_root_is_kserve_v1_liveness(client: InProcessClient) -> None:
    # KServe's model server answers GET / so, and its SDK's V1 `is_server_live` reads "status"
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"status": "alive"}
    assert client.head("/").status_code in (200, 405)  # never a 404 or 5xx
    assert client.post("/").status_code == 405
    spec = client.get("/openapi.json").json()
    assert "get" in spec["paths"]["/"]
