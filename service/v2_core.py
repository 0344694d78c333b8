"""Open Inference Protocol semantics shared by its two transports: HTTP (`service.routes.v2`) and gRPC
(`service.oip_grpc`).

Both decode their wire format into the same `InferRequest` (`service.protocol.v2`), and from there one
code path validates the request parameters, picks the answer tensors, queues the rows on the model's
batcher and builds the output tensors — so the two protocols cannot drift apart in what they accept
or answer. Metadata and readiness are computed here once as well.

Request `parameters` read (others, e.g. tritonclient's `priority`, are ignored):
  alpha           OOD flag level α in (0, 1); default: the manifest's `ood.default_alpha`
  interval_level  regression prediction-interval level in (0, 1); default 0.95
  heads           true → also return the per-head outputs (`heads`, or `heads_mean`/`heads_variance`)
  timeout         Triton's per-request timeout in microseconds (a deadline for the queued request)
  binary_data_output  true → every output as binary (raw) tensor data
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.errors import BadRequest, ModelNotFound, ModelUnavailable
from service.protocol.v2 import InferRequest, OutputTensor, V2ProtocolError, select_outputs
from service.repository import ModelRepository, ServedModel

SERVER_NAME = "hydra-serve"
PLATFORM = "onnxruntime_onnx"
DEFAULT_INTERVAL_LEVEL = 0.95

Answer = dict[str, NDArray[np.generic]]


def server_version() -> str:
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:
        return "0+unknown"


def version_number(model_name: str, model_version: str | None) -> int | None:
    """The version a request names (None or "" = the one served), or ModelNotFound for a malformed one."""
    if not model_version:
        return None
    if not model_version.isascii() or not model_version.isdigit() or int(model_version) < 1:
        raise ModelNotFound(f"model {model_name!r} has no version {model_version!r}")
    return int(model_version)


def served(repository: ModelRepository, model_name: str, model_version: str | None) -> ServedModel:
    return repository.get(model_name, version_number(model_name, model_version))


def ready_to_infer(repository: ModelRepository, model_name: str, model_version: str | None) -> ServedModel:
    model = served(repository, model_name, model_version)
    if not model.ready:
        raise ModelUnavailable(f"model {model.name!r} version {model.version} is not ready")
    return model


def server_readiness(repository: ModelRepository) -> tuple[bool, dict[str, bool]]:
    """(ready, per-model readiness). "Every model" = every model the repository is meant to serve: a
    model unloaded on purpose does not make the server unready, one that failed to load does (Triton's
    strict readiness)."""
    states = {
        str(entry["name"]): entry["state"] == "READY"
        for entry in repository.index()
        if entry["state"] == "READY" or entry.get("reason") != "unloaded"
    }
    return bool(states) and all(states.values()) and not workers_not_ready(repository), states


def workers_not_ready(repository: ModelRepository) -> str:
    """With several workers (`--workers`): why not all of them serve yet ("" when they do)."""
    waiting = repository.workers_not_ready() if repository.workers_not_ready is not None else []
    return f"workers {', '.join(map(str, waiting))} not ready" if waiting else ""


def model_versions(repository: ModelRepository, model: ServedModel) -> list[str]:
    versions = {
        int(entry["version"])
        for entry in repository.index()
        if entry.get("name") == model.name and str(entry.get("version", "")).isdigit()
    } | {model.version}
    return [str(v) for v in sorted(versions)]


def model_parameters(model: ServedModel) -> dict[str, Any]:
    """What a client needs to read the answers: task, labels, heads, OOD settings, evaluation."""
    manifest = model.manifest
    return {
        "task": manifest.task,
        "labels": manifest.labels,
        "heads": manifest.heads,
        "default_alpha": model.default_alpha,
        "ood_score": manifest.ood.score,
        "ood_components": [c.score for c in manifest.ood.components],
        "ood_combination": manifest.ood.combination,
        "ood_priority": manifest.ood.priority,
        "calibration_size": len(manifest.ood.calibration_scores),
        "execution_provider": model.provider,
        "evaluation": manifest.evaluation,
        **model.monitor.metadata(),  # drift martingale and shadow teacher state
    }


# ------------------------------------------------------------------------------------------ infer


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
    """The model input as checked float32 rows `(n, *row_shape)`; any numeric datatype is accepted."""
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
    return model.rows_from_tensor(tensor.data)


@dataclass(slots=True)
class PreparedInfer:
    """A validated infer request: what to run, and which answer tensors to return (name, binary?)."""

    model: ServedModel
    rows: NDArray[np.float32]
    alpha: float | None
    level: float
    include_heads: bool
    timeout_s: float | None
    selected: list[tuple[str, bool]]
    every_output: bool  # the request named no outputs
    datatypes: dict[str, str]

    def submit(self, deadline_s: float | None = None) -> asyncio.Future[Answer]:
        """Queue the rows now (QueueFull / ModelUnavailable raise here, synchronously).

        `deadline_s`: a transport's own deadline (gRPC's) in seconds from now; the earlier of it and
        the request's `timeout` parameter bounds the time the rows may wait in the queue.
        """
        timeout = self.timeout_s
        if deadline_s is not None:
            timeout = deadline_s if timeout is None else min(timeout, deadline_s)
        return self.model.submit(
            self.rows,
            alpha=self.alpha,
            level=self.level,
            include_heads=self.include_heads,
            timeout_s=timeout,
            # named outputs: only those are cast and sliced per request ("every output" = all computed)
            outputs=None if self.every_output else [name for name, _ in self.selected],
        )

    def outputs(self, results: Answer) -> list[OutputTensor]:
        selected = self.selected
        if self.every_output:  # "every output" = every one computed (heads only when asked)
            selected = [(name, binary) for name, binary in selected if name in results]
        return [OutputTensor(name, self.datatypes[name], results[name], binary) for name, binary in selected]


def prepare_infer(model: ServedModel, parsed: InferRequest) -> PreparedInfer:
    """Validate a decoded infer request against `model`; BadRequest names the first problem."""
    datatypes = model.output_datatypes
    try:
        selected = select_outputs(parsed, datatypes)
    except V2ProtocolError as exc:
        raise BadRequest(str(exc)) from None
    parameters = parsed.parameters
    alpha = _unit_interval(parameters, "alpha")
    level = _unit_interval(parameters, "interval_level")
    heads_flag = parameters.get("heads", False)
    if not isinstance(heads_flag, bool):
        raise BadRequest(f"parameter 'heads' must be true or false, got {heads_flag!r}")
    # The per-head tensors are computed only when asked for: `heads: true`, or naming one in `outputs`.
    head_outputs = model.head_outputs
    asked_for_heads = parsed.outputs is not None and any(name in head_outputs for name, _ in selected)
    return PreparedInfer(
        model=model,
        rows=_rows(parsed, model),
        alpha=alpha,
        level=DEFAULT_INTERVAL_LEVEL if level is None else level,
        include_heads=heads_flag or asked_for_heads,
        timeout_s=_timeout_s(parameters),
        selected=selected,
        every_output=parsed.outputs is None,
        datatypes=datatypes,
    )
