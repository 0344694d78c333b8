"""Request limits on a real server, driven with raw sockets where a client library would not misbehave.

- A declared Content-Length over `max_request_bytes` is refused 413 without the body being sent.
- A chunked body that grows past the limit is refused 413 while it streams; the server's memory
  does not grow with what the client keeps sending.
- The row limit is checked before the rows are turned into an array: one row too many is refused
  as such even when the rows themselves could not be parsed.
- A client that sends its headers and then trickles its body gets 408 after
  `request_read_timeout_s`; meanwhile other clients are answered at normal speed and the batcher
  sees nothing of it (its queue stays empty).
- A client that trickles its headers (slowloris) does not slow anyone else down either.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.reliability.checks import is_error_body
from tests.reliability.memory import rss_bytes
from tests.service.support import CLF_FEATURES, Server, connect, read_response, running_server

LIMIT = 64 * 1024
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def limited_server(model_repository: Path) -> Iterator[Server]:
    with running_server(
        model_repository, max_request_bytes=str(LIMIT), max_request_rows="4", request_read_timeout_s="1.5"
    ) as server:
        yield server


def _connect(server: Server) -> socket.socket:
    return connect(server.url)


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    status, _, body = read_response(sock)
    return status, body


def _predict_ok(url: str) -> float:
    t0 = time.perf_counter()
    response = httpx.post(
        f"{url}/v1/models/clf:predict", json={"instances": [[0.5] * CLF_FEATURES]}, timeout=10
    )
    assert response.status_code == 200, response.text
    return time.perf_counter() - t0


def test_declared_oversize_body_is_refused_before_it_is_sent(limited_server: Server) -> None:
    with _connect(limited_server) as sock:
        sock.sendall(
            b"POST /v1/models/clf:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        t0 = time.perf_counter()
        status, body = _read_response(sock)  # no body byte was sent
    assert status == 413 and is_error_body(body) and b"max_request_bytes" in body
    assert time.perf_counter() - t0 < 1.0


def test_streamed_oversize_body_is_refused_while_streaming(limited_server: Server) -> None:
    pid = limited_server.process.pid
    before = rss_bytes(pid)
    chunk = b"[" + b"0.5," * 16_000  # 64 KB of JSON-looking bytes per chunk
    sent = 0
    with _connect(limited_server) as sock:
        sock.sendall(
            b"POST /v2/models/clf/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        try:
            for _ in range(400):  # up to 25 MiB, far past the 64 KiB limit
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed: it stopped reading
        status, body = _read_response(sock)
    assert status == 413 and is_error_body(body), body
    assert rss_bytes(pid) - before < 20 * MiB
    _predict_ok(limited_server.url)


def test_row_limit_is_checked_before_rows_become_an_array(limited_server: Server) -> None:
    url = limited_server.url
    good = [[0.5] * CLF_FEATURES] * 4
    assert httpx.post(f"{url}/v1/models/clf:predict", json={"instances": good}).status_code == 200
    # five rows, the last one ragged: the row count is what gets refused
    ragged = [*good, [0.5, 0.5]]
    v1 = httpx.post(f"{url}/v1/models/clf:predict", json={"instances": ragged})
    assert v1.status_code == 400 and "max_request_rows=4" in v1.json()["error"], v1.text
    rows = np.full((5, CLF_FEATURES), 0.5)
    v2 = httpx.post(
        f"{url}/v2/models/clf/infer",
        json={
            "inputs": [
                {
                    "name": "input",
                    "shape": [5, CLF_FEATURES],
                    "datatype": "FP32",
                    "data": rows.ravel().tolist(),
                }
            ]
        },
    )
    assert v2.status_code == 400 and "max_request_rows=4" in v2.json()["error"], v2.text


@pytest.mark.serial  # compares latencies before and during: alone on the machine (tests/conftest.py)
def test_a_client_trickling_its_body_times_out_without_holding_up_others(limited_server: Server) -> None:
    url = limited_server.url
    body = json.dumps({"instances": [[0.5] * CLF_FEATURES]}).encode()
    normal = [_predict_ok(url) for _ in range(5)]
    tricklers = []
    for _ in range(20):
        sock = _connect(limited_server)
        sock.sendall(
            b"POST /v1/models/clf:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:3]
        )
        tricklers.append(sock)
    t0 = time.perf_counter()
    during = []
    sent = 3
    while time.perf_counter() - t0 < 1.0:  # trickle one byte per client every 0.2 s, and measure others
        for sock in tricklers:
            sock.sendall(body[sent : sent + 1])
        sent += 1
        during.append(_predict_ok(url))
        time.sleep(0.2)
    meta = httpx.get(f"{url}/v1/models/clf").json()["batching"]
    assert meta["queued_requests"] == 0  # the batcher never saw the trickling requests
    answers = []
    for sock in tricklers:
        status, response = _read_response(sock)
        answers.append((status, response, time.perf_counter() - t0))
        sock.close()
    assert all(status == 408 and is_error_body(response) for status, response, _ in answers), answers[:2]
    assert b"request_read_timeout_s" in answers[0][1]
    assert max(seconds for _, _, seconds in answers) < 4.0
    assert max(during) < max(0.5, 5 * max(normal)), (normal, during)
    print(
        "\nSLOW_CLIENTS "
        + json.dumps(
            {
                "trickling_clients": len(tricklers),
                "timed_out_408": sum(1 for s, _, _ in answers if s == 408),
                "normal_latency_ms_before": round(1000 * max(normal), 1),
                "normal_latency_ms_during": round(1000 * max(during), 1),
            }
        )
    )


@pytest.mark.serial  # a latency bound: alone on the machine (tests/conftest.py)
def test_slowloris_headers_do_not_hold_up_other_clients(limited_server: Server) -> None:
    url = limited_server.url
    sockets = []
    for _ in range(50):
        sock = _connect(limited_server)
        sock.sendall(b"POST /v1/models/clf:predict HTTP/1.1\r\nHost: x\r\n")
        sockets.append(sock)
    try:
        latencies = []
        for i in range(5):
            for sock in sockets:
                sock.sendall(f"X-Slow-{i}: y\r\n".encode())
            latencies.append(_predict_ok(url))
            time.sleep(0.1)
        assert max(latencies) < 0.5, latencies
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    finally:
        for sock in sockets:
            sock.close()
