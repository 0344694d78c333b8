"""`ServedModel`: one loaded model version — manifest, warmed ORT session, dynamic batcher, answers.

The routes (V1, and V2 over HTTP and gRPC through `service.v2_core`) call
`model.submit(rows, alpha=..., level=..., include_heads=...)`, which queues the rows at once, and
await the future: the named answer tensors of the serving contract for exactly those rows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import ValidationError

from service import inference
from service.batch_request import BatcherStats, BatchReport, Outputs
from service.batcher import DynamicBatcher
from service.errors import BadRequest, ModelLoadError, QueueFull, describe_validation_errors
from service.manifest import MANIFEST_FILENAME, ModelManifest
from service.metrics import ServiceMetrics
from service.monitoring import ModelMonitor
from service.runtime import OnnxModelRuntime, warmup_batch_sizes
from service.settings import Settings
from service.uncertainty import ConformalOODCalibrator

logger = logging.getLogger(__name__)

MODEL_FILENAME = "model.onnx"


def read_manifest(directory: Path, name: str, version: int) -> ModelManifest:
    """The validated manifest of `directory`, which must agree with where it lives."""
    path = directory / MANIFEST_FILENAME
    if not path.is_file():
        raise ModelLoadError(
            f"model {name!r} version {version}: {MANIFEST_FILENAME} is missing", reason="manifest"
        )
    try:
        manifest = ModelManifest.load(path)
    except ValidationError as exc:
        problems = describe_validation_errors(exc.errors(), subject="manifest")
        raise ModelLoadError(
            f"model {name!r} version {version}: invalid manifest: {problems}", reason="manifest"
        ) from exc
    except ValueError as exc:  # JSON syntax
        raise ModelLoadError(
            f"model {name!r} version {version}: manifest is not valid JSON: {exc}", reason="manifest"
        ) from exc
    if manifest.name != name or manifest.version != version:
        raise ModelLoadError(
            f"manifest in {name}/{version} describes {manifest.name!r} version {manifest.version}",
            reason="manifest",
        )
    return manifest


class ServedModel:
    """One model version being served. Build with `ServedModel.load` (blocking), then `await start()`."""

    def __init__(
        self,
        directory: Path,
        manifest: ModelManifest,
        runtime: OnnxModelRuntime,
        settings: Settings,
        metrics: ServiceMetrics,
        monitor: ModelMonitor | None = None,
    ) -> None:
        self.name: str = manifest.name
        self.version: int = manifest.version
        self.directory = directory
        self.manifest = manifest
        self.provider: str = runtime.provider
        self.default_alpha: float = settings.default_alpha or manifest.ood.default_alpha
        self._runtime = runtime
        self._settings = settings
        self._metrics = metrics
        self._calibrator = ConformalOODCalibrator(manifest.ood.calibration_scores)
        # the answer contract, read on every request: computed once per load
        self._output_specs = inference.output_specs(manifest)
        self.output_datatypes: dict[str, str] = {name: datatype for name, datatype, _ in self._output_specs}
        self.head_outputs: frozenset[str] = frozenset(inference.head_output_names(manifest))
        # drift alarm + shadow teacher: a new one per load, so a reload starts a new martingale
        if monitor is None:
            monitor = ModelMonitor(manifest, directory, settings, metrics)
        self.monitor = monitor
        self._batcher = DynamicBatcher(
            manifest.name,
            self._run_batch,
            max_batch_size=settings.max_batch_size,
            max_delay_s=settings.max_queue_delay_s,
            max_queue_size=settings.max_queue_size,
            run_when_idle=settings.run_when_idle,
            metrics=metrics,
            version=str(manifest.version),
            on_batches=self._observe_batches,
        )

    @classmethod
    def load(cls, directory: Path, settings: Settings, metrics: ServiceMetrics) -> ServedModel:
        """Read, check and warm one `<name>/<version>` directory (blocking: call it in a thread)."""
        name, version = directory.parent.name, int(directory.name)
        manifest = read_manifest(directory, name, version)
        model_path = directory / MODEL_FILENAME
        if not model_path.is_file():
            raise ModelLoadError(
                f"model {name!r} version {version}: {MODEL_FILENAME} is missing", reason="missing_file"
            )
        try:
            runtime = OnnxModelRuntime(model_path, manifest, settings)
            # every power-of-two batch up to a full one: kernels are picked and ORT's arena sized for
            # the largest batch before traffic does it
            runtime.warm_up(batch_sizes=warmup_batch_sizes(settings.max_batch_size))
        except ModelLoadError as exc:  # the same reason: the repository counts failures by it
            message = f"model {name!r} version {version}: {exc.message}"
            raise ModelLoadError(message, reason=exc.reason) from exc
        except Exception as exc:
            raise ModelLoadError(f"model {name!r} version {version}: warm-up run failed: {exc}") from exc
        monitor = ModelMonitor(manifest, directory, settings, metrics)  # may open ensemble.onnx
        return cls(directory, manifest, runtime, settings, metrics, monitor)

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self.monitor.start()
        await self._batcher.start()

    async def stop(self) -> None:
        """Stop taking requests and finish every queued one (drain)."""
        await self._batcher.stop()
        await asyncio.to_thread(self.monitor.stop)

    @property
    def ready(self) -> bool:
        return self._batcher.accepting

    @property
    def batch_stats(self) -> BatcherStats:
        return self._batcher.stats()

    def count_refusal(self, reason: str) -> None:
        self._batcher.count_refusal(reason)

    def retry_after_s(self) -> int:
        return self._batcher.retry_after_s()

    @property
    def queue_full(self) -> bool:
        return self._batcher.full

    def has_room(self, unsettled: int) -> bool:
        return self._batcher.has_room(unsettled)

    def seconds_for(self, requests: int) -> float:
        return self._batcher.seconds_for(requests)

    def queue_full_error(self) -> QueueFull:
        return self._batcher.queue_full()

    def refuse_if_full(self) -> None:
        """Raise QueueFull (counted) when `submit` would: lets the edge refuse before reading a body."""
        if self._batcher.full:
            self._batcher.count_refusal("queue_full")
            raise self._batcher.queue_full()

    # ---- contract ----------------------------------------------------------------------------------
    def output_specs(self) -> list[tuple[str, str, list[int]]]:
        return self._output_specs

    def rows_from_lists(self, rows: list[Any]) -> NDArray[np.float32]:
        """JSON rows (V1 instances: nested lists of numbers) as checked float32 `(n, *row_shape)`, or
        BadRequest naming what is wrong."""
        self._check_row_count(len(rows))  # before any array is built: an oversized request costs none
        try:
            array = np.asarray(rows)
        except (ValueError, TypeError, OverflowError) as exc:  # ragged nesting, odd objects
            raise BadRequest(
                f"model {self.name!r}: inputs must be a rectangular array of numbers ({exc})"
            ) from exc
        if array.dtype.kind not in "iuf" or array.dtype == np.bool_:
            raise BadRequest(f"model {self.name!r}: inputs must be numbers (got {array.dtype} values)")
        row_shape = self.manifest.row_shape
        if array.ndim != len(row_shape) + 1 or tuple(array.shape[1:]) != row_shape:
            raise BadRequest(
                f"model {self.name!r} expects rows of shape {list(row_shape)} "
                f"(input [-1, {', '.join(map(str, row_shape))}]), got an array of shape {list(array.shape)}"
            )
        return self._finite_float32(array)

    def rows_from_tensor(self, tensor: NDArray[Any]) -> NDArray[np.float32]:
        """A V2 input tensor already of shape `(n, *row_shape)` (any numeric datatype) as checked
        float32 rows, or BadRequest."""
        self._check_row_count(int(tensor.shape[0]))
        return self._finite_float32(tensor)

    def _check_row_count(self, n: int) -> None:
        if n == 0:
            raise BadRequest(f"model {self.name!r}: no rows to predict (empty input)")
        limit = self._settings.max_request_rows
        if n > limit:
            raise BadRequest(
                f"model {self.name!r}: {n} rows in one request, more than max_request_rows={limit}"
            )

    def _finite_float32(self, array: NDArray[Any]) -> NDArray[np.float32]:
        with np.errstate(over="ignore"):  # beyond float32 range → inf, refused below
            array32 = np.ascontiguousarray(array, dtype=np.float32)
        if not np.isfinite(array32).all():
            bad = np.argwhere(~np.isfinite(array32))[0]
            raise BadRequest(
                f"model {self.name!r}: inputs must be finite; row {int(bad[0])} has a NaN, an Infinity "
                "or a value beyond float32 range"
            )
        return array32

    def submit(
        self,
        rows: NDArray[np.float32],
        *,
        alpha: float | None = None,
        level: float = 0.95,
        include_heads: bool = False,
        timeout_s: float | None = None,
        outputs: Collection[str] | None = None,
    ) -> asyncio.Future[dict[str, NDArray[np.generic]]]:
        """Enqueue `rows` now (synchronously); the future resolves to the answer tensors (only those
        named in `outputs`, when given; the per-head ones only with `include_heads`).

        Everything was checked at the request's edge: `rows` from `rows_from_lists` /
        `rows_from_tensor`, `alpha` and `level` in (0, 1), `timeout_s` > 0 (V1's body model,
        `service.v2_core`). Use it where the answer is awaited in another task (e.g. raced against a
        client disconnect): the rows are queued before this returns. Cancelling the future skips
        rows not yet run.
        """
        alpha = self.default_alpha if alpha is None else alpha
        timeout = self._settings.request_timeout_s if timeout_s is None else timeout_s
        summary = self._batcher.submit(rows, timeout)
        answer: asyncio.Future[dict[str, NDArray[np.generic]]] = asyncio.get_running_loop().create_future()

        def finish(done: asyncio.Future[Outputs]) -> None:
            if answer.done():
                return
            if done.cancelled():
                answer.cancel()
            elif (error := done.exception()) is not None:
                answer.set_exception(error)
            else:
                try:  # the request's own α, level and heads: cheap, vectorised over its rows
                    answer.set_result(
                        inference.finalise(
                            self.manifest,
                            done.result(),
                            alpha=alpha,
                            level=level,
                            include_heads=include_heads,
                            only=outputs,
                        )
                    )
                except Exception as exc:
                    answer.set_exception(exc)

        def skip_if_abandoned(done: asyncio.Future[dict[str, NDArray[np.generic]]]) -> None:
            if done.cancelled():
                summary.cancel()  # the batcher then never runs rows still queued

        summary.add_done_callback(finish)
        answer.add_done_callback(skip_if_abandoned)
        return answer

    def metadata(self) -> dict[str, Any]:
        """What V1 metadata and operators see about this model (V2 metadata is the V2 router's)."""
        m = self.manifest
        stats = self.batch_stats
        return {
            "name": self.name,
            "version": str(self.version),
            "ready": self.ready,
            "platform": "onnxruntime_onnx",
            "provider": self.provider,
            "task": m.task,
            "heads": m.heads,
            "labels": m.labels,
            "input": {"name": m.input.name, "datatype": "FP32", "shape": m.input.shape},
            "feature_names": m.feature_names,
            "ood": {
                "score": m.ood.score,
                "components": [c.score for c in m.ood.components],
                "combination": m.ood.combination,
                "default_alpha": self.default_alpha,
                "calibration_size": len(m.ood.calibration_scores),
            },
            "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in self.output_specs()],
            "evaluation": m.evaluation,
            "batching": {
                "max_batch_size": self._settings.max_batch_size,
                "max_queue_delay_ms": self._settings.max_queue_delay_ms,
                "run_when_idle": self._settings.run_when_idle,
                "batches": stats.batches,
                "rows": stats.rows,
                "max_batch_rows": stats.max_batch_rows,
                "queued_requests": stats.queued_requests,
            },
            **self.monitor.metadata(),
        }

    # ---- batcher hooks -------------------------------------------------------------------------------
    def _run_batch(self, rows: NDArray[np.float32]) -> Mapping[str, NDArray[np.generic]]:
        # worker thread: the graph and the batch-wide math both stay off the event loop
        return inference.summarise(self.manifest, self._calibrator, self._runtime.run(rows))

    def _observe_batches(self, reports: list[BatchReport]) -> None:
        """The delivered batches' answers counted at the default α and fed to the drift alarm and the
        shadow teacher, as one stretch of rows in batch order (one numpy pass for several batches)."""
        report = (
            reports[0] if len(reports) == 1 else _joined(reports, with_inputs=self.monitor.shadow.enabled)
        )
        outputs = report.outputs
        # only the flags depend on α (the conformal rule); the summary has everything else
        flagged = {**outputs, "ood_flag": np.asarray(outputs["ood_p_value"]) <= self.default_alpha}
        self._metrics.observe_uncertainty(
            self.name, str(self.version), flagged, self.default_alpha, self.manifest.labels
        )
        self.monitor.observe(report)  # hands off only: drift on the loop after this, shadow queue


def _joined(reports: list[BatchReport], *, with_inputs: bool) -> BatchReport:
    """Several delivered batches as one report: their rows in batch order (inputs only if wanted)."""
    outputs = {key: np.concatenate([r.outputs[key] for r in reports]) for key in reports[0].outputs}
    inputs = [r.inputs for r in reports if r.inputs is not None]
    return BatchReport(
        rows=sum(r.rows for r in reports),
        requests=sum(r.requests for r in reports),
        compute_seconds=sum(r.compute_seconds for r in reports),
        queue_wait_seconds=np.concatenate([r.queue_wait_seconds for r in reports]),
        outputs=outputs,
        inputs=np.concatenate(inputs) if with_inputs and len(inputs) == len(reports) else None,
    )
