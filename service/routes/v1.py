"""KServe V1 protocol: list models, model metadata, `:predict` with per-row mean + uncertainty.

`POST /v1/models/{name}:predict` with `{"instances": [[...], ...], "parameters": {"alpha": 0.05,
"interval_level": 0.9, "heads": true}}` answers `{"predictions": [{field: value, ...}, ...]}` with
the field names of the serving contract, one object per instance, in order.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from service.admission import InferRoute
from service.auth import require_api_key
from service.drift import DriftState
from service.errors import BadRequest, describe_validation_errors
from service.responses import ORJSON_OPTIONS as _ORJSON_OPTIONS
from service.responses import OrjsonResponse
from service.routes import Repository
from service.routes.infer import Answered, InferCall, fastapi_response

router = APIRouter(tags=["KServe V1"], default_response_class=OrjsonResponse)


class PredictParameters(BaseModel):
    """Optional per-request knobs."""

    model_config = ConfigDict(extra="forbid")

    alpha: float | None = Field(
        default=None, gt=0.0, lt=1.0, description="OOD flag level α (default: model's)."
    )
    interval_level: float = Field(default=0.95, gt=0.0, lt=1.0, description="Regression interval level.")
    heads: bool = Field(default=False, description="Also return per-head outputs.")
    timeout: float | None = Field(default=None, gt=0.0, description="Queue deadline in seconds.")


class PredictRequest(BaseModel):
    """A V1 predict body: each instance is one input row (nested lists for multi-dimensional rows)."""

    model_config = ConfigDict(extra="forbid")

    instances: list[Any] = Field(
        min_length=1,
        description="Input rows, e.g. [[0.1, 2.0, ...], ...]; or objects keyed by the model's feature_names.",
    )
    parameters: PredictParameters = Field(default_factory=PredictParameters)


class Prediction(BaseModel):
    """One instance's answer: the fields of the model's task (order: GET /v1/models/{name} `outputs`).

    Documentation only: the handler writes the answer tensors of `service.inference` directly."""

    model_config = ConfigDict(extra="allow")

    # classification
    probabilities: list[float] | None = Field(
        default=None, description="Mean class probabilities over heads."
    )
    label: int | None = Field(default=None, description="Predicted class id (argmax of probabilities).")
    label_name: str | None = Field(default=None, description="Predicted class name.")
    confidence: float | None = Field(default=None, description="Largest mean class probability.")
    # regression
    mean: float | None = Field(default=None, description="Mean prediction over heads (target units).")
    aleatoric_variance: float | None = Field(default=None, description="Mean of the heads' variances.")
    epistemic_variance: float | None = Field(default=None, description="Variance of the heads' means.")
    total_variance: float | None = Field(default=None, description="Aleatoric + epistemic variance.")
    # both
    variance: float | None = Field(
        default=None,
        description="Classification: variance over heads of the predicted class's probability; "
        "regression: the epistemic variance.",
    )
    disagreement: float | None = Field(
        default=None,
        description="Classification: share of heads voting against the prediction; regression: "
        "standard deviation of the head means.",
    )
    mutual_information: float | None = Field(
        default=None, description="Classification: mutual information across heads, nats (epistemic)."
    )
    expected_entropy: float | None = Field(default=None, description="Mean entropy of the heads (aleatoric).")
    total_entropy: float | None = Field(default=None, description="Entropy of the mean probabilities.")
    epkl: float | None = Field(default=None, description="Expected pairwise KL divergence between heads.")
    density_score: float | None = Field(
        default=None,
        description="Only for models with a density output (manifest schema 2): squared Mahalanobis "
        "distance of the row's shared-body features to the nearest class mean (higher = less like "
        "the training data).",
    )
    input_density_score: float | None = Field(
        default=None,
        description="Only for models with an input_density output (manifest schema 2): squared "
        "Mahalanobis distance of the standardised raw row to the training mean. Unusual both ways: far "
        "above its in-distribution values (far from the data) or far below (a row shrunk towards the "
        "mean).",
    )
    unseen_values: int | None = Field(
        default=None,
        description="Only for models with an unseen_values output (manifest schema 3): how many of the "
        "row's discrete columns (codes, counts, flags) hold a value that no training row has, e.g. a "
        "1 sent as 0.1. The combined ood_score ranks this count ahead of its components.",
    )
    interval_lower: float | None = Field(
        default=None, description="Regression prediction interval, lower end."
    )
    interval_upper: float | None = Field(
        default=None, description="Regression prediction interval, upper end."
    )
    interval_level: float | None = Field(default=None, description="The interval's level.")
    ood_score: float | None = Field(
        default=None,
        description="The manifest's OOD score (higher = more OOD). With a combined score (ood.score "
        "'combined'): its rule over the components' log-scale z-scores (sum_pos_log_z: the sum of "
        "their positive parts), e.g. of mutual information, density_score and input_density_score "
        "(two-sided); with unseen_values (schema 3): unseen_values + 1/2 + S / (2 (1 + |S|)) of that "
        "combination S, so any row with more unseen values ranks higher.",
    )
    ood_p_value: float | None = Field(
        default=None, description="Conformal p-value of ood_score against the held-out calibration scores."
    )
    ood_flag: bool | None = Field(default=None, description="ood_p_value <= ood_alpha.")
    ood_alpha: float | None = Field(default=None, description="The flag level used for this request.")
    heads: list[list[float]] | None = Field(
        default=None, description="With parameters.heads: per-head class probabilities (heads × classes)."
    )
    heads_mean: list[float] | None = Field(default=None, description="With parameters.heads: head means.")
    heads_variance: list[float] | None = Field(
        default=None, description="With parameters.heads: head variances."
    )


class PredictResponse(BaseModel):
    model_name: str
    model_version: str
    predictions: list[Prediction] = Field(
        description="One object per instance with the contract's fields for the model's task."
    )


class _Strict(BaseModel):
    # the declared response is the answer: a field the server adds or drops fails the schema tests
    model_config = ConfigDict(extra="forbid")


class TensorSpec(_Strict):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for the batch axis")


class OODSummary(_Strict):
    score: str = Field(description="What `ood_score` is: one uncertainty score, or `combined`")
    components: list[str] = Field(description="The combined statistic's scores; empty for one score")
    combination: str | None
    default_alpha: float
    calibration_size: int = Field(description="Calibration scores behind the conformal p-values")


class BatchingStatus(_Strict):
    max_batch_size: int
    max_queue_delay_ms: float
    run_when_idle: bool
    batches: int
    rows: int
    max_batch_rows: int
    queued_requests: int


class ShadowStatus(_Strict):
    enabled: bool
    ensemble_available: bool
    reason: str | None
    fraction: float
    window: int
    rows: int
    dropped_rows: int
    window_rows: int
    fidelity: dict[str, float | int | None] | None
    busy_seconds: float
    max_busy: float
    min_batch: int
    ensemble_in_package: bool


class ModelStatus(_Strict):
    """`{"name", "ready"}` as the V1 spec asks, and what operators see about the model."""

    name: str
    version: str
    ready: bool
    platform: str
    provider: str
    task: Literal["classification", "regression"]
    heads: int
    labels: list[str] | None
    input: TensorSpec
    feature_names: list[str] | None
    ood: OODSummary
    outputs: list[TensorSpec]
    evaluation: dict[str, Any] | None = Field(description="The manifest's evaluation summary")
    batching: BatchingStatus
    drift: DriftState
    shadow: ShadowStatus


class ModelList(BaseModel):
    models: list[str]


class ServerLiveness(BaseModel):
    status: Literal["alive"]


def _rows_to_predictions(answers: dict[str, NDArray[np.generic]]) -> list[dict[str, Any]]:
    # numpy scalars/rows go to orjson as they are: float32 then prints as 0.1, not 0.10000000149011612
    n = next(iter(answers.values())).shape[0]
    return [{name: column[i] for name, column in answers.items()} for i in range(n)]


@router.get("/", response_model=ServerLiveness, summary="Liveness (KServe V1)")
async def server_live() -> OrjsonResponse:
    """`{"status": "alive"}` while the process runs, as KServe's model server answers (and its SDK's
    V1 `is_server_live` expects). No model is consulted: readiness is `/v2/health/ready`."""
    return OrjsonResponse({"status": "alive"})


@router.get("/v1/models", response_model=ModelList)
async def list_models(repository: Repository) -> OrjsonResponse:
    return OrjsonResponse({"models": [m.name for m in repository.models()]})


@router.get("/v1/models/{model_name}", response_model=ModelStatus)
async def model_status(model_name: str, repository: Repository) -> OrjsonResponse:
    """`{"name", "ready"}` per the V1 spec, plus the model's metadata (labels, heads, outputs, batching)."""
    model = repository.get(model_name)
    return OrjsonResponse(model.metadata())


