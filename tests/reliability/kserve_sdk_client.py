"""Drive a hydra-serve server with KServe's own Python SDK (`kserve` 0.21, `InferenceRESTClient`).

Run with `.venv-kserve/bin/python` (`make kserve-venv`), never the dev venv: the SDK pins numpy and
others. Not a test module; tests/reliability/test_kserve_sdk.py runs it as a subprocess:

    python kserve_sdk_client.py BASE_URL MODEL ROWS_JSON

ROWS_JSON is a JSON list of rows (lists of numbers). Prints one JSON object: for each call, its
result or the error it raised (`{"error": "..."}`), so the test can name what failed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig


def _tensors(response: Any) -> dict[str, Any]:
    """An SDK `InferResponse` as {output name: nested list}, plus its model name."""
    outputs = {out.name: out.as_numpy().tolist() for out in response.outputs}
    return {"model_name": response.model_name, "outputs": outputs}


def _request(model: str, rows: np.ndarray, *, binary: bool) -> InferRequest:
    tensor = InferInput(name="input", shape=list(rows.shape), datatype="FP32")
    tensor.set_data_from_numpy(rows, binary_data=binary)
    # binary: the outputs come back binary too (the extension's `binary_data_output`)
    parameters = {"binary_data_output": True} if binary else None
    return InferRequest(
        model_name=model, infer_inputs=[tensor], request_id="kserve-sdk", parameters=parameters
    )


async def _call(results: dict[str, Any], key: str, make: Callable[[], Awaitable[Any]]) -> None:
    try:
        results[key] = {"result": await make()}
    except Exception as exc:  # reported to the test, which fails with it
        results[key] = {"error": f"{type(exc).__name__}: {exc}"}


async def main(base_url: str, model: str, rows: np.ndarray) -> dict[str, Any]:
    results: dict[str, Any] = {}
    v1 = InferenceRESTClient(RESTConfig(protocol="v1", timeout=30))
    v2 = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
    try:
        await _call(results, "v1_is_server_live", lambda: v1.is_server_live(base_url))
        await _call(results, "v1_is_model_ready", lambda: v1.is_model_ready(base_url, model))

        async def v1_infer() -> Any:
            return await v1.infer(base_url, {"instances": rows.tolist()}, model_name=model)

        await _call(results, "v1_infer", v1_infer)
        await _call(results, "v2_is_server_live", lambda: v2.is_server_live(base_url))
        await _call(results, "v2_is_server_ready", lambda: v2.is_server_ready(base_url))
        await _call(results, "v2_is_model_ready", lambda: v2.is_model_ready(base_url, model))
        for binary in (False, True):

            async def v2_infer(binary: bool = binary) -> Any:
                request = _request(model, rows, binary=binary)
                # to_rest() gives the JSON header's length only when the body carries binary tensors
                _, json_length = request.to_rest()
                headers: dict[str, str] = {}
                response = await v2.infer(base_url, request, model_name=model, response_headers=headers)
                received_binary = "inference-header-content-length" in {k.lower() for k in headers}
                return {
                    "sent_binary": json_length is not None,
                    "received_binary": received_binary,
                    **_tensors(response),
                }

            await _call(results, "v2_infer_binary" if binary else "v2_infer_json", v2_infer)
    finally:
        await v1.close()
        await v2.close()
    return results


if __name__ == "__main__":
    url, name, rows_json = sys.argv[1:4]
    data = np.asarray(json.loads(rows_json), dtype=np.float32)
    print(json.dumps(asyncio.run(main(url, name, data))))
