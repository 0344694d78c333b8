"""KServe's own Python SDK (`kserve` 0.21, `InferenceRESTClient`) against a real server on models/.

The SDK pins numpy and others, so it lives in its own venv, `.venv-kserve` (`make kserve-venv`);
tests/reliability/kserve_sdk_client.py runs there as a subprocess and prints each call's result.
Skipped, with the reason, when that venv is missing.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_digits

from tests.service.support import REPO_ROOT, Server, running_server

KSERVE_PYTHON = REPO_ROOT / ".venv-kserve" / "bin" / "python"
CLIENT = REPO_ROOT / "tests" / "reliability" / "kserve_sdk_client.py"
MODEL = "digits"
CALLS = (
    "v1_is_server_live",
    "v1_is_model_ready",
    "v1_infer",
    "v2_is_server_live",
    "v2_is_server_ready",
    "v2_is_model_ready",
    "v2_infer_json",
    "v2_infer_binary",
)

pytestmark = pytest.mark.skipif(
    not KSERVE_PYTHON.exists(),
    reason=".venv-kserve/bin/python is missing: `make kserve-venv` installs the kserve SDK there",
)


@pytest.fixture(scope="module")
def sdk_run() -> Iterator[tuple[dict[str, Any], list[dict[str, Any]], np.ndarray]]:
    """The SDK client's results, the server's own V1 answer for the same rows, and the rows."""
    rows = load_digits().data[::90][:12].astype(np.float32)  # a dozen real digits
    with running_server(REPO_ROOT / "models") as server:
        own = httpx.post(
            f"{server.url}/v1/models/{MODEL}:predict", json={"instances": rows.tolist()}, timeout=30
        )
        assert own.status_code == 200, own.text
        results = _run_client(server, rows)
    yield results, own.json()["predictions"], rows


def _run_client(server: Server, rows: np.ndarray) -> dict[str, Any]:
    done = subprocess.run(
        [str(KSERVE_PYTHON), str(CLIENT), server.url, MODEL, json.dumps(rows.tolist())],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT / "tests",  # not the repo root: the client must not import our packages
        check=False,
    )
    assert done.returncode == 0, f"kserve client failed:\n{done.stderr}\nserver log:\n{server.log()}"
    results: dict[str, Any] = json.loads(done.stdout)
    return results


def _result(results: dict[str, Any], call: str) -> Any:
    assert call in results, f"the client made no {call} call: {sorted(results)}"
    assert "error" not in results[call], f"{call}: {results[call]['error']}"
    return results[call]["result"]


def test_every_sdk_call_succeeds(sdk_run: tuple[dict[str, Any], list[dict[str, Any]], np.ndarray]) -> None:
    results, _, _ = sdk_run
    failed = {call: results.get(call, {"error": "not made"}).get("error") for call in CALLS}
    assert not {call: error for call, error in failed.items() if error}, failed
    for call in ("v1_is_server_live", "v1_is_model_ready", "v2_is_server_live", "v2_is_server_ready"):
        assert _result(results, call) is True, call
    assert _result(results, "v2_is_model_ready") is True


def test_v1_infer_matches_the_servers_own_answer(
    sdk_run: tuple[dict[str, Any], list[dict[str, Any]], np.ndarray],
) -> None:
    results, own, rows = sdk_run
    body = _result(results, "v1_infer")
    assert body["model_name"] == MODEL
    predictions = body["predictions"]
    assert len(predictions) == len(rows)
    probabilities = np.asarray([p["probabilities"] for p in predictions])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert [p["label"] for p in predictions] == [p["label"] for p in own]
    np.testing.assert_allclose(probabilities, [p["probabilities"] for p in own], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("call", ["v2_infer_json", "v2_infer_binary"])
def test_v2_infer_matches_v1(
    sdk_run: tuple[dict[str, Any], list[dict[str, Any]], np.ndarray],
    call: str,
) -> None:
    results, own, rows = sdk_run
    answer = _result(results, call)
    binary = call == "v2_infer_binary"
    # the JSON call really sent and got JSON; the binary one really used the binary tensor extension
    assert answer["sent_binary"] is binary
    assert answer["received_binary"] is binary
    assert answer["model_name"] == MODEL
    outputs = answer["outputs"]
    probabilities = np.asarray(outputs["probabilities"])
    assert probabilities.shape == (len(rows), 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(probabilities, [p["probabilities"] for p in own], rtol=1e-5, atol=1e-7)
    assert outputs["label"] == [p["label"] for p in own]
    assert outputs["label_name"] == [p["label_name"] for p in own]
    assert outputs["ood_flag"] == [p["ood_flag"] for p in own]
    np.testing.assert_allclose(
        outputs["mutual_information"], [p["mutual_information"] for p in own], rtol=1e-4, atol=1e-7
    )
