"""The Open Inference Protocol over gRPC (grpc.aio), in the HTTP server's process and event loop.

It shares the model repository, the batchers and the metrics with HTTP, and the V2 semantics too:
requests decode to the same `InferRequest` (`codec`) and go through `service.v2_core`, the code the
HTTP route runs. Six RPCs of `inference.GRPCInferenceService` plus the standard `grpc.health.v1`
health service.

Errors are gRPC status codes with the service's own message: bad tensors or parameters
INVALID_ARGUMENT, unknown model or version NOT_FOUND, model not ready or queue full UNAVAILABLE (queue
full also sends `retry-after` trailing metadata), the request's deadline DEADLINE_EXCEEDED, a missing
API key UNAUTHENTICATED, an oversized message RESOURCE_EXHAUSTED (grpc itself), and INTERNAL only
for a server fault (the model failed). Request bytes are parsed here rather than by grpc, so
undecodable bytes are INVALID_ARGUMENT, not grpc's INTERNAL "Exception deserializing request!".

Deadlines: the client's gRPC deadline bounds the time the rows may wait in the batch queue (with
the `timeout` parameter, whichever is earlier); a call cancelled or past its deadline skips its rows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import orjson
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service import v2_core
from service.auth import key_matches
from service.errors import BadRequest, ModelUnavailable, QueueFull, ServiceError, Unauthorized
from service.metrics import ServiceMetrics
from service.oip_grpc import codec
from service.oip_grpc.third_party import grpc_predict_v2_pb2 as pb
from service.protocol.v2 import NUMERIC_DATATYPES, V2ProtocolError
from service.repository import ModelRepository
from service.settings import Settings

logger = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
# Answers are at most max_request_rows rows of the model's outputs; 64 MiB covers the largest we ship
# with a wide margin (tritonclient itself accepts up to 2 GiB).
MAX_SEND_BYTES = 64 * 1024 * 1024
# gRPC has no extension mechanism of its own; the HTTP ones (binary tensor data, model repository)
# are HTTP features, not served here.
EXTENSIONS: list[str] = []

# The HTTP status each gRPC code corresponds to (google.rpc.Code's documented mapping), for the
# `code` label of hydra_requests_total: the 4xx/5xx alert rules then cover both protocols.
HTTP_EQUIVALENT: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

# ServiceError HTTP status → gRPC code.
_CODE_OF_STATUS: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code_for(error: ServiceError) -> grpc.StatusCode:
    return _CODE_OF_STATUS.get(error.status_code, grpc.StatusCode.INTERNAL)


Handler = Callable[[Any, Any], Awaitable[Message]]

# The connections stay open until this long after the last answer before the server closes them.
# Closed at once, a client still reading its last answers (and sending the flow-control updates it
# owes) meets a TCP reset and loses answers already sent: the HTTP/2 shutdown race of
# grpc/grpc-go#1738, seen here as UNAVAILABLE "Connection reset by peer" on 1 of 30 drained calls,
# on a loaded CI box. A server whose last answer is older than this (or that answered none) closes
# at once: every SIGTERM used to wait the full 0.5 s.
DRAIN_LINGER_S = 0.5


class CallsInFlight:
    """The calls being handled. Once `drain` has begun, new calls are refused (UNAVAILABLE) and
    `drain` returns when the last call in flight has been answered, or at its timeout."""

    def __init__(self) -> None:
        self.count = 0
        self.draining = False
        self.last_answered: float | None = None  # time.monotonic() of the last call that left
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> bool:
        if self.draining:
            return False
        self.count += 1
        self._idle.clear()
        return True

    def leave(self) -> None:
        self.count -= 1
        self.last_answered = time.monotonic()
        if self.count == 0:
            self._idle.set()

    def linger_s(self, window_s: float) -> float:
        """How much of `window_s` after the last answer is still to run: a client reads its last
        answers within that window, so past it (or with no call ever answered) there is nothing to
        wait for, and a server without recent gRPC calls stops at once."""
        if self.last_answered is None:
            return 0.0
        return max(0.0, window_s - (time.monotonic() - self.last_answered))

    async def drain(self, timeout_s: float) -> bool:
        """True when every call in flight was answered within `timeout_s`."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