@router.post(
    "/v1/models/{model_name}:predict",
    response_model=PredictResponse,
    dependencies=[Depends(require_api_key)],
)
async def predict(
    model_name: str, body: PredictRequest, request: Request, repository: Repository
) -> Response:
    """Served by `service.routes.infer.InferenceEdge` in front of FastAPI; this declaration documents
    the route and serves it the same way where the edge is not installed."""
    call = InferCall(request.scope, request.receive, request.app.state.settings, repository)
    return fastapi_response(await answer_predict(call, model_name, body))


async def serve_predict(call: InferCall, route: InferRoute) -> Answered:
    """One V1 predict request at the edge: the body (byte limit first), parsed and validated by its
    pydantic model as FastAPI would, then answered."""
    try:
        body = PredictRequest.model_validate_json(await call.body())
    except ValidationError as exc:
        raise BadRequest(describe_validation_errors(exc.errors())) from None
    return await answer_predict(call, route.model_name, body)


async def answer_predict(call: InferCall, model_name: str, body: PredictRequest) -> Answered:
    model = call.repository.get(model_name)
    params = body.parameters
    rows = model.rows_from_lists(_instances_to_rows(body.instances, model.manifest.feature_names))
    # submit() queues the rows before anything else can run on the loop (a reload cannot slip in
    # between the lookup above and the queue); the answer is then awaited against a disconnect.
    answers = await call.answer(
        model.submit(
            rows,
            alpha=params.alpha,
            level=params.interval_level,
            include_heads=params.heads,
            timeout_s=params.timeout,
        )
    )
    document = {
        "model_name": model.name,
        "model_version": str(model.version),
        "predictions": _rows_to_predictions(answers),
    }
    return Answered(orjson.dumps(document, option=_ORJSON_OPTIONS), "application/json")


def _instances_to_rows(instances: list[Any], feature_names: list[str] | None) -> list[Any]:
    """Rows as given, or — for tabular models with `feature_names` — objects keyed by feature name."""
    if not any(isinstance(instance, dict) for instance in instances):
        return instances
    if feature_names is None:
        raise BadRequest("this model has no feature names: send each instance as a list of numbers")
    if not all(isinstance(instance, dict) for instance in instances):
        raise BadRequest("mix of named (object) and positional (list) instances")
    expected = set(feature_names)
    rows = []
    for i, instance in enumerate(instances):
        if instance.keys() != expected:
            missing = sorted(expected - instance.keys())[:5]
            unknown = sorted(instance.keys() - expected)[:5]
            raise BadRequest(f"instance {i}: missing features {missing}, unknown features {unknown}")
        rows.append([instance[name] for name in feature_names])
    return rows
