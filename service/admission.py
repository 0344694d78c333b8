"""Admission control at the edge: refuse an inference request from its headers, before its body.

Under overload a refusal must be cheap, or refusing costs as much as answering and goodput
collapses (measured: 1,600 → 41 served requests/s once the queue filled, issue 13). So for
`POST /v2/models/{name}[/versions/{v}]/infer` and `POST /v1/models/{name}:predict`, before a
byte of the body is read:

- when the model's batch queue is full, answer 503 with `Retry-After` from the queue's drain rate;
- close the refused connection (`Connection: close`): a client that resends at once must connect
  again, which throttles it in the kernel's accept queue rather than on the event loop (measured
  with wrk, 1,500 connections resending 16-row requests: 63 → 327 served requests/s);
- bound the requests admitted per model — queued, parsing, running or answering — to
  `max_queue_size + max_batch_size` (a full queue plus one batch in the model), so thousands of
  connections cannot each have their body read and parsed only to be refused at the queue.

Everything else (unknown models, bad keys, other routes) passes through to the routes, which give
their usual answers; the refusal is the same `{"error"}` 503 the queue itself gives. It sits
outside the metrics and body-limit middleware (only CORS is outside it) and writes its two ASGI
messages itself, so a refusal costs a header parse and a dict lookup; it is counted in
`hydra_requests_total` / `hydra_request_duration_seconds` under the route's template and in
`hydra_rejected_requests_total` under its reason.
"""

from __future__ import annotations

import hmac
import re
import time
from collections import Counter

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import QueueFull, ServiceError
from service.metrics import ServiceMetrics
from service.repository import ModelRepository
from service.settings import Settings

# (path pattern, the route template metrics label it with)
INFER_ROUTES = (
    (re.compile(r"^/v2/models/([^/]+)/infer$"), "/v2/models/{model_name}/infer"),
    (
        re.compile(r"^/v2/models/([^/]+)/versions/[^/]+/infer$"),
        "/v2/models/{model_name}/versions/{model_version}/infer",
    ),
    (re.compile(r"^/v1/models/([^/:]+):predict$"), "/v1/models/{model_name}:predict"),
)


def _infer_route(path: str) -> tuple[str, str] | None:
    """(model name, route template) for an inference path, else None."""
    if not path.startswith(("/v2/models/", "/v1/models/")):
        return None
    for pattern, template in INFER_ROUTES:
        match = pattern.match(path)
        if match:
            return match.group(1), template
    return None


class AdmissionMiddleware:
    def __init__(
        self, app: ASGIApp, repository: ModelRepository, settings: Settings, metrics: ServiceMetrics
    ) -> None:
        self.app = app
        self.repository = repository
        self.metrics = metrics
        self.limit = settings.max_queue_size + settings.max_batch_size
        self.api_key = settings.api_key.get_secret_value() if settings.api_key else None
        self.admitted: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        route = _infer_route(scope["path"])
        if route is None or not self._authorised(scope):  # the routes answer 404 / 401 as usual
            await self.app(scope, receive, send)
            return
        name, template = route
        t0 = time.perf_counter()
        refusal = self._refusal(name)
        if refusal is not None:
            body = orjson.dumps({"error": refusal.message})
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            headers += [(k.lower().encode(), v.encode()) for k, v in refusal.headers.items()]
            headers.append((b"connection", b"close"))
            await send({"type": "http.response.start", "status": refusal.status_code, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            self.metrics.observe_request(template, "POST", refusal.status_code, time.perf_counter() - t0)
            return
        self.admitted[name] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.admitted[name] -= 1

    def _refusal(self, name: str) -> ServiceError | None:
        try:
            model = self.repository.get(name)
        except ServiceError:
            return None  # not loaded: the route says so
        try:
            model.refuse_if_full()
        except QueueFull as exc:
            return exc
        if self.admitted[name] >= self.limit:
            model.count_refusal("in_flight_limit")
            return QueueFull(
                f"model {name!r} has {self.admitted[name]} requests in flight, its limit "
                f"(max_queue_size + max_batch_size); retry later",
                retry_after_s=model.retry_after_s(),
            )
        return None

    def _authorised(self, scope: Scope) -> bool:
        """Refuse only callers the route would serve; a wrong key still gets its 401 there."""
        if not self.api_key:
            return True
        headers = dict(scope["headers"])
        key = headers.get(b"x-api-key", b"").decode("latin-1")
        if not key:
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            key = token.strip() if scheme.lower() == "bearer" else ""
        return bool(key) and hmac.compare_digest(key.encode(), self.api_key.encode())
