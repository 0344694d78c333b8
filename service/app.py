"""`create_app()`: the FastAPI application — settings, repository, batchers, routes, metrics, errors.

Lifespan: load and warm every model and start its batcher, then the gRPC server
(`service.oip_grpc`, unless `grpc_port` is 0), before the server reports ready; on shutdown (after
uvicorn has finished in-flight requests) let gRPC calls in flight finish, then drain and stop every
batcher.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from service.body_limit import BodySizeLimitMiddleware
from service.errors import install_error_handlers
from service.metrics import RequestMetricsMiddleware, ServiceMetrics
from service.oip_grpc.server import GrpcServer
from service.protocol.v2 import HEADER_LENGTH
from service.repository import ModelRepository, NoLoadableModel
from service.responses import OrjsonResponse
from service.routes import docs, v1, v2
from service.routes import repository as repository_routes
from service.routes.infer import InferenceEdge
from service.settings import Settings
from service.v2_core import server_version
from service.worker_group import WorkerGroup

logger = logging.getLogger("service")


class _AsgiEndpoint:
    """Wraps an ASGI callable so Starlette routes to it as an app, not as a request handler function."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class HydraApp(FastAPI):
    """FastAPI with a pure ASGI front in its place as the outermost layer: the inference routes'
    lean path (`service.routes.infer.InferenceEdge`), inside CORS when that is on. Every request
    the front does not serve itself goes through FastAPI's own stack (`behind_front`)."""

    front: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.front is None:
            await super().__call__(scope, receive, send)
        else:
            await self.front(scope, receive, send)

    async def behind_front(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None, worker_group: WorkerGroup | None = None) -> FastAPI:
    """`worker_group`: this app is one of several worker processes (`service.workers`)."""
    settings = settings if settings is not None else Settings()
    metrics = ServiceMetrics(multiprocess_dir=worker_group.metrics_dir if worker_group else None)
    repository = ModelRepository(settings, metrics)
    if worker_group is not None:
        repository.announce, repository.workers_not_ready = worker_group.announce, worker_group.not_ready
    grpc_server = (
        GrpcServer(settings, repository, metrics, share_port=worker_group is not None)
        if settings.grpc_port
        else None
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await repository.start()
        except NoLoadableModel as exc:
            logger.critical("cannot start: %s", exc)
            raise
        if grpc_server is not None:
            try:
                await grpc_server.start()
            except RuntimeError as exc:
                logger.critical("cannot start: %s", exc)
                await repository.stop()
                raise
        # Everything alive now (modules, sessions, routes) lives as long as the process. Moving it out
        # of the collector's reach keeps full collections short: measured p99 at 32 concurrent
        # clients fell from 100-136 ms to 19-39 ms on the 2-core box (bench/load.py).
        gc.collect()
        gc.freeze()
        # The young generation is collected once allocations minus deallocations pass its threshold.
        # Under load, requests allocate while older ones free, so at Python's 700 a collection walks
        # every object born since the last one that still lives (the queued requests': 100-160 k
        # objects, 40-115 ms with the event loop stopped) and collects next to nothing.
        default_thresholds = gc.get_threshold()
        if settings.gc_young_threshold:
            gc.set_threshold(settings.gc_young_threshold, *default_thresholds[1:])
        if worker_group is not None:  # caught up with the others' reloads, then counted as ready
            await worker_group.join(repository)
        try:
            yield
        finally:
            gc.set_threshold(*default_thresholds)  # an app run in-process leaves the process as it was
            if worker_group is not None:
                await worker_group.leave()
            if grpc_server is not None:  # calls in flight finish first (begun at SIGTERM: __main__)
                await grpc_server.stop()
            await repository.stop()

    app = HydraApp(
        title="hydra-serve",
        summary="Mean prediction and per-head uncertainty from Hydra models (KServe V1, Open Inference V2).",
        version=server_version(),  # the installed package's, as V2 server metadata says
        lifespan=lifespan,
        default_response_class=OrjsonResponse,
        # FastAPI's own pages load their assets from a CDN; install_docs serves them locally instead
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.repository = repository
    app.state.grpc_server = grpc_server
    app.state.worker_group = worker_group
    install_error_handlers(app)
    app.include_router(v1.router)
    app.include_router(repository_routes.router)
    app.include_router(v2.router)
    docs.install_docs(app)
    metrics_app = metrics.asgi_app()
    app.mount("/metrics", metrics_app)
    # A mount alone answers the bare path with a 307 to "/metrics/"; scrapers ask for "/metrics".
    app.router.routes.append(Route("/metrics", endpoint=_AsgiEndpoint(metrics_app), include_in_schema=False))
    # added last = outermost: the body limit applies before any route parses, and metrics see every status
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=settings.max_request_bytes,
        read_timeout_s=settings.request_read_timeout_s,
    )
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    # in front of FastAPI's own stack: the inference routes' lean path (service.routes.infer). It
    # refuses an overloaded model's requests from their headers alone and serves the rest without
    # FastAPI's layers (measured: ~40 % of the loop's time on one-row requests); it applies the body
    # limit and records the request metrics itself
    front: ASGIApp = InferenceEdge(
        app.behind_front,
        repository=repository,
        settings=settings,
        metrics=metrics,
        handlers={"v2": v2.serve_infer, "v1": v1.serve_predict},
    )
    if settings.cors_origins:  # off unless configured: browsers then refuse cross-origin calls
        front = CORSMiddleware(
            front,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "Content-Encoding", HEADER_LENGTH],
            expose_headers=["Retry-After", HEADER_LENGTH],
        )
    app.front = front
    return app
