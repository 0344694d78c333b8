"""Pure ASGI middleware: refuse request bodies over `max_bytes` before anything parses them.

A declared `Content-Length` over the limit is answered 413 at once, without reading the body; a
chunked body is counted while it streams and the read fails with PayloadTooLarge (→ 413) as soon as
it passes the limit, so an oversized body is never buffered whole.

The body must also arrive within `read_timeout_s` of the headers, else the read fails with
RequestTimeout (→ 408): uvicorn has no body timeout of its own, so without this a client that
trickles its body would hold a connection and a handler for as long as it likes.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLarge, RequestTimeout, error_response


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
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > limit:
                    response = error_response(
                        413, f"request body of {declared} bytes exceeds max_request_bytes={limit}"
                    )
                    await response(scope, receive, send)
                    return
                break
        received = 0
        body_complete = False
        deadline = asyncio.get_running_loop().time() + self.read_timeout_s

        async def limited_receive() -> Message:
            nonlocal received, body_complete
            if body_complete:  # later receives wait for a disconnect: no deadline on those
                return await receive()
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(remaining, 0.0))
            except TimeoutError:
                raise RequestTimeout(
                    f"request body not received within request_read_timeout_s={self.read_timeout_s:g}"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"request body exceeds max_request_bytes={limit}")
                body_complete = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)
