"""Open Inference Protocol (KServe V2 / Triton HTTP) routes: health, metadata and inference.

Every quantity the model answers with is its own named output tensor (see `output_specs()`); the
request's `outputs` selects among them. Request bodies may be JSON or use the binary tensor extension
(what stock `tritonclient.http` sends by default); see `service.protocol.v2` for the codec.

Request `parameters` (alpha, interval_level, heads, timeout, binary_data_output) and the infer
logic are shared with gRPC: see `service.v2_core`.

A request body may be gzip- or deflate-compressed (`Content-Encoding`, tritonclient's
`request_compression_algorithm`); answers are not compressed.
"""

from __future__ import annotations

import zlib
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from service import v2_core
from service.admission import InferRoute
from service.auth import require_api_key
from service.errors import BadRequest, PayloadTooLarge
from service.protocol.v2 import (
    HEADER_LENGTH,
    NUMERIC_DATATYPES,
    V2ProtocolError,
    encode_infer_response,
    parse_infer_request,
)
from service.repository import ModelRepository, ServedModel
from service.responses import OrjsonResponse
from service.routes import Repository, inline_schema
from service.routes.infer import Answered, InferCall, fastapi_response
from service.v2_core import PLATFORM, SERVER_NAME

EXTENSIONS = ["binary_tensor_data", "model_repository"]
_HEADER_LENGTH_KEY = HEADER_LENGTH.lower().encode()

router = APIRouter(tags=["v2"], default_response_class=OrjsonResponse)


# ------------------------------------------------------------------------------- response schemas


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(description="V2 datatype, e.g. FP32, INT64, BOOL, BYTES.")
    shape: list[int] = Field(description="Dimensions; -1 for variable ones (the batch axis).")


class ModelParameters(BaseModel):
    task: str
    labels: list[str] | None
    heads: int
    default_alpha: float = Field(description="OOD flag level used when a request gives no `alpha`.")
    ood_score: str = Field(
        description="The uncertainty score used as OOD score (higher = more OOD); `combined` when the "
        "OOD score combines several (`ood_components`)."
    )
    ood_components: list[str] = Field(
        default_factory=list,
        description="The scores a combined OOD score reads (e.g. mutual_information, density, "
        "input_density); empty when `ood_score` is one score.",
    )
    ood_priority: str | None = Field(
        default=None,
        description="A count the combined OOD score ranks ahead of its components (`unseen_values`, "
        "manifest schema 3); null when there is none.",
    )
    ood_combination: str | None = Field(
        default=None,
        description="How the components combine: sum_pos_log_z = Σ max(z, 0) of their log-scale z-scores, "
        "max_log_z = the largest of them "
        "(each normalised on held-out in-distribution data); null for one score.",
    )
    calibration_size: int = Field(description="Number of held-out calibration scores behind the p-values.")
    execution_provider: str
    evaluation: dict[str, Any] = Field(description="Summary of the model's evaluation report.")
    drift: dict[str, Any] | None = Field(
        default=None,
        description="Drift alarm: the current run's martingale_log10, alarm_threshold_log10, alarms and "
        "last_alarm_at (docs/MONITORING.md).",
    )
    shadow: dict[str, Any] | None = Field(
        default=None,
        description="Shadow teacher: fraction, ensemble availability, rows, dropped_rows and the window's "
        "fidelity (docs/MONITORING.md).",
    )


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: ModelParameters


class Readiness(BaseModel):
    name: str
    version: str | None = None
    ready: bool


class Liveness(BaseModel):
    live: bool


class ServerReadiness(BaseModel):
    ready: bool
    models: dict[str, bool] = Field(description="Readiness of each model in the repository.")


class InferInputSchema(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = Field(default=None, description="Row-major values, flat or nested.")
    parameters: dict[str, Any] | None = Field(default=None, description='{"binary_data_size": N} for binary.')


class InferOutputRequestSchema(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(default=None, description='{"binary_data": true} for binary.')


class InferRequestSchema(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None,
        description=(
            "alpha (0..1), interval_level (0..1), heads (bool), timeout (µs), binary_data_output (bool)."
        ),
    )
    inputs: list[InferInputSchema]
    outputs: list[InferOutputRequestSchema] | None = Field(default=None, description="Absent: every output.")


class InferOutputSchema(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class InferResponseSchema(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutputSchema]


_INFER_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": inline_schema(InferRequestSchema)},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": f"JSON request of `{HEADER_LENGTH}` bytes, then raw little-endian tensors.",
            },
        },
    }
}


# ---------------------------------------------------------------------------------------- helpers


def _served(repository: ModelRepository, model_name: str, model_version: str | None) -> ServedModel:
    return v2_core.served(repository, model_name, model_version)


def _metadata(repository: ModelRepository, model: ServedModel) -> ModelMetadata:
    manifest = model.manifest
    return ModelMetadata(
        name=model.name,
        versions=v2_core.model_versions(repository, model),
        platform=PLATFORM,
        inputs=[TensorMetadata(name=manifest.input.name, datatype="FP32", shape=list(manifest.input.shape))],
        outputs=[
            TensorMetadata(name=name, datatype=datatype, shape=list(shape))
            for name, datatype, shape in model.output_specs()
        ],
        parameters=ModelParameters(**v2_core.model_parameters(model)),
    )


