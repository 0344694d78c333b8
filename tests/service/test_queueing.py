"""Queue policy on a real server: bounded queue (503 + Retry-After), deadlines (504, never run),
and a client that disconnects costs no model run."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from tests.service.support import CLF_FEATURES, Server

ROW = [[0.25] * CLF_FEATURES]


def batching(url: str) -> dict[str, int]:
    state: dict[str, int] = httpx.get(f"{url}/v1/models/clf").json()["batching"]
    return state


def rows_run(url: str) -> int:
    return int(batching(url)["rows"])


def wait_unqueued(url: str, reason: str, at_least: float, timeout_s: float = 10.0) -> None:
    """Until the rejection is counted and nothing waits in the queue: a request out of the queue
    can no longer run (the batcher only takes queued requests)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if rejected(url, reason) >= at_least and batching(url)["queued_requests"] == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {reason} rejection with an empty queue after {timeout_s}s: {batching(url)}")


def rejected(url: str, reason: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    found = re.search(
        rf'^hydra_rejected_requests_total\{{model="clf",reason="{reason}"\}} (\S+)$', text, re.M
    )
    return float(found.group(1)) if found else 0.0


def one_row(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/models/clf:predict", json={"instances": ROW}, timeout=10)


async def _burst(url: str, n: int) -> list[tuple[httpx.Response, float]]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:

        async def one() -> tuple[httpx.Response, float]:
            t0 = time.perf_counter()
            response = await client.post("/v1/models/clf:predict", json={"instances": ROW})
            return response, time.perf_counter() - t0

        return await asyncio.gather(*(one() for _ in range(n)))


def test_full_queue_answers_503_at_once_with_retry_after(slow_queue_server: Server) -> None:
    results = asyncio.run(_burst(slow_queue_server.url, 6))
    ok = [(r, t) for r, t in results if r.status_code == 200]
    full = [(r, t) for r, t in results if r.status_code == 503]
    assert len(ok) == 2 and len(full) == 4, [r.text for r, _ in results]
    for response, seconds in full:
        assert response.headers["Retry-After"] == "1"
        assert "queue" in response.json()["error"] and "full" in response.json()["error"]
        assert seconds < 0.8  # rejected at once, not after the batch delay
    assert all(seconds >= 1.1 for _, seconds in ok)
    assert rejected(slow_queue_server.url, "queue_full") >= 4


def test_request_past_its_deadline_is_504_and_never_runs(slow_queue_server: Server) -> None:
    before = rows_run(slow_queue_server.url)
    expired = rejected(slow_queue_server.url, "deadline")
    t0 = time.perf_counter()
    response = httpx.post(
        f"{slow_queue_server.url}/v1/models/clf:predict",
        json={"instances": ROW * 3, "parameters": {"timeout": 0.1}},
        timeout=10,
    )
    assert response.status_code == 504, response.text
    assert "without running" in response.json()["error"]
    assert time.perf_counter() - t0 < 0.8
    wait_unqueued(slow_queue_server.url, "deadline", expired + 1)
    # a later request's batch runs its one row only: the expired three never join a batch
    assert one_row(slow_queue_server.url).status_code == 200
    assert rows_run(slow_queue_server.url) == before + 1


def test_disconnected_client_costs_no_model_run(slow_queue_server: Server) -> None:
    before = rows_run(slow_queue_server.url)
    gone = rejected(slow_queue_server.url, "disconnected")
    impatient = httpx.Timeout(5.0, read=0.3)  # connects and sends, then gives up waiting for the answer
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{slow_queue_server.url}/v1/models/clf:predict", json={"instances": ROW * 5}, timeout=impatient
        )
    wait_unqueued(slow_queue_server.url, "disconnected", gone + 1)
    # the server still answers, and that batch runs its one row only, not the abandoned five
    assert one_row(slow_queue_server.url).status_code == 200
    assert rows_run(slow_queue_server.url) == before + 1
