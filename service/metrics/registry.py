"""`ServiceMetrics`: every metric family of one app, declared once (see `service.metrics`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry, Counter, Gauge, GCCollector, Histogram, make_asgi_app
from starlette.types import ASGIApp

from service.metrics import buckets
from service.metrics.batch_histogram import BatchHistogram
from service.metrics.buckets import MAX_CLASS_LABELS, OTHER_CLASS, PREFIX, REJECT_REASONS
from service.metrics.multiprocess import exposition_registry, remove_series

Aggregate = Literal["livesum", "livemax", "livemin"]  # the multiprocess modes of our gauges


class ServiceMetrics:
    """All metrics of one app, in the app's own registry (tests run several apps in one process).

    `multiprocess_dir`: this app is one of several worker processes whose values prometheus-client
    writes under that directory (`service.metrics.multiprocess`); /metrics then shows all of them.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, multiprocess_dir: Path | None = None
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        # checked now, not at the first scrape: a worker whose values stay private would undercount
        self._exposition = exposition_registry(multiprocess_dir) if multiprocess_dir else self.registry
        if not multiprocess_dir:  # python_gc_*: collections and their yield (settings.gc_young_threshold);
            GCCollector(registry=self.registry)  # a worker's own would be one process's, merged as all
        # families declared elsewhere (service.monitoring) drop their series of a removed version here
        self.on_remove: list[Callable[[str, str], None]] = []
        r = self.registry
        mv = ("model", "version")

        # Every family: the hydra_ prefix, this app's registry.
        def counter(name: str, doc: str, labels: Sequence[str]) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=r)

        def gauge(name: str, doc: str, labels: Sequence[str], workers: Aggregate) -> Gauge:
            # workers: how /metrics combines several worker processes' values (multiprocess_mode)
            return Gauge(f"{PREFIX}_{name}", doc, labels, registry=r, multiprocess_mode=workers)

        def histogram(name: str, doc: str, bounds: Sequence[float]) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", doc, mv, buckets=bounds, registry=r)

        # every per-row family, so that removing a model version drops each one's series
        self._per_row: list[BatchHistogram] = []

        def per_row(name: str, doc: str, bounds: Sequence[float]) -> BatchHistogram:
            """A per-row distribution of a model version, counted once per batch."""
            family = BatchHistogram(f"{PREFIX}_{name}", doc, mv, bounds)
            r.register(family)
            self._per_row.append(family)
            return family

        # -- HTTP
        self.requests = counter(
            "requests",
            "Requests by protocol (http, grpc), route template (gRPC: the full method), method and "
            "status code (gRPC: the HTTP status its code maps to, e.g. UNAVAILABLE → 503).",
            ("protocol", "route", "method", "code"),
        )
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Request latency (first byte in to last byte out) by protocol, route template and method.",
            ("protocol", "route", "method"),
            buckets=buckets.LATENCY_BUCKETS,
            registry=r,
        )
        # -- batching
        self.queue_wait = per_row(
            "queue_wait_seconds",
            "Time a request waited in the batch queue before its batch ran.",
            buckets.QUEUE_WAIT_BUCKETS,
        )
        self.batch_size = histogram("batch_size_rows", "Rows per executed batch.", buckets.BATCH_ROWS_BUCKETS)
        self.compute_duration = histogram(
            "batch_compute_seconds",
            "Model compute time per executed batch (inference + uncertainty).",
            buckets.LATENCY_BUCKETS,
        )
        self.queue_depth = gauge(
            "queue_depth_rows", "Rows waiting in the batch queue.", ("model",), "livesum"
        )
        self.in_flight = gauge(
            "in_flight_requests", "Inference requests admitted and not yet answered.", ("model",), "livesum"
        )
        self.rejected = counter(
            "rejected_requests",
            "Inference requests rejected (queue_full, deadline, disconnected).",
            ("model", "reason"),
        )
        # -- model lifecycle
        self.model_info = gauge(
            "model_info",
            "Served model: always 1; the labels carry heads and execution provider.",
            ("model", "version", "heads", "provider"),
            "livemax",
        )
        self.model_ready = gauge(
            "model_ready", "1 when the model version is ready to serve, else 0.", mv, "livemin"
        )
        self.load_failures = counter(
            "model_load_failures", "Model load failures by reason.", ("model", "reason")
        )
        # -- uncertainty, per row
        self.predictions = counter("predictions", "Rows predicted.", mv)
        self.ood_flagged = counter(
            "ood_flagged",
            "Rows flagged OOD at the manifest's default alpha (compare with hydra_ood_alpha).",
            mv,
        )
        self.unseen_value_rows = counter(
            "unseen_value_rows",
            "Rows holding at least one value no training row has in a discrete column (models whose "
            "manifest declares an unseen_values output; the combined OOD score ranks these first).",
            mv,
        )
        self.ood_alpha = gauge(
            "ood_alpha", "The manifest's default alpha used for hydra_ood_flagged_total.", mv, "livemax"
        )
        self.ood_p_value = per_row(
            "ood_p_value",
            "Conformal OOD p-values per row (uniform on [0,1] under no shift).",
            buckets.P_VALUE_BUCKETS,
        )
        self.mutual_information = per_row(
            "mutual_information_nats",
            "Mutual information across heads per row (classification).",
            buckets.MUTUAL_INFORMATION_BUCKETS,
        )
        self.density_score = per_row(
            "density_score",
            "Feature-density score per row: squared Mahalanobis distance of the body features to the "
            "nearest class mean (models whose manifest declares a density output).",
            buckets.DENSITY_BUCKETS,
        )
        self.input_density_score = per_row(
            "input_density_score",
            "Input typicality per row: squared Mahalanobis distance of the standardised raw row to the "
            "training mean (models whose manifest declares an input_density output); unusual when "
            "far above or far below its in-distribution values.",
            buckets.INPUT_DENSITY_BUCKETS,
        )
        self.vote_disagreement = per_row(
            "vote_disagreement_ratio",
            "Fraction of heads whose vote differs from the mean prediction, per row (classification).",
            buckets.VOTE_DISAGREEMENT_BUCKETS,
        )
        self.head_spread = per_row(
            "head_spread",
            "Standard deviation of head means per row, in target units (regression).",
            buckets.SPREAD_BUCKETS,
        )
        self.predicted_class = counter(
            "predicted_class",
            f"Rows by predicted class (first {MAX_CLASS_LABELS} labels, then 'other').",
            ("model", "version", "label"),
        )
        self._lock = threading.Lock()
        # (model, version) -> (heads, provider) of its info series, to remove it when the labels change
        self._info_labels: dict[tuple[str, str], tuple[str, str]] = {}
        self._class_labels: dict[tuple[str, str], list[str]] = {}  # exported label values per model version
        self._known: set[tuple[str, str]] = set()
        # labelled children on the hot paths, looked up once: prometheus-client's `labels()` checks
        # and converts its arguments and takes a lock (~1.5 us), a dozen times a one-row batch
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}

    def asgi_app(self) -> ASGIApp:
        """The exposition endpoint (mounted at /metrics): this registry, or every worker's files."""
        app: ASGIApp = make_asgi_app(registry=self._exposition)
        return app

    # -- HTTP -----------------------------------------------------------------------------------------
    def observe_request(
        self, route: str, method: str, status: int, seconds: float, protocol: str = "http"
    ) -> None:
        self.requests.labels(protocol, route, method, str(status)).inc()
        self.request_duration.labels(protocol, route, method).observe(seconds)

    def _child(self, family: Counter | Gauge | Histogram, *labels: str) -> Any:
        """`family.labels(*labels)`, cached until a model version is removed (`remove_model`)."""
        key = (family, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*labels)
        return child

    # -- model lifecycle -----------------------------------------------------------------------------
    def _ensure_model(self, model: str, version: str) -> None:
        """Export zeros for every per-model series, so rates and ratios exist before the first event."""
        with self._lock:
            if (model, version) in self._known:
                return
            self._known.add((model, version))
        for counter in (self.predictions, self.ood_flagged):
            counter.labels(model, version)
        self.batch_size.labels(model, version)
        self.compute_duration.labels(model, version)
        self.queue_wait.touch(model, version)
        self.ood_p_value.touch(model, version)
        self.queue_depth.labels(model)
        self.in_flight.labels(model)
        for reason in REJECT_REASONS:
            self.rejected.labels(model, reason)

    def set_model_info(
        self,
        model: str,
        version: str,
        heads: int,
        provider: str,
        ood_alpha: float | None = None,
        *,
        has_density: bool = False,
        has_input_density: bool = False,
        has_unseen_values: bool = False,
    ) -> None:
        """Info series of a loaded version; `ood_alpha` exports its default α before any traffic, and
        `has_density` / `has_input_density` the zero density / input-typicality histograms (else
        rate() misses the first batch after a load)."""
        self._ensure_model(model, version)
        if ood_alpha is not None:
            self.ood_alpha.labels(model, version).set(ood_alpha)
        if has_density:
            self.density_score.touch(model, version)
        if has_input_density:
            self.input_density_score.touch(model, version)
        if has_unseen_values:
            self.unseen_value_rows.labels(model, version)
        with self._lock:
            previous = self._info_labels.get((model, version))
            self._info_labels[(model, version)] = (str(heads), provider)
        if previous is not None and previous != (str(heads), provider):
            self.model_info.remove(model, version, *previous)
        self.model_info.labels(model, version, str(heads), provider).set(1)

    def set_model_ready(self, model: str, version: str, ready: bool) -> None:
        self._ensure_model(model, version)
        self.model_ready.labels(model, version).set(1 if ready else 0)

    def remove_model(self, model: str, version: str) -> None:
        """Drop every series of an unloaded model version (model-only gauges go with its last version)."""
        self._children.clear()  # a cached child of a removed series would count into nothing
        with self._lock:
            self._known.discard((model, version))
            info = self._info_labels.pop((model, version), None)
            class_labels = self._class_labels.pop((model, version), [])
            last_version = not any(m == model for m, _ in self._known)
        if info is not None:
            remove_series(self.model_info, model, version, *info)
        for metric in (
            self.model_ready,
            self.predictions,
            self.ood_flagged,
            self.unseen_value_rows,
            self.ood_alpha,
            self.batch_size,
            self.compute_duration,
        ):
            remove_series(metric, model, version)
        for hist in self._per_row:
            hist.remove(model, version)
        for label in class_labels:
            remove_series(self.predicted_class, model, version, label)
        for hook in self.on_remove:
            hook(model, version)
        if last_version:
            remove_series(self.queue_depth, model)
            remove_series(self.in_flight, model)
            for reason in REJECT_REASONS:
                remove_series(self.rejected, model, reason)

    def inc_load_failure(self, model: str, reason: str) -> None:
        self.load_failures.labels(model, reason).inc()

    # -- batching ------------------------------------------------------------------------------------
    def set_queue_depth(self, model: str, rows: int) -> None:
        self._child(self.queue_depth, model).set(rows)

    def set_in_flight(self, model: str, requests: int) -> None:
        self._child(self.in_flight, model).set(requests)

    def observe_batch(
        self,
        model: str,
        version: str,
        rows: int,
        compute_seconds: float,
        queue_wait_seconds: NDArray[np.floating],
    ) -> None:
        self._ensure_model(model, version)
        self._child(self.batch_size, model, version).observe(rows)
        self._child(self.compute_duration, model, version).observe(compute_seconds)
        self.queue_wait.observe_many((model, version), queue_wait_seconds)

    def inc_rejected(self, model: str, reason: str) -> None:
        self._child(self.rejected, model, reason).inc()

    # -- uncertainty ---------------------------------------------------------------------------------
    def observe_uncertainty(
        self,
        model: str,
        version: str,
        outputs: dict[str, np.ndarray],
        default_alpha: float,
        label_names: list[str] | None,
    ) -> None:
        """Count one executed batch's rows: predictions, OOD flags, p-values, MI / disagreement, classes,
        and the density scores the model has (`density_score`, `input_density_score` in `outputs`)."""
        self._ensure_model(model, version)
        mv = (model, version)
        flags = np.asarray(outputs["ood_flag"], dtype=bool).ravel()
        self._child(self.predictions, *mv).inc(int(flags.size))
        self._child(self.ood_flagged, *mv).inc(int(np.count_nonzero(flags)))
        self._child(self.ood_alpha, *mv).set(default_alpha)
        self.ood_p_value.observe_many(mv, outputs["ood_p_value"])
        if "density_score" in outputs:  # schema-2 models with a density output, either task
            self.density_score.observe_many(mv, outputs["density_score"])
        if "input_density_score" in outputs:
            self.input_density_score.observe_many(mv, outputs["input_density_score"])
        if "unseen_values" in outputs:  # schema-3 models
            unseen = np.asarray(outputs["unseen_values"]).ravel()
            self._child(self.unseen_value_rows, *mv).inc(int(np.count_nonzero(unseen)))
        if "probabilities" in outputs:  # classification
            self.mutual_information.observe_many(mv, outputs["mutual_information"])
            self.vote_disagreement.observe_many(mv, outputs["disagreement"])
            self._count_classes(
                model,
                version,
                np.asarray(outputs["label"]).ravel(),
                label_names,
                int(np.asarray(outputs["probabilities"]).shape[-1]),
            )
        else:  # regression: disagreement is the spread of head means
            self.head_spread.observe_many(mv, outputs["disagreement"])

    def _count_classes(
        self,
        model: str,
        version: str,
        labels: NDArray[np.generic],
        label_names: list[str] | None,
        classes: int,
    ) -> None:
        names = list(label_names) if label_names else [str(k) for k in range(classes)]
        shown = names[:MAX_CLASS_LABELS]
        exported = shown + ([OTHER_CLASS] if len(names) > MAX_CLASS_LABELS else [])
        with self._lock:
            first_time = (model, version) not in self._class_labels
            self._class_labels[(model, version)] = exported
        if first_time:
            for name in exported:  # zero for every class: a class that never appears is information
                self.predicted_class.labels(model, version, name)
        # One bincount per batch; indices past the cap (or out of range) pool into "other".
        idx = np.clip(labels.astype(np.int64), 0, None)
        counts = np.bincount(np.minimum(idx, len(shown)), minlength=len(shown) + 1)
        for k in np.flatnonzero(counts):  # at most MAX_CLASS_LABELS + 1 iterations, never per row
            name = shown[k] if k < len(shown) else OTHER_CLASS
            self._child(self.predicted_class, model, version, name).inc(int(counts[k]))
