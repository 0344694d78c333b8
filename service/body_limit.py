"""Request bodies under a byte limit and a read deadline: `read_body` (the inference routes' lean
path, `service.routes.infer`) and `BodySizeLimitMiddleware` (every other route).

A declared `Content-Length` over the limit is answered 413 at once, without reading the body; a
chunked body is counted while it streams and the read fails with PayloadTooLarge (→ 413) as soon as
it passes the limit, so an oversized body is never buffered whole.

The body must also arrive within `read_timeout_s` of the headers, else the read fails with
RequestTimeout (→ 408): uvicorn has no body timeout of its own, so without this a client that
trickles its body would hold a connection and a handler for as long as it likes. One deadline
(`asyncio.timeout`) covers the whole body, not a timer per chunk.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ClientDisconnected, PayloadTooLarge, RequestTimeout, error_response


def declared_too_large(scope: Scope, limit: int) -> PayloadTooLarge | None:
    """The 413 for a declared `Content-Length` over `limit`, else None."""
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                return None
            if declared > limit:
                return PayloadTooLarge(f"request body of {declared} bytes exceeds max_request_bytes={limit}")
            return None
    return None


def _timed_out(read_timeout_s: float) -> RequestTimeout:
    return RequestTimeout(f"request body not received within request_read_timeout_s={read_timeout_s:g}")


async def read_body(receive: Receive, limit: int, read_timeout_s: float) -> bytes:
    """The whole request body (the declared length already checked), or PayloadTooLarge /
    RequestTimeout / ClientDisconnected."""
    chunks: list[bytes] = []
    received = 0
    try:
        async with asyncio.timeout(read_timeout_s):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    raise ClientDisconnected("client disconnected while sending its request body")
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > limit:
                    raise PayloadTooLarge(f"request body exceeds max_request_bytes={limit}")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise _timed_out(read_timeout_s) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        too_large = declared_too_large(scope, limit)
        if too_large is not None:
            await error_response(413, too_large.message)(scope, receive, send)
            return
        received = 0
        body_complete = False
        deadline = asyncio.get_running_loop().time() + self.read_timeout_s

        async def limited_receive() -> Message:
            nonlocal received, body_complete
            if body_complete:  # later receives wait for a disconnect: no deadline on those
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise _timed_out(self.read_timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"request body exceeds max_request_bytes={limit}")
                body_complete = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)
