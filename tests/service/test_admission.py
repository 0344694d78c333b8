"""Admission at the edge (service/admission.py): an overloaded model's requests are refused from
their headers alone — the body is never waited for — on a real server over raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import re
import select
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.service.support import (
    CLF_FEATURES,
    REG_FEATURES,
    Server,
    connect,
    read_response,
    running_server,
    server_fixture,
)

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


def _post_until(
    url: str, path: str, payload: object, status: int, tries: int, pause_s: float
) -> httpx.Response:
    """POST `payload` until the answer has `status`, at most `tries` times: the last answer."""
    for _ in range(tries):
        response = httpx.post(f"{url}{path}", json=payload, timeout=5)
        if response.status_code == status:
            break
        time.sleep(pause_s)
    return response


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


def _three_admitted(doc: str, **settings: str) -> Any:
    """A server fixture admitting at most max_queue_size 2 + max_batch_size 1 = 3 requests of a model
    at once; `doc` says what happens past that."""
    return server_fixture(
        f"3 requests admitted at most (queue 2 + batch 1); {doc}",
        max_batch_size="1",
        max_queue_size="2",
        **settings,
    )


tight_server = _three_admitted(
    "past that a request is refused at once (admission_wait_s 0), never waits for a turn.",
    request_read_timeout_s="5",
    admission_wait_s="0",
)


def test_in_flight_limit_refuses_past_queue_plus_one_batch(tight_server: Server) -> None:
    url = tight_server.url
    slow = [_headers_only(url, "/v2/models/clf/infer") for _ in range(3)]  # admitted, bodies pending
    try:
        # until the server has read all three requests' headers
        response = _post_until(url, "/v2/models/clf/infer", {"inputs": []}, 503, tries=200, pause_s=0.01)
        assert response.status_code == 503, response.text
        assert "in flight" in response.json()["error"], response.text
        assert int(response.headers["Retry-After"]) >= 1
        assert rejected(url, "in_flight_limit") >= 1
    finally:
        for sock in slow:
            sock.close()
    # the slow requests went away: admission is free again and a real request is served
    response = _post_until(url, "/v1/models/clf:predict", {"instances": ROW}, 200, tries=200, pause_s=0.02)
    assert response.status_code == 200, response.text


# ---- waiting for a turn (admission_wait_s > 0) -----------------------------------------------------


def _predict_request(url: str) -> bytes:
    host = url.removeprefix("http://").split(":")[0]
    body = orjson.dumps({"instances": ROW})
    return (
        f"POST /v1/models/clf:predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _answered_within(sock: socket.socket, seconds: float) -> bool:
    ready, _, _ = select.select([sock], [], [], seconds)
    return bool(ready)


def _drain_rate_seen(url: str, seconds: float = 0.6) -> None:
    """Served requests back to back for `seconds`: the model has a drain rate, and a request has
    just left (a line whose requests have not moved for admission_wait_s refuses newcomers)."""
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=5) as client:
        while time.monotonic() < deadline:
            assert client.post("/v1/models/clf:predict", json={"instances": ROW}).status_code == 200


waiting_server = _three_admitted(
    "past that a request waits for its turn while the drain rate promises it within 1 s; a waiter "
    "without a turn after 2 s is answered 504.",
    admission_wait_s="1",
    request_timeout_s="2",
    request_read_timeout_s="4",
)


def test_request_past_the_limit_waits_for_its_turn_and_is_served(waiting_server: Server) -> None:
    url = waiting_server.url
    refused = rejected(url, "in_flight_limit")
    _drain_rate_seen(url)
    length = len(orjson.dumps({"instances": ROW}))
    holders = [_headers_only(url, "/v1/models/clf:predict", length) for _ in range(3)]
    time.sleep(0.1)  # the three are admitted: every slot is held by a body not yet sent
    waiter = connect(url, timeout=5)
    try:
        waiter.sendall(_predict_request(url))
        assert not _answered_within(waiter, 0.4), "answered while every slot was held"
        for sock in holders:  # the held requests complete, and a freed slot goes to the one in line
            sock.sendall(orjson.dumps({"instances": ROW}))
            assert read_response(sock)[0] == 200
        status, head, body = read_response(waiter)
        assert status == 200, (head, body)
        assert orjson.loads(body)["predictions"]
    finally:
        for sock in [*holders, waiter]:
            sock.close()
    assert rejected(url, "in_flight_limit") == refused  # it waited: nobody was refused


def test_waiter_without_a_turn_is_504_and_a_stalled_line_refuses_at_once(waiting_server: Server) -> None:
    url = waiting_server.url
    expired = rejected(url, "deadline")
    refused = rejected(url, "in_flight_limit")
    _drain_rate_seen(url)
    holders = [_headers_only(url, "/v1/models/clf:predict") for _ in range(3)]  # bodies never come
    time.sleep(0.1)
    waiter = connect(url, timeout=10)
    try:
        t0 = time.perf_counter()
        waiter.sendall(_predict_request(url))
        time.sleep(1.2)  # nothing has left for longer than admission_wait_s: the line is stalled
        late = httpx.post(f"{url}/v1/models/clf:predict", json={"instances": ROW}, timeout=5)
        assert late.status_code == 503, late.text
        assert "in flight" in late.json()["error"] and int(late.headers["Retry-After"]) >= 1
        assert late.elapsed.total_seconds() < 0.5  # refused from its headers, not after a wait
        status, head, body = read_response(waiter)
        took = time.perf_counter() - t0
        assert status == 504, (head, body)
        assert "waited 2s for its turn" in orjson.loads(body)["error"]
        assert 1.8 < took < 3.5, took  # its request_timeout_s, not the holders' 4 s read timeout
    finally:
        for sock in [*holders, waiter]:
            sock.close()
    assert rejected(url, "deadline") == expired + 1
    assert rejected(url, "in_flight_limit") == refused + 1
    # the holders' slots free once they are gone (their read fails)
    response = _post_until(url, "/v1/models/clf:predict", {"instances": ROW}, 200, tries=300, pause_s=0.02)
    assert response.status_code == 200, response.text


def test_sigterm_answers_the_requests_waiting_in_line(model_repository: Path) -> None:
    """Waiters are requests in progress: a drain on SIGTERM hands them their turn and answers them."""
    # a queue of 2 that holds its requests 400 ms (Triton's rule), a line of at most 2 behind it
    with running_server(
        model_repository,
        max_batch_size="4",
        max_queue_size="2",
        max_queue_delay_ms="400",
        run_when_idle="false",
        admission_wait_s="5",
    ) as server:
        url = server.url
        _drain_rate_seen(url, seconds=0.1)

        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=15) as client:

                def send() -> asyncio.Task[httpx.Response]:
                    return asyncio.create_task(client.post("/v1/models/clf:predict", json={"instances": ROW}))

                async def queued() -> int:
                    return int((await client.get("/v1/models/clf")).json()["batching"]["queued_requests"])

                # two fill the queue first: requests whose headers all arrive before any body is
                # parsed are admitted by headers alone (the in-flight limit is queue + one batch)
                sent = [send(), send()]
                for _ in range(300):
                    if await queued() == 2:
                        break
                    await asyncio.sleep(0.01)
                assert await queued() == 2
                sent += [send(), send()]  # these find the queue full at the edge: they wait in line
                await asyncio.sleep(0.15)
                server.process.send_signal(signal.SIGTERM)
                return list(await asyncio.gather(*sent))

        answers = asyncio.run(scenario())
        assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
        assert server.terminate() == 0


# ---- a resend on a refused connection waits out its Retry-After (refusal_hold_max_s) ---------------


def _refused_connection(url: str) -> tuple[socket.socket, str]:
    """A connection whose predict request was just refused 503 (fresh connections until one is: the
    server must first have read the slot holders' headers), and the refusal's head."""
    for _ in range(200):
        sock = connect(url, timeout=10)
        sock.sendall(_predict_request(url))
        status, head, _ = read_response(sock)
        if status == 503:
            return sock, head
        sock.close()
        time.sleep(0.01)
    raise AssertionError("no request was refused while every slot was held")


@contextlib.contextmanager
def _slots_held_and_a_refusal(url: str) -> Iterator[tuple[list[socket.socket], socket.socket, str]]:
    """The 3 slots of a `_three_admitted` server held by bodies not yet sent, a connection whose
    request was just refused, and that refusal's head; every socket closed on the way out."""
    holders = [_headers_only(url, "/v1/models/clf:predict") for _ in range(3)]
    sock: socket.socket | None = None
    try:
        sock, head = _refused_connection(url)
        yield holders, sock, head
    finally:
        for opened in [*holders, *([sock] if sock else [])]:
            opened.close()


def _retry_after(head: str) -> int:
    found = re.search(r"(?im)^retry-after: (\d+)\r?$", head)
    assert found, head
    return int(found.group(1))


def test_a_resend_on_a_refused_connection_waits_out_its_retry_after(tight_server: Server) -> None:
    url = tight_server.url
    with _slots_held_and_a_refusal(url) as (holders, sock, head):
        assert not re.search(r"(?im)^connection: close", head), head  # kept for the client
        hold_s = min(_retry_after(head), 4.0)  # the server's refusal_hold_max_s default
        t0 = time.perf_counter()
        # another model on the same connection is not held: answered at once
        reg = orjson.dumps({"instances": [[0.5] * REG_FEATURES]})
        sock.sendall(
            b"POST /v1/models/reg:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(reg)}\r\n\r\n".encode()
            + reg
        )
        assert read_response(sock)[0] == 200 and time.perf_counter() - t0 < 0.5
        sock.sendall(_predict_request(url))  # the refused request, resent at once
        # other connections are not held either: a fresh one is refused at once, as is due
        fresh = httpx.post(f"{url}/v1/models/clf:predict", json={"instances": ROW}, timeout=5)
        assert fresh.status_code == 503 and fresh.elapsed.total_seconds() < 0.5, fresh.text
        for holder in holders:  # the slots free: the resend could be admitted from now on
            holder.close()
        status, head, body = read_response(sock)
        took = time.perf_counter() - t0
        assert status == 200, (head, body)
        assert hold_s - 0.2 < took < hold_s + 2.0, (took, hold_s)  # admitted once its hold was over


def test_with_the_hold_off_a_refusal_closes_the_connection(model_repository: Path) -> None:
    with (
        running_server(
            model_repository,
            max_batch_size="1",
            max_queue_size="2",
            admission_wait_s="0",
            refusal_hold_max_s="0",
        ) as server,
        _slots_held_and_a_refusal(server.url) as (_, sock, head),
    ):
        assert re.search(r"(?im)^connection: close\r?$", head), head
        assert sock.recv(1) == b""  # closed by the server: a resending client must reconnect


def test_sigterm_answers_a_resend_waiting_out_its_hold(model_repository: Path) -> None:
    """A resend waiting out its hold is a request in progress: the drain answers it, then exits 0."""
    with (
        running_server(
            model_repository, max_batch_size="1", max_queue_size="2", admission_wait_s="0"
        ) as server,
        _slots_held_and_a_refusal(server.url) as (holders, sock, _),
    ):
        sock.sendall(_predict_request(server.url))  # resent at once: it waits out the Retry-After
        time.sleep(0.2)
        server.process.send_signal(signal.SIGTERM)
        for holder in holders:  # their requests go (never completed), so slots free
            holder.close()
        status, head, body = read_response(sock)
        assert status == 200, (head, body)  # admitted once its hold was over, and answered
        assert server.terminate() == 0
