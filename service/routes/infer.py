"""The inference routes' lean path: `POST /v2/models/{m}[/versions/{v}]/infer` and
`POST /v1/models/{m}:predict` served as plain ASGI, in front of FastAPI's own stack.

A one-row request spends most of its server time in the web framework, not in the model: measured
on the 2-core box (wrk, 32 connections, one-row V2 JSON), FastAPI's middleware, route matching and
dependency solving were ~40 % of the event loop's time, and a FastAPI route that does nothing but
parse the body reaches only ~30 % of what a bare ASGI app on the same uvicorn does (issue 13). So
`InferenceEdge`, the outermost middleware but CORS, takes these three routes itself:

    Content-Length over max_request_bytes → 413 (the body is not read)
    API key missing or wrong → 401
    the model's queue full, or too many requests in flight → wait for a turn while the drain rate
        says it comes within admission_wait_s, else 503 + Retry-After (`service.admission`); a
        resend on that connection before the Retry-After waits it out first
    else: read the body (byte limit, read deadline) → V2 (`routes.v2.serve_infer`) or V1
          (`routes.v1.serve_predict`) → the answer bytes, written as two ASGI messages

Every other request goes on to FastAPI unchanged. The FastAPI declarations of these routes stay, so
the OpenAPI document describes them, and run the same handlers when reached without the edge.
Errors are the service's `{"error": ...}` JSON with the status of `service.errors`; each request is
counted in `hydra_requests_total` / `hydra_request_duration_seconds` under its route template.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import orjson
from prometheus_client import Counter, Histogram
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.admission import Admission, InferRoute, infer_route, key_presented_ok, send_refusal
from service.body_limit import declared_too_large, read_body
from service.errors import ClientDisconnected, ServiceError, Unauthorized
from service.metrics import ServiceMetrics
from service.repository import ModelRepository
from service.settings import Settings

logger = logging.getLogger("service.routes")

T = TypeVar("T")


@dataclass(slots=True)
class Answered:
    """A handler's successful answer: body bytes, media type, extra headers (lower-case names)."""

    body: bytes
    media_type: str
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


class InferCall:
    """One inference request as its handler sees it: headers, the body (limited), the settings and
    repository, and `answer()`, which awaits the model against a client disconnect."""

    __slots__ = ("receive", "repository", "scope", "settings")

    def __init__(
        self, scope: Scope, receive: Receive, settings: Settings, repository: ModelRepository
    ) -> None:
        self.scope = scope
        self.receive = receive
        self.settings = settings
        self.repository = repository

    def header(self, name: bytes) -> str | None:
        """The first value of header `name` (lower-case bytes), decoded as latin-1."""
        for key, value in self.scope["headers"]:
            if key == name:
                return str(value.decode("latin-1"))
        return None

    async def body(self) -> bytes:
        return await read_body(
            self.receive, self.settings.max_request_bytes, self.settings.request_read_timeout_s
        )

    async def answer(self, work: asyncio.Future[T]) -> T:
        """Await `work` (rows already queued), cancelling it if the client disconnects first — its
        queued rows are then skipped. Call only after the body has been read: the next ASGI
        `receive()` then returns only when the client disconnects (or the response is complete)."""
        watcher = asyncio.ensure_future(self._disconnect())
        gone = False

        def on_disconnect(done: asyncio.Future[None]) -> None:
            nonlocal gone
            if not done.cancelled() and not work.done():
                gone = True
                work.cancel()

        watcher.add_done_callback(on_disconnect)
        try:
            return await work
        except asyncio.CancelledError:
            if gone:
                raise ClientDisconnected("client disconnected before the answer was ready") from None
            raise  # this handler itself was cancelled: `work` was cancelled with it
        finally:
            watcher.remove_done_callback(on_disconnect)
            watcher.cancel()

    async def _disconnect(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass


Handler = Callable[[InferCall, InferRoute], Awaitable[Answered]]


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


async def send_answer(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: ServiceError) -> int:
    body = error_body(error.message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send_answer(send, error.status_code, body, headers)
    return error.status_code


class InferenceEdge:
    """Pure ASGI middleware: serves the inference routes itself (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        repository: ModelRepository,
        settings: Settings,
        metrics: ServiceMetrics,
        handlers: dict[str, Handler],
    ) -> None:
        self.app = app
        self.repository = repository
        self.settings = settings
        self.metrics = metrics
        self.handlers = handlers  # protocol ("v1", "v2") → handler
        self.admission = Admission(repository, settings)
        self.api_key = settings.api_key.get_secret_value() if settings.api_key else None
        self._series: dict[tuple[str, int], tuple[Counter, Histogram]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        route = infer_route(scope["path"])
        if route is None:
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500
        try:
            status = await self._serve(route, scope, receive, send)
        finally:
            self._observe(route.template, status, time.perf_counter() - t0)

    def _observe(self, template: str, status: int, seconds: float) -> None:
        """`ServiceMetrics.observe_request`, with the series of each (route, status) looked up once
        (these series are never removed)."""
        series = self._series.get((template, status))
        if series is None:
            labels = ("http", template, "POST")
            series = self._series[(template, status)] = (
                self.metrics.requests.labels(*labels, str(status)),
                self.metrics.request_duration.labels(*labels),
            )
        count, duration = series
        count.inc()
        duration.observe(seconds)

    async def _serve(self, route: InferRoute, scope: Scope, receive: Receive, send: Send) -> int:
        too_large = declared_too_large(scope, self.settings.max_request_bytes)
        if too_large is not None:
            return await send_error(send, too_large)
        if not key_presented_ok(scope, self.api_key):
            return await send_error(send, Unauthorized())
        name = route.model_name
        client = scope.get("client")  # (host, port): this TCP connection's, while it is open
        connection = client if client is None or isinstance(client, tuple) else tuple(client)
        refusal = await self.admission.admit(name, connection)
        if refusal is not None:
            # kept only where a resend on it can be held (else it would be refused at once, again)
            keep_alive = connection is not None and self.settings.refusal_hold_max_s > 0
            await send_refusal(send, refusal, keep_alive)
            return refusal.status_code
        try:
            call = InferCall(scope, receive, self.settings, self.repository)
            try:
                answered = await self.handlers[route.protocol](call, route)
            except ServiceError as exc:
                if exc.status_code >= 500:
                    logger.warning("%s: %s", type(exc).__name__, exc.message)
                return await send_error(send, exc)
            except Exception as exc:  # a bug, not the client's doing: logged, answered 500, server stays up
                logger.exception("unhandled error", exc_info=exc)
                return await send_error(send, ServiceError(f"internal server error ({type(exc).__name__})"))
            headers = [
                (b"content-type", answered.media_type.encode()),
                (b"content-length", str(len(answered.body)).encode()),
                *answered.headers,
            ]
            await send_answer(send, 200, answered.body, headers)
            return 200
        finally:
            self.admission.leave(name)


def fastapi_response(answered: Answered) -> Response:
    """The same answer as a Starlette response (for the FastAPI declarations of these routes)."""
    return Response(
        answered.body,
        media_type=answered.media_type,
        headers={k.decode(): v.decode() for k, v in answered.headers},
    )
