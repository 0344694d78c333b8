"""Pure ASGI middleware: refuse request bodies over `max_bytes` before anything parses them.

A declared `Content-Length` over the limit is answered 413 at once, without reading the body; a
chunked body is counted while it streams and the read fails with PayloadTooLarge (→ 413) as soon as
it passes the limit, so an oversized body is never buffered whole.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLarge, error_response


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

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

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"request body exceeds max_request_bytes={limit}")
            return message

        await self.app(scope, limited_receive, send)