def _inflate(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    """The body as sent by tritonclient's `request_compression_algorithm` (gzip or deflate), inflated.

    Inflation stops one byte past `limit` (max_request_bytes), so a small compressed body cannot
    make the server allocate more than an uncompressed one could.
    """
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise BadRequest(f"unsupported Content-Encoding {content_encoding!r}: use gzip, deflate or none")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        inflated = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"request body is not valid {encoding} data ({exc})") from None
    if len(inflated) > limit:
        raise PayloadTooLarge(f"decompressed request body exceeds max_request_bytes={limit}")
    if not inflater.eof:
        raise BadRequest(f"request body is truncated {encoding} data")
    return inflated


# ----------------------------------------------------------------------------------------- routes


@router.get("/v2", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=v2_core.server_version(), extensions=EXTENSIONS)


@router.get("/v2/health/live", response_model=Liveness, summary="Liveness")
async def health_live() -> Liveness:
    return Liveness(live=True)


@router.get(
    "/v2/health/ready",
    response_model=ServerReadiness,
    summary="Readiness: 200 when every model in the repository is ready, else 503",
    responses={503: {"description": "Some model is not ready (or none is loaded)."}},
)
async def health_ready(repository: Repository) -> Response:
    ready, states = v2_core.server_readiness(repository)
    body = ServerReadiness(ready=ready, models=states).model_dump()
    if not ready:
        not_ready = sorted(k for k, v in states.items() if not v) or [
            v2_core.workers_not_ready(repository) or "no model is loaded"
        ]
        body["error"] = f"not ready: {', '.join(not_ready)}"
    return OrjsonResponse(body, status_code=200 if ready else 503)


@router.get("/v2/models/{model_name}", response_model=ModelMetadata, summary="Model metadata")
@router.get(
    "/v2/models/{model_name}/versions/{model_version}", response_model=ModelMetadata, summary="Model metadata"
)
async def model_metadata(
    repository: Repository, model_name: str, model_version: str | None = None
) -> ModelMetadata:
    return _metadata(repository, _served(repository, model_name, model_version))


_READY_ROUTE: dict[str, Any] = {
    "response_model": Readiness,
    "summary": "Model readiness (200 ready, 503 not ready, 404 unknown)",
}


@router.get("/v2/models/{model_name}/ready", **_READY_ROUTE)
@router.get("/v2/models/{model_name}/versions/{model_version}/ready", **_READY_ROUTE)
async def model_ready(repository: Repository, model_name: str, model_version: str | None = None) -> Response:
    model = _served(repository, model_name, model_version)
    body = Readiness(name=model.name, version=str(model.version), ready=model.ready).model_dump()
    if not model.ready:
        body["error"] = f"model {model.name!r} version {model.version} is not ready"
    return OrjsonResponse(body, status_code=200 if model.ready else 503)


_INFER_ROUTE: dict[str, Any] = {
    "response_model": InferResponseSchema,
    "summary": "Inference (JSON or binary tensor extension)",
    "openapi_extra": _INFER_OPENAPI,
    "dependencies": [Depends(require_api_key)],
}


@router.post("/v2/models/{model_name}/infer", **_INFER_ROUTE)
@router.post("/v2/models/{model_name}/versions/{model_version}/infer", **_INFER_ROUTE)
async def infer(
    request: Request, repository: Repository, model_name: str, model_version: str | None = None
) -> Response:
    """Served by `service.routes.infer.InferenceEdge` in front of FastAPI; this declaration documents
    the route and serves it the same way where the edge is not installed."""
    call = InferCall(request.scope, request.receive, request.app.state.settings, repository)
    route = InferRoute(model_name, model_version, "", "v2")
    return fastapi_response(await serve_infer(call, route))


async def serve_infer(call: InferCall, route: InferRoute) -> Answered:
    """One V2 infer request: model lookup (404 / 503 before the body is read), body, answer."""
    model = v2_core.ready_to_infer(call.repository, route.model_name, route.model_version)
    body = await call.body()
    encoding = call.header(b"content-encoding")
    if encoding is not None:
        body = _inflate(body, encoding, call.settings.max_request_bytes)
    try:
        parsed = parse_infer_request(
            body, call.header(_HEADER_LENGTH_KEY), accepted_datatypes=NUMERIC_DATATYPES
        )
    except V2ProtocolError as exc:
        raise BadRequest(str(exc)) from None
    prepared = v2_core.prepare_infer(model, parsed)
    results = await call.answer(prepared.submit())
    encoded = encode_infer_response(
        model_name=model.name,
        model_version=str(model.version),
        request_id=parsed.id,
        outputs=prepared.outputs(results),
    )
    headers = (
        [] if encoded.header_length is None else [(_HEADER_LENGTH_KEY, str(encoded.header_length).encode())]
    )
    return Answered(encoded.body, encoded.media_type, headers)
