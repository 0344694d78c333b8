"""Admission at the edge (service/admission.py): an overloaded model's requests are refused from
their headers alone — the body is never waited for — on a real server over raw sockets."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.support import CLF_FEATURES, Server, connect, read_response, running_server

ROW = [[0.25] * CLF_FEATURES]


def _headers_only(url: str, path: str, content_length: int = 100_000) -> socket.socket:
    """Open a connection and send a POST's headers, announcing a body that never comes."""
    sock = connect(url, timeout=5)
    host = url.removeprefix("http://").split(":")[0]
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {content_length}\r\n\r\n".encode()
    )
    return sock


def _status_and_headers(sock: socket.socket) -> tuple[int, str]:
    status, head, _ = read_response(sock)
    return status, head


def rejected(url: str, reason: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    found = re.search(
        rf'^hydra_rejected_requests_total\{{model="clf",reason="{reason}"\}} (\S+)$', text, re.M
    )
    return float(found.group(1)) if found else 0.0


def test_full_queue_refuses_before_the_body_is_read(slow_queue_server: Server) -> None:
    url = slow_queue_server.url

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            queued = [
                asyncio.create_task(client.post("/v1/models/clf:predict", json={"instances": ROW}))
                for _ in range(2)
            ]
            for _ in range(200):  # until both wait in the queue
                if (await client.get("/v1/models/clf")).json()["batching"]["queued_requests"] == 2:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the two requests never queued")
            for path in ("/v2/models/clf/infer", "/v2/models/clf/versions/1/infer", "/v1/models/clf:predict"):
                sock = _headers_only(url, path)  # no body will follow: a route would wait for it
                t0 = time.perf_counter()
                status, head = await asyncio.to_thread(_status_and_headers, sock)
                took = time.perf_counter() - t0
                sock.close()
                assert status == 503, head
                assert re.search(r"(?im)^retry-after: [1-9]\d*\r?$", head), head
                assert took < 1.0, took  # answered from the headers, not after a body or the delay
            return list(await asyncio.gather(*queued))

    before = rejected(url, "queue_full")
    answers = asyncio.run(scenario())
    assert [r.status_code for r in answers] == [200, 200]  # what was admitted is served
    assert rejected(url, "queue_full") >= before + 3


def test_unknown_model_and_other_routes_pass_through(slow_queue_server: Server) -> None:
    response = httpx.post(f"{slow_queue_server.url}/v2/models/nope/infer", json={"inputs": []}, timeout=5)
    assert response.status_code == 404 and "nope" in response.json()["error"]


@pytest.fixture(scope="module")
def tight_server(model_repository: Path) -> Iterator[Server]:
    # at most max_queue_size + max_batch_size = 3 requests of a model admitted at once
    with running_server(
        model_repository, max_batch_size="1", max_queue_size="2", request_read_timeout_s="5"
    ) as server:
        yield server


def test_in_flight_limit_refuses_past_queue_plus_one_batch(tight_server: Server) -> None:
    url = tight_server.url
    slow = [_headers_only(url, "/v2/models/clf/infer") for _ in range(3)]  # admitted, bodies pending
    try:
        for _ in range(200):  # until the server has read all three requests' headers
            response = httpx.post(f"{url}/v2/models/clf/infer", json={"inputs": []}, timeout=5)
            if response.status_code == 503:
                break
            time.sleep(0.01)
        assert response.status_code == 503, response.text
        assert "in flight" in response.json()["error"], response.text
        assert int(response.headers["Retry-After"]) >= 1
        assert rejected(url, "in_flight_limit") >= 1
    finally:
        for sock in slow:
            sock.close()
    # the slow requests went away: admission is free again and a real request is served
    for _ in range(200):
        response = httpx.post(f"{url}/v1/models/clf:predict", json={"instances": ROW}, timeout=5)
        if response.status_code == 200:
            break
        time.sleep(0.02)
    assert response.status_code == 200, response.text
