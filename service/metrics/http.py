"""`RequestMetricsMiddleware`: one request count and latency per HTTP request, by route template."""

from __future__ import annotations

import time

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics.buckets import UNMATCHED_ROUTE
from service.metrics.registry import ServiceMetrics


class RequestMetricsMiddleware:
    """Pure ASGI middleware: one `observe_request` per HTTP request, labelled with the route template.

    The template comes from the route that handled the request (FastAPI puts it in `scope["route"]`),
    or, for mounted apps such as /metrics, from matching the app's routes; anything unmatched is
    `UNMATCHED_ROUTE`, so scanning for random paths cannot grow the label set.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        # Routers rewrite scope (root_path, path params) while dispatching; match against the original.
        original_scope = dict(scope)
        status = 500  # if the app dies before starting a response, the server answers 500
        recorded = False

        def record() -> None:
            nonlocal recorded
            if not recorded:
                recorded = True
                self.metrics.observe_request(
                    _route_template(scope, original_scope),
                    scope.get("method", "GET"),
                    status,
                    time.perf_counter() - start,
                )

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record()

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            record()


def _route_template(scope: Scope, original_scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    app = original_scope.get("app", scope.get("app"))
    router = getattr(app, "router", None)
    for candidate in getattr(router, "routes", ()):
        try:
            match, _ = candidate.matches(dict(original_scope))
        except Exception:  # a route that cannot judge this scope is not the one that served it
            continue
        if match == Match.FULL:
            candidate_path = getattr(candidate, "path", None)
            if isinstance(candidate_path, str):
                return candidate_path or "/"
    return UNMATCHED_ROUTE
