"""Admission control at the edge: refuse an inference request from its headers, before its body.

Under overload a refusal must be cheap, or refusing costs as much as answering and goodput
collapses (measured: 1,600 → 41 served requests/s once the queue filled, issue 13). So for
`POST /v2/models/{name}[/versions/{v}]/infer` and `POST /v1/models/{name}:predict`, before a
byte of the body is read (`service.routes.infer.InferenceEdge` asks `Admission.refusal`):

- when the model's batch queue is full, answer 503 with `Retry-After` from the queue's drain rate;
- close the refused connection (`Connection: close`): a client that resends at once must connect
  again, which throttles it in the kernel's accept queue rather than on the event loop (measured
  with wrk, 1,500 connections resending 16-row requests: 63 → 327 served requests/s);
- bound the requests admitted per model — queued, parsing, running or answering — to
  `max_queue_size + max_batch_size` (a full queue plus one batch in the model), so thousands of
  connections cannot each have their body read and parsed only to be refused at the queue.

Unknown models pass (the route answers 404); the refusal is the same `{"error"}` 503 the queue
itself gives, written as two ASGI messages, so it costs a header parse and a dict lookup. Also
here: `infer_route` (which paths are inference routes, and their metrics template) and the API-key
check the edge makes before admitting.
"""

from __future__ import annotations

import hmac
import re
from collections import Counter
from dataclasses import dataclass

import orjson
from starlette.types import Scope, Send

from service.errors import QueueFull, ServiceError
from service.repository import ModelRepository
from service.settings import Settings

# (path pattern, the route template metrics label it with, protocol); groups: model, version
INFER_ROUTES = (
    (re.compile(r"^/v2/models/([^/]+)/infer$"), "/v2/models/{model_name}/infer", "v2"),
    (
        re.compile(r"^/v2/models/([^/]+)/versions/([^/]+)/infer$"),
        "/v2/models/{model_name}/versions/{model_version}/infer",
        "v2",
    ),
    (re.compile(r"^/v1/models/([^/:]+):predict$"), "/v1/models/{model_name}:predict", "v1"),
)


@dataclass(frozen=True)
class InferRoute:
    """An inference path, taken apart: the model (and version) it names and its route template."""

    model_name: str
    model_version: str | None
    template: str
    protocol: str  # "v1" or "v2"


def infer_route(path: str) -> InferRoute | None:
    """The inference route `path` names, else None (the same matches as the routes' templates)."""
    if not path.startswith(("/v2/models/", "/v1/models/")):
        return None
    for pattern, template, protocol in INFER_ROUTES:
        match = pattern.match(path)
        if match:
            version = match.group(2) if pattern.groups > 1 else None
            return InferRoute(match.group(1), version, template, protocol)
    return None


class Admission:
    """Whether a named model takes one more inference request now; counts the ones it admits."""

    def __init__(self, repository: ModelRepository, settings: Settings) -> None:
        self.repository = repository
        self.limit = settings.max_queue_size + settings.max_batch_size
        self.admitted: Counter[str] = Counter()

    def refusal(self, name: str) -> ServiceError | None:
        """The 503 to answer instead of admitting a request for `name` (counted), else None."""
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


def refusal_headers(refusal: ServiceError, body_length: int) -> list[tuple[bytes, bytes]]:
    """A refusal's response headers; `Connection: close` makes a client that resends at once connect
    again, which throttles it in the kernel's accept queue rather than on the event loop."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(body_length).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in refusal.headers.items()]
    headers.append((b"connection", b"close"))
    return headers


def key_presented_ok(scope: Scope, api_key: str | None) -> bool:
    """True when no key is configured or the request's `X-API-Key` / `Authorization: Bearer` is it."""
    if not api_key:
        return True
    headers = dict(scope["headers"])
    key = headers.get(b"x-api-key", b"").decode("latin-1")
    if not key:
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else ""
    return bool(key) and hmac.compare_digest(key.encode(), api_key.encode())


async def send_refusal(send: Send, refusal: ServiceError) -> None:
    body = orjson.dumps({"error": refusal.message})
    headers = refusal_headers(refusal, len(body))
    await send({"type": "http.response.start", "status": refusal.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
