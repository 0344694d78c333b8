"""Admission control at the edge: an inference request is admitted, waits for its turn, or is
refused — from its headers, before its body is read.

Under overload a refusal must be cheap, or refusing costs as much as answering and goodput
collapses (measured: 1,600 → 41 served requests/s once the queue filled, issue 13). So for
`POST /v2/models/{name}[/versions/{v}]/infer` and `POST /v1/models/{name}:predict`, before a
byte of the body is read (`service.routes.infer.InferenceEdge` awaits `Admission.admit`, and
calls `Admission.leave` once the request is answered):

- bound the requests admitted per model — queued, parsing, running or answering — to
  `max_queue_size + max_batch_size` (a full queue plus one batch in the model), so thousands of
  connections cannot each have their body read and parsed only to be refused at the queue;
- a request that finds the model's queue full or that limit reached **waits in line** (FIFO, its
  body unread, its connection kept) when the model's drain rate says its turn comes within
  `admission_wait_s`; a slot that frees goes to the first in line, and only when the
  queue will still have room once that request is parsed. Resending clients then wait instead of
  being refused and reconnecting, which cost the event loop ~0.5 ms each and took goodput to
  27-78 % of capacity (docs/RELIABILITY.md, "Goodput"). A waiter still without a turn at
  `request_timeout_s` is answered 504; the line holds at most `max_queue_size` requests;
- otherwise (the wait would be longer, nothing has left for `admission_wait_s`, or
  `admission_wait_s` is 0: Triton's rule) answer 503 at once, with `Retry-After` from the queue's
  drain rate, and keep the connection;
- a request for that model that comes back on that connection before the Retry-After has passed
  (at most `refusal_hold_max_s`) waits until it has, then is admitted, lined up or refused as any
  (`ResendHolds`). A client that resends at once then costs one refusal per Retry-After, not one
  per turn of the event loop. Closing the connection instead (`refusal_hold_max_s` 0: `Connection:
  close`) sent every such client through the one FIFO accept queue again: at 3,000 resending
  connections on the 2-core box, 1,700-2,800 refusals/s, 0.5-0.85 s for a fresh connection's own
  refusal and goodput 23-29 % of capacity (docs/RELIABILITY.md, "Goodput").

Unknown models pass (the route answers 404); the refusal is the same `{"error"}` 503 the queue
itself gives, written as two ASGI messages, so it costs a header parse and a dict lookup. Also
here: `infer_route` (which paths are inference routes, and their metrics template) and the API-key
check the edge makes before admitting.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import math
import re
import time
from collections import Counter, deque
from dataclasses import dataclass

import orjson
from starlette.types import Scope, Send

from service.errors import DeadlineExceeded, QueueFull, ServiceError
from service.repository import ModelRepository
from service.served_model import ServedModel
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


class _Line:
    """One model's requests waiting at the edge for a slot, in arrival order."""

    __slots__ = ("last_release", "waiters", "waiting")

    def __init__(self) -> None:
        self.waiters: deque[asyncio.Future[ServiceError | None]] = deque()
        self.waiting = 0  # waiters not yet settled (admitted, timed out or cancelled)
        self.last_release = -math.inf  # when an admitted request last left

    def predicted_wait_s(self, model: ServedModel, now: float, horizon_s: float) -> float:
        """Seconds until one more waiter's turn: the model's time for the requests ahead of it, at
        its compute speed — not at the rate requests leave now, which falls when the event loop is
        busy and would turn a slow moment into refusals, reconnects and a slower loop (measured:
        a refusal storm that held goodput at 20-35 %). Infinite when nothing has left for
        `horizon_s`: the admitted requests are stuck (e.g. on slow bodies), not slow."""
        if now - self.last_release > horizon_s:
            return math.inf
        return model.seconds_for(self.waiting + 1)


class ResendHolds:
    """Connections refused (503) recently, per model, and when their Retry-After ends.

    Keyed by the ASGI scope's `client` (address, port): one TCP connection while it is open, so a
    proxy's other connections, and other models on this one, are not held. Entries go when used
    or, once past, as new ones come (at most `MAX_ENTRIES`, oldest first)."""

    MAX_ENTRIES = 65_536

    def __init__(self, max_hold_s: float) -> None:
        self.max_hold_s = max_hold_s
        self._until: dict[tuple[object, str], float] = {}

    def remaining_s(self, connection: object, name: str, now: float) -> float:
        """Seconds until this connection's hold on `name` ends (0: none); the hold is used up."""
        if not self._until:  # no refusal held: every request of a server not overloaded
            return 0.0
        until = self._until.pop((connection, name), None)
        return max(0.0, until - now) if until is not None else 0.0

    def refused(self, connection: object, name: str, retry_after_s: int, now: float) -> None:
        if self.max_hold_s <= 0 or connection is None:
            return
        until = self._until
        for key, end in list(itertools.islice(until.items(), 8)):  # prune the oldest few
            if end > now and len(until) < self.MAX_ENTRIES:
                break
            del until[key]
        until[(connection, name)] = now + min(float(retry_after_s), self.max_hold_s)


