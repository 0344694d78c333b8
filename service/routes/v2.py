"""Open Inference Protocol (KServe V2 / Triton HTTP) routes: health, metadata and inference.

Every quantity the model answers with is its own named output tensor (see `output_specs()`); the
request's `outputs` selects among them. Request bodies may be JSON or use the binary tensor extension
(what stock `tritonclient.http` sends by default); see `service.protocol.v2` for the codec.

Request `parameters` we read (others, e.g. tritonclient's `priority`, are ignored):
  alpha           OOD flag level α in (0, 1); default: the manifest's `ood.default_alpha`
  interval_level  regression prediction-interval level in (0, 1); default 0.95
  heads           true → also return the per-head outputs (`heads`, or `heads_mean`/`heads_variance`)
  timeout         Triton's per-request timeout in microseconds (a deadline for the queued request)
  binary_data_output  true → every output as binary tensor data (tritonclient's default)

A request body may be gzip- or deflate-compressed (`Content-Encoding`, tritonclient's
`request_compression_algorithm`); answers are not compressed.
"""

from __future__ import annotations

import zlib
from importlib import metadata
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from numpy.typing import NDArray
from pydantic import BaseModel, Field
from starlette.responses import Response

from service.auth import require_api_key
from service.errors import BadRequest, ModelNotFound, ModelUnavailable, PayloadTooLarge
from service.inference import head_output_names
from service.protocol.v2 import (
    HEADER_LENGTH,
    NUMERIC_DATATYPES,
    InferRequest,
    OutputTensor,
    V2ProtocolError,
    encode_infer_response,
    parse_infer_request,
    select_outputs,
)
from service.repository import ServedModel
from service.responses import OrjsonResponse
from service.routes import get_repository, inline_schema, until_disconnected
from service.settings import Settings

SERVER_NAME = "hydra-serve"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
PLATFORM = "onnxruntime_onnx"
DEFAULT_INTERVAL_LEVEL = 0.95

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


def _version_number(model_name: str, model_version: str | None) -> int | None:
    if model_version is None:
        return None
    if not model_version.isascii() or not model_version.isdigit() or int(model_version) < 1:
        raise ModelNotFound(f"model {model_name!r} has no version {model_version!r}")
    return int(model_version)


def _served(request: Request, model_name: str, model_version: str | None) -> ServedModel:
    return get_repository(request).get(model_name, _version_number(model_name, model_version))


