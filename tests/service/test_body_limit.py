"""service/body_limit.py: a body over the limit is refused (413) before it is read or buffered, a
body that does not arrive in time is 408, and bodies within both limits pass through untouched."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI, Request

from service.body_limit import BodySizeLimitMiddleware
from service.errors import install_error_handlers

pytestmark = pytest.mark.anyio
LIMIT = 1000


def _app(read_timeout_s: float = 5.0) -> tuple[FastAPI, list[int]]:
    """An echo route behind the middleware; `reads` records every body chunk the route saw."""
    app = FastAPI()
    install_error_handlers(app)
    reads: list[int] = []

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        size = 0
        async for chunk in request.stream():
            reads.append(len(chunk))
            size += len(chunk)
        return {"bytes": size}

    app.add_middleware(BodySizeLimitMiddleware, max_bytes=LIMIT, read_timeout_s=read_timeout_s)
    return app, reads


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def _chunks(sizes: list[int], pause_s: float = 0.0) -> AsyncIterator[bytes]:
    for size in sizes:
        yield b"x" * size
        if pause_s:
            await asyncio.sleep(pause_s)  # a slow client between chunks


async def test_bodies_within_the_limit_pass_whole() -> None:
    app, _ = _app()
    async with _client(app) as client:
        assert (await client.post("/echo", content=b"x" * LIMIT)).json() == {"bytes": LIMIT}
        assert (await client.post("/echo", content=_chunks([400, 400, 200]))).json() == {"bytes": LIMIT}
        assert (await client.post("/echo")).json() == {"bytes": 0}
        assert (await client.get("/echo")).status_code == 405  # other methods untouched


async def test_a_declared_length_over_the_limit_is_413_without_reading_the_body() -> None:
    app, reads = _app()
    async with _client(app) as client:
        response = await client.post("/echo", content=b"x" * (LIMIT + 1))
    assert response.status_code == 413
    assert response.json() == {
        "error": f"request body of {LIMIT + 1} bytes exceeds max_request_bytes={LIMIT}"
    }
    assert reads == []  # the route never ran


async def test_a_streamed_body_is_refused_as_soon_as_it_passes_the_limit() -> None:
    app, reads = _app()
    async with _client(app) as client:  # chunked: no Content-Length to refuse up front
        response = await client.post("/echo", content=_chunks([600, 600, 600, 600]))
    assert response.status_code == 413
    assert response.json() == {"error": f"request body exceeds max_request_bytes={LIMIT}"}
    assert sum(reads) <= LIMIT  # the chunk that crossed the limit was never handed to the route


async def test_a_body_that_does_not_arrive_within_the_read_timeout_is_408() -> None:
    app, reads = _app(read_timeout_s=0.2)
    async with _client(app) as client:
        slow = await client.post("/echo", content=_chunks([10, 10, 10], pause_s=0.5))
        assert slow.status_code == 408
        assert slow.json() == {"error": "request body not received within request_read_timeout_s=0.2"}
        assert reads == [10]
        # the deadline is per request, from its headers: a prompt body right after is served
        assert (await client.post("/echo", content=b"x" * 10)).json() == {"bytes": 10}


async def test_a_malformed_content_length_is_left_to_the_server() -> None:
    app, _ = _app()
    async with _client(app) as client:
        response = await client.post("/echo", content=b"x" * 10, headers={"content-length": "ten"})
    # not refused up front; the streamed count still bounds what the route reads
    assert response.status_code == 200 and response.json() == {"bytes": 10}