class Admission:
    """Whether a named model takes one more inference request now, waits it in line, or refuses
    it; counts the ones it admits (`admit` … `leave`)."""

    def __init__(self, repository: ModelRepository, settings: Settings) -> None:
        self.repository = repository
        self.limit = settings.max_queue_size + settings.max_batch_size
        self.wait_s = settings.admission_wait_s
        self.timeout_s = settings.request_timeout_s
        self.max_waiting = settings.max_queue_size  # the line's own bound: its memory is bounded too
        self.admitted: Counter[str] = Counter()
        self._lines: dict[str, _Line] = {}
        self.holds = ResendHolds(settings.refusal_hold_max_s)

    async def admit(self, name: str, connection: object = None) -> ServiceError | None:
        """Admit one request for `name` (counted: call `leave` when it is answered), or the refusal
        to answer instead (counted by reason). Waits in line, or out the Retry-After of a refusal
        on the same `connection` (the scope's `client`), as the module docstring says."""
        held_s = self.holds.remaining_s(connection, name, time.monotonic())
        if held_s > 0:
            await asyncio.sleep(held_s)
        refusal = await self._admit(name)
        if isinstance(refusal, QueueFull):
            self.holds.refused(connection, name, refusal.retry_after_s, time.monotonic())
        return refusal

    async def _admit(self, name: str) -> ServiceError | None:
        try:
            model = self.repository.get(name)
        except ServiceError:
            self.admitted[name] += 1  # not loaded: the route says so
            return None
        line = self._lines.get(name)
        admitted = self.admitted[name]
        if model.queue_full:
            reason = "queue_full"
        elif admitted >= self.limit:
            reason = "in_flight_limit"
        elif line is None or not line.waiting:
            self.admitted[name] = admitted + 1
            return None
        else:  # room now, but others wait for it: this one goes behind them (or, too long, away)
            reason = "queue_full"
        if line is None:
            line = self._lines[name] = _Line()
        wait_s = line.predicted_wait_s(model, time.monotonic(), self.wait_s)
        if line.waiting < self.max_waiting and wait_s <= self.wait_s:
            return await self._wait_turn(name, line)
        model.count_refusal(reason)
        if reason == "queue_full":
            return model.queue_full_error()
        return QueueFull(
            f"model {name!r} has {admitted} requests in flight, its limit "
            f"(max_queue_size + max_batch_size); retry later",
            retry_after_s=model.retry_after_s(),
        )

    async def _wait_turn(self, name: str, line: _Line) -> ServiceError | None:
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[ServiceError | None] = loop.create_future()
        line.waiters.append(turn)
        line.waiting += 1
        timer = loop.call_later(self.timeout_s, self._expire, name, line, turn)
        try:
            return await turn
        except asyncio.CancelledError:  # this request's task is cancelled (server stopping)
            if turn.cancelled():
                line.waiting -= 1  # still waiting: it leaves the line (skipped when reached)
            elif turn.result() is None:
                self.leave(name)  # its turn had come: hand the slot on
            raise
        finally:
            timer.cancel()

    def _expire(self, name: str, line: _Line, turn: asyncio.Future[ServiceError | None]) -> None:
        if turn.done():
            return
        line.waiting -= 1
        with contextlib.suppress(ServiceError):
            self.repository.get(name).count_refusal("deadline")
        turn.set_result(
            DeadlineExceeded(f"request waited {self.timeout_s:g}s for its turn at model {name!r}")
        )

    def leave(self, name: str) -> None:
        """An admitted request of `name` is answered: its slot goes to the first in line that can
        take it without finding the queue full after its body is parsed."""
        admitted = self.admitted[name] - 1
        if admitted:
            self.admitted[name] = admitted
        else:  # a name not in flight holds no entry (requests may name any model)
            del self.admitted[name]
        line = self._lines.get(name)
        model: ServedModel | None = None
        if line is None:
            try:
                model = self.repository.get(name)
            except ServiceError:
                return  # not loaded: no line is kept for it
            line = self._lines[name] = _Line()
        line.last_release = time.monotonic()
        if not line.waiting:
            return
        if model is None:  # unloaded meanwhile (stays None): let them all through, the route says so
            with contextlib.suppress(ServiceError):
                model = self.repository.get(name)
        waiters = line.waiters
        while waiters and (model is None or (admitted < self.limit and model.has_room(admitted))):
            turn = waiters.popleft()
            if turn.done():  # timed out or cancelled
                continue
            admitted += 1
            line.waiting -= 1
            turn.set_result(None)
        if admitted:
            self.admitted[name] = admitted


def refusal_headers(refusal: ServiceError, body_length: int, keep_alive: bool) -> list[tuple[bytes, bytes]]:
    """A refusal's response headers; without `keep_alive`, `Connection: close` makes a client that
    resends at once connect again, which throttles it in the kernel's accept queue."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(body_length).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in refusal.headers.items()]
    if not keep_alive:
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


async def send_refusal(send: Send, refusal: ServiceError, keep_alive: bool) -> None:
    body = orjson.dumps({"error": refusal.message})
    headers = refusal_headers(refusal, len(body), keep_alive)
    await send({"type": "http.response.start", "status": refusal.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