class InferenceService:
    """The six RPCs. Each takes the decoded request and the grpc.aio context."""

    def __init__(self, repository: ModelRepository, settings: Settings) -> None:
        self.repository = repository
        self.settings = settings

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        ready, _ = v2_core.server_readiness(self.repository)
        return pb.ServerReadyResponse(ready=ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        model = v2_core.served(self.repository, request.name, request.version)
        return pb.ModelReadyResponse(ready=model.ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=v2_core.SERVER_NAME, version=v2_core.server_version(), extensions=EXTENSIONS
        )

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        model = v2_core.served(self.repository, request.name, request.version)
        manifest = model.manifest
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=v2_core.model_versions(self.repository, model),
            platform=v2_core.PLATFORM,
            inputs=[tensor(name=manifest.input.name, datatype="FP32", shape=list(manifest.input.shape))],
            outputs=[tensor(name=n, datatype=d, shape=s) for n, d, s in model.output_specs()],
            properties={
                key: value if isinstance(value, str) else orjson.dumps(value).decode()
                for key, value in v2_core.model_parameters(model).items()
            },
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        key = self.settings.api_key
        if key is not None and not key_matches(dict(context.invocation_metadata()), key.get_secret_value()):
            raise Unauthorized()
        model = v2_core.ready_to_infer(self.repository, request.model_name, request.model_version)
        try:
            parsed, sent_raw = codec.decode_infer_request(request, NUMERIC_DATATYPES)
        except V2ProtocolError as exc:
            raise BadRequest(str(exc)) from None
        prepared = v2_core.prepare_infer(model, parsed)
        remaining = context.time_remaining()
        # awaited in this task: a cancelled call (client gone, deadline) cancels it and skips the rows
        results = await prepared.submit(deadline_s=remaining)
        outputs = prepared.outputs(results)
        return codec.encode_infer_response(
            model_name=model.name,
            model_version=str(model.version),
            request_id=parsed.id,
            outputs=outputs,
            raw=codec.answer_raw(sent_raw, outputs),
        )


_METHODS: dict[str, tuple[type[Message], type[Message]]] = {
    "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
    "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
    "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
    "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
}


def _unary(
    name: str, handler: Handler, request_type: type[Message], metrics: ServiceMetrics, calls: CallsInFlight
) -> Any:
    route = f"/{SERVICE}/{name}"

    async def call(payload: bytes, context: Any) -> bytes:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        entered = calls.enter()
        try:
            if not entered:
                raise ModelUnavailable("the server is shutting down")
            try:
                request = request_type.FromString(payload)
            except DecodeError as exc:
                raise BadRequest(
                    f"request is not a valid {request_type.DESCRIPTOR.name} message ({exc})"
                ) from None
            response = await handler(request, context)
            serialized: bytes = response.SerializeToString()
            return serialized
        except ServiceError as exc:
            code = status_code_for(exc)
            if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE):
                logger.warning("%s %s: %s", route, type(exc).__name__, exc.message)
            trailing = (("retry-after", exc.headers["Retry-After"]),) if isinstance(exc, QueueFull) else ()
            await context.abort(code, exc.message, trailing_metadata=trailing)
            raise  # not reached: abort raises
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            code = grpc.StatusCode.INTERNAL
            logger.exception("%s: unhandled error", route, exc_info=exc)
            await context.abort(code, f"internal server error ({type(exc).__name__})")
            raise  # not reached
        finally:
            if entered:
                calls.leave()
            metrics.observe_request(route, "POST", HTTP_EQUIVALENT[code], time.perf_counter() - start, "grpc")

    # no (de)serializers: bytes in and out, so undecodable requests are ours to answer
    return grpc.unary_unary_rpc_method_handler(call)


