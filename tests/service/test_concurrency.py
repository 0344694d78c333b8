"""Hundreds of concurrent requests with distinct inputs: every answer is its own rows' answer, and
the server really batched them (visible in model metadata and in /metrics). The app in process
(httpx's ASGI transport): the requests are asyncio tasks in flight together on its loop, which is
what the batcher sees of concurrent connections; tests/reliability/test_overload.py and
tests/service/test_v2_server.py keep many in flight over real sockets."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.support import CLF_FEATURES, REG_FEATURES, InProcessClient, ReferenceModel, in_process
from tests.service.test_v1 import assert_matches

REQUESTS = 300


@pytest.fixture(scope="module")
def batching_app(model_repository: Path) -> Iterator[InProcessClient]:
    with in_process(model_repository, max_batch_size=32, max_queue_delay_ms=5) as client:
        yield client


def _fire(
    jobs: list[tuple[str, np.ndarray, dict[str, object]]],
) -> Callable[[httpx.AsyncClient], Awaitable[list[httpx.Response]]]:
    async def every_job_at_once(client: httpx.AsyncClient) -> list[httpx.Response]:
        return await asyncio.gather(
            *(
                client.post(
                    f"/v1/models/{model}:predict", json={"instances": rows.tolist(), "parameters": params}
                )
                for model, rows, params in jobs
            )
        )

    return every_job_at_once


def test_every_concurrent_answer_matches_its_own_rows(
    batching_app: InProcessClient, model_repository: Path
) -> None:
    rng = np.random.default_rng(2024)
    jobs: list[tuple[str, np.ndarray, dict[str, object]]] = []
    for i in range(REQUESTS):
        model = "clf" if i % 3 else "reg"
        features = CLF_FEATURES if model == "clf" else REG_FEATURES
        rows = rng.normal(0, 2, (int(rng.integers(1, 5)), features)) + i  # distinct per request
        params = {"alpha": float(rng.choice([0.01, 0.1, 0.5])), "heads": bool(i % 2)}
        if model == "reg":
            params["interval_level"] = float(rng.choice([0.5, 0.9, 0.99]))
        jobs.append((model, rows, params))

    responses = batching_app.run(_fire(jobs))

    references = {m: ReferenceModel(model_repository / m / "1") for m in ("clf", "reg")}
    for (model, rows, params), response in zip(jobs, responses, strict=True):
        assert response.status_code == 200, response.text
        expected = references[model].answer(
            rows,
            alpha=float(params["alpha"]),  # type: ignore[arg-type]
            level=float(params.get("interval_level", 0.95)),  # type: ignore[arg-type]
            heads=bool(params["heads"]),
        )
        assert_matches(response.json()["predictions"], expected)

    batching = batching_app.get("/v1/models/clf").json()["batching"]
    clf_requests = sum(1 for m, _, _ in jobs if m == "clf")
    assert 1 < batching["max_batch_rows"] <= 32
    assert batching["batches"] < clf_requests  # requests shared model runs

    exposition = batching_app.get("/metrics").text
    count = re.search(r'^hydra_batch_size_rows_count\{model="clf",version="1"\} (\S+)$', exposition, re.M)
    total = re.search(r'^hydra_batch_size_rows_sum\{model="clf",version="1"\} (\S+)$', exposition, re.M)
    assert count and total
    assert float(total.group(1)) == batching["rows"]
    assert float(total.group(1)) / float(count.group(1)) > 1.5  # mean batch size well above one
