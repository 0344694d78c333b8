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
import orjson
import pytest

from bench.http_load import closed_loop
from tests.service.support import CLF_FEATURES, in_process, running_server

SECONDS, CONCURRENCY = 0.8, 48


def young_collections(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(r'^python_gc_collections_total\{generation="0"\} (\S+)$', text, re.MULTILINE)
    assert match, "python_gc_collections_total missing from /metrics"
    return float(match.group(1))


def collections_per_1000_requests(model_repository: Path, **settings: str) -> float:
    """Generation-0 collections per 1,000 one-row predictions, CONCURRENCY connections for SECONDS."""
    rows = np.random.default_rng(0).normal(size=(64, CLF_FEATURES))
    bodies = [orjson.dumps({"instances": [row.tolist()]}) for row in rows]
    with running_server(model_repository, **settings) as server:
        before = young_collections(server.url)
        outcomes = asyncio.run(
            closed_loop(
                server.url,
                "/v1/models/clf:predict",
                lambda i: bodies[i % len(bodies)],
                concurrency=CONCURRENCY,
                duration_s=SECONDS,
            )
        )
        collections = young_collections(server.url) - before
    assert outcomes and all(o.status == 200 for o in outcomes), {o.status for o in outcomes}
    return 1000 * collections / len(outcomes)


def test_the_default_threshold_runs_far_fewer_collections_than_pythons(model_repository: Path) -> None:
    default = collections_per_1000_requests(model_repository)
    pythons = collections_per_1000_requests(model_repository, gc_young_threshold="0")
    # at Python's 700: 45-57 young collections per 1,000 requests here; at 50,000: none
    assert pythons >= 10, f"Python's threshold ran {pythons:.1f} young collections per 1,000 requests"
    assert default * 4 <= pythons, (default, pythons)


@pytest.mark.parametrize("young", [50_000, 0])
def test_an_in_process_app_sets_the_threshold_and_restores_it(model_repository: Path, young: int) -> None:
    before = gc.get_threshold()
    with in_process(model_repository, gc_young_threshold=young) as client:
        assert client.request("GET", "/v2/health/ready").status_code == 200
        assert gc.get_threshold() == (young or before[0], *before[1:])
    assert gc.get_threshold() == before