def inference_handler(service: InferenceService, metrics: ServiceMetrics, calls: CallsInFlight) -> Any:
    handlers = {
        name: _unary(name, getattr(service, name), request_type, metrics, calls)
        for name, (request_type, _) in _METHODS.items()
    }
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


class ReadinessHealth(health.aio.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1 with live answers to Check: "" and the inference service are SERVING when the
    server is ready (every model it is meant to serve is), a model's name when that model is;
    NOT_SERVING once shutdown begins. Watch follows what `set` publishes (start, shutdown)."""

    def __init__(self, repository: ModelRepository) -> None:
        super().__init__()
        self._repository = repository
        self._stopping = False

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> health_pb2.HealthCheckResponse:
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        if request.service in ("", SERVICE):
            ready, _ = v2_core.server_readiness(self._repository)
        else:
            ready_by_model = {m.name: m.ready for m in self._repository.models()}
            if request.service not in ready_by_model:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
            ready = ready_by_model[request.service]
        return health_pb2.HealthCheckResponse(status=serving if ready and not self._stopping else not_serving)

    async def begin_shutdown(self) -> None:
        self._stopping = True
        await self.enter_graceful_shutdown()


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcServer:
    """Start after the repository (models warm), stop before it: `await start()`, `await stop()`.

    `stop()` is idempotent and may be begun early (SIGTERM, in parallel with HTTP's drain): new calls
    are refused at once (UNAVAILABLE), calls in flight get `shutdown_timeout_s` to finish, and the
    connections close `DRAIN_LINGER_S` after the last answer.
    """

    def __init__(
        self,
        settings: Settings,
        repository: ModelRepository,
        metrics: ServiceMetrics,
        *,
        share_port: bool = False,
    ) -> None:
        self.settings = settings
        self.share_port = share_port  # one of several workers on this port (SO_REUSEPORT)
        self.repository = repository
        self.metrics = metrics
        self.port: int | None = None
        self._server: Any = None
        self._health = ReadinessHealth(repository)
        self._stopping: asyncio.Task[None] | None = None
        self._calls = CallsInFlight()

    async def start(self) -> int:
        options = [
            ("grpc.max_receive_message_length", self.settings.max_request_bytes),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            # grpc enables SO_REUSEPORT by default: a second server on the same port would then start
            # silently and take half the calls. Off, so a port in use fails the start; on only for
            # the workers of one server, which share the port the supervisor reserved.
            ("grpc.so_reuseport", 1 if self.share_port else 0),
        ]
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers(
            (inference_handler(InferenceService(self.repository, self.settings), self.metrics, self._calls),)
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        address = _address(self.settings.host, self.settings.grpc_port)
        try:
            port = int(server.add_insecure_port(address))
        except RuntimeError as exc:
            raise RuntimeError(f"cannot listen for gRPC on {address} ({exc})") from exc
        if port == 0:
            raise RuntimeError(f"cannot listen for gRPC on {address} (port in use?)")
        await server.start()
        await self._health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self._server, self.port = server, port
        logger.info("gRPC (Open Inference Protocol) listening on %s", _address(self.settings.host, port))
        return port

    def begin_stop(self) -> asyncio.Task[None]:
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())
        return self._stopping

    async def stop(self) -> None:
        await self.begin_stop()

    async def _stop(self) -> None:
        if self._server is None:
            return
        # new calls refused from here (health NOT_SERVING, inference UNAVAILABLE); the ones in flight
        # are answered, read by their clients, and only then do the connections close (GOAWAY)
        await self._health.begin_shutdown()
        started = time.monotonic()
        if await self._calls.drain(self.settings.shutdown_timeout_s):
            await asyncio.sleep(self._calls.linger_s(DRAIN_LINGER_S))
        else:
            logger.warning(
                "gRPC: %d call(s) still in flight after %.0f s",
                self._calls.count,
                self.settings.shutdown_timeout_s,
            )
        grace = max(0.0, self.settings.shutdown_timeout_s - (time.monotonic() - started))
        await self._server.stop(grace)
        logger.info("gRPC server stopped")
