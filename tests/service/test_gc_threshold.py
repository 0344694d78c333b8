"""The young-generation threshold the lifespan sets (settings.gc_young_threshold): under concurrent
load the server runs far fewer cyclic collections than at Python's default, its /metrics counts
them (python_gc_*), and an app run in-process leaves the process's thresholds as they were."""

from __future__ import annotations

import asyncio
import gc
import re
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.support import CLF_FEATURES, in_process, running_server

REQUESTS, CONCURRENCY = 1000, 48


def young_collections(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(r'^python_gc_collections_total\{generation="0"\} (\S+)$', text, re.MULTILINE)
    assert match, "python_gc_collections_total missing from /metrics"
    return float(match.group(1))


def collections_under_load(model_repository: Path, **settings: str) -> float:
    """Generation-0 collections while REQUESTS one-row predictions arrive CONCURRENCY at a time."""
    with running_server(model_repository, **settings) as server:
        before = young_collections(server.url)
        rows = np.random.default_rng(0).normal(size=(REQUESTS, CLF_FEATURES)).tolist()

        async def load() -> None:
            limits = httpx.Limits(max_connections=CONCURRENCY)
            async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:
                gate = asyncio.Semaphore(CONCURRENCY)

                async def one(row: list[float]) -> None:
                    async with gate:
                        r = await client.post("/v1/models/clf:predict", json={"instances": [row]})
                        assert r.status_code == 200, r.text

                await asyncio.gather(*(one(row) for row in rows))

        asyncio.run(load())
        return young_collections(server.url) - before


def test_the_default_threshold_runs_far_fewer_collections_than_pythons(model_repository: Path) -> None:
    default = collections_under_load(model_repository)
    pythons = collections_under_load(model_repository, gc_young_threshold="0")
    # at Python's 700: ~9 collections of the young generation per 1,000 requests here; at 50,000: 0
    assert pythons >= 4, f"Python's threshold ran only {pythons} young collections: no load to compare"
    assert default * 4 <= pythons, (default, pythons)


@pytest.mark.parametrize("young", [50_000, 0])
def test_an_in_process_app_sets_the_threshold_and_restores_it(model_repository: Path, young: int) -> None:
    before = gc.get_threshold()
    with in_process(model_repository, gc_young_threshold=young) as client:
        assert client.request("GET", "/v2/health/ready").status_code == 200
        assert gc.get_threshold() == (young or before[0], *before[1:])
    assert gc.get_threshold() == before