def _server_version() -> str:
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _metadata(request: Request, model: ServedModel) -> ModelMetadata:
    manifest = model.manifest
    versions = sorted(
        {
            int(entry["version"])
            for entry in get_repository(request).index()
            if entry.get("name") == model.name and str(entry.get("version", "")).isdigit()
        }
        | {model.version}
    )
    return ModelMetadata(
        name=model.name,
        versions=[str(v) for v in versions],
        platform=PLATFORM,
        inputs=[TensorMetadata(name=manifest.input.name, datatype="FP32", shape=list(manifest.input.shape))],
        outputs=[
            TensorMetadata(name=name, datatype=datatype, shape=list(shape))
            for name, datatype, shape in model.output_specs()
        ],
        parameters=ModelParameters(
            task=manifest.task,
            labels=manifest.labels,
            heads=manifest.heads,
            default_alpha=model.default_alpha,
            ood_score=manifest.ood.score,
            ood_components=[c.score for c in manifest.ood.components],
            ood_combination=manifest.ood.combination,
            calibration_size=len(manifest.ood.calibration_scores),
            execution_provider=model.provider,
            evaluation=manifest.evaluation,
            **model.monitor.metadata(),
        ),
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


def _unit_interval(parameters: dict[str, Any], key: str) -> float | None:
    value = parameters.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value < 1.0:
        raise BadRequest(f"parameter {key!r} must be a number in (0, 1), got {value!r}")
    return float(value)


def _timeout_s(parameters: dict[str, Any]) -> float | None:
    value = parameters.get("timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BadRequest(f"parameter 'timeout' must be a positive integer (microseconds), got {value!r}")
    return value / 1e6


def _rows(parsed: InferRequest, model: ServedModel) -> NDArray[np.float32]:
    """The model input as float32 rows `(n, *row_shape)`; any numeric datatype is accepted."""
    spec = model.manifest.input
    unknown = [name for name in parsed.inputs if name != spec.name]
    if unknown:
        raise BadRequest(f"unknown input {unknown[0]!r}; model {model.name!r} takes one input {spec.name!r}")
    tensor = parsed.inputs.get(spec.name)
    if tensor is None:
        raise BadRequest(f"missing input {spec.name!r}")
    row_shape = tuple(model.manifest.row_shape)
    if len(tensor.shape) != 1 + len(row_shape) or tensor.shape[1:] != row_shape:
        expected = [-1, *row_shape]
        raise BadRequest(f"input {spec.name!r} has shape {list(tensor.shape)}, model expects {expected}")
    with np.errstate(over="ignore"):  # FP64 beyond float32 range → inf; infer() refuses non-finite rows
        return np.ascontiguousarray(tensor.data, dtype=np.float32)


# ----------------------------------------------------------------------------------------- routes


@router.get("/v2", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=_server_version(), extensions=EXTENSIONS)


@router.get("/v2/health/live", response_model=Liveness, summary="Liveness")
async def health_live() -> Liveness:
    return Liveness(live=True)


@router.get(
    "/v2/health/ready",
    response_model=ServerReadiness,
    summary="Readiness: 200 when every model in the repository is ready, else 503",
    responses={503: {"description": "Some model is not ready (or none is loaded)."}},
)
async def health_ready(request: Request) -> Response:
    # "Every model" = every model the repository is meant to serve: a model unloaded on purpose
    # does not make the server unready, one that failed to load does (Triton's strict readiness).
    states = {
        str(entry["name"]): entry["state"] == "READY"
        for entry in get_repository(request).index()
        if entry["state"] == "READY" or entry.get("reason") != "unloaded"
    }
    ready = bool(states) and all(states.values())
    body = ServerReadiness(ready=ready, models=states).model_dump()
    if not ready:
        not_ready = sorted(k for k, v in states.items() if not v) or ["no model is loaded"]
        body["error"] = f"not ready: {', '.join(not_ready)}"
    return OrjsonResponse(body, status_code=200 if ready else 503)


@router.get("/v2/models/{model_name}", response_model=ModelMetadata, summary="Model metadata")
@router.get(
    "/v2/models/{model_name}/versions/{model_version}", response_model=ModelMetadata, summary="Model metadata"
)
async def model_metadata(
    request: Request, model_name: str, model_version: str | None = None
) -> ModelMetadata:
    return _metadata(request, _served(request, model_name, model_version))


@router.get(
    "/v2/models/{model_name}/ready",
    response_model=Readiness,
    summary="Model readiness (200 ready, 503 not ready, 404 unknown)",
)
@router.get(
    "/v2/models/{model_name}/versions/{model_version}/ready",
    response_model=Readiness,
    summary="Model readiness (200 ready, 503 not ready, 404 unknown)",
)
async def model_ready(request: Request, model_name: str, model_version: str | None = None) -> Response:
    model = _served(request, model_name, model_version)
    body = Readiness(name=model.name, version=str(model.version), ready=model.ready).model_dump()
    if not model.ready:
        body["error"] = f"model {model.name!r} version {model.version} is not ready"
    return OrjsonResponse(body, status_code=200 if model.ready else 503)


@router.post(
    "/v2/models/{model_name}/infer",
    response_model=InferResponseSchema,
    summary="Inference (JSON or binary tensor extension)",
    openapi_extra=_INFER_OPENAPI,
    dependencies=[Depends(require_api_key)],
)
@router.post(
    "/v2/models/{model_name}/versions/{model_version}/infer",
    response_model=InferResponseSchema,
    summary="Inference (JSON or binary tensor extension)",
    openapi_extra=_INFER_OPENAPI,
    dependencies=[Depends(require_api_key)],
)
async def infer(request: Request, model_name: str, model_version: str | None = None) -> Response:
    model = _served(request, model_name, model_version)
    if not model.ready:
        raise ModelUnavailable(f"model {model.name!r} version {model.version} is not ready")
    settings: Settings = request.app.state.settings
    body = _inflate(await request.body(), request.headers.get("content-encoding"), settings.max_request_bytes)
    specs = {name: datatype for name, datatype, _ in model.output_specs()}
    try:
        parsed = parse_infer_request(
            body, request.headers.get(HEADER_LENGTH), accepted_datatypes=NUMERIC_DATATYPES
        )
        selected = select_outputs(parsed, specs)
    except V2ProtocolError as exc:
        raise BadRequest(str(exc)) from None

    parameters = parsed.parameters
    alpha = _unit_interval(parameters, "alpha")
    level = _unit_interval(parameters, "interval_level")
    heads_flag = parameters.get("heads", False)
    if not isinstance(heads_flag, bool):
        raise BadRequest(f"parameter 'heads' must be true or false, got {heads_flag!r}")
    # The per-head tensors are computed only when asked for: `heads: true`, or naming one in `outputs`.
    head_outputs = set(head_output_names(model.manifest))
    asked_for_heads = parsed.outputs is not None and any(name in head_outputs for name, _ in selected)
    rows = _rows(parsed, model)

    results = await until_disconnected(
        request,
        model.infer(
            rows,
            alpha=alpha,
            level=DEFAULT_INTERVAL_LEVEL if level is None else level,
            include_heads=heads_flag or asked_for_heads,
            timeout_s=_timeout_s(parameters),
        ),
    )
    if parsed.outputs is None:  # "every output" = every one computed (heads only when asked)
        selected = [(name, binary) for name, binary in selected if name in results]
    outputs = [OutputTensor(name, specs[name], results[name], binary) for name, binary in selected]
    encoded = encode_infer_response(
        model_name=model.name,
        model_version=str(model.version),
        request_id=parsed.id,
        outputs=outputs,
    )
    return Response(encoded.body, media_type=encoded.media_type, headers=encoded.headers)
