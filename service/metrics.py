"""Prometheus metrics for the service: declared once, one `hydra_` prefix, base units, bounded labels.

Label vocabulary (all bounded): `model` and `version` (served models), `route` (the route *template*,
never a raw path), `method`, `code`, `reason` (fixed short vocabularies), `label` (class names, capped
at `MAX_CLASS_LABELS`, the rest pooled into "other"), `heads`/`provider` on the info gauge only.

Per-row distributions (OOD p-value, mutual information, feature density, input typicality,
disagreement, queue wait)
are updated once per batch with vectorised bucket counts: prometheus-client's `Histogram` only has a
per-value `observe`, so `BatchHistogram` keeps numpy bucket counts per label set and exposes them at
scrape time.

Every known series is exported with zero as soon as its model is known, so `rate()` and ratios have
data before the first event (an OOD alert must be able to say "0 flagged of N").
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_asgi_app
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PREFIX = "hydra"
MAX_CLASS_LABELS = 50
OTHER_CLASS = "other"
REJECT_REASONS = ("queue_full", "deadline", "disconnected")
UNMATCHED_ROUTE = "unmatched"

# Fixed buckets. p-values are uniform on [0, 1] under no shift whatever the model, so equal-width
# buckets above 0.1 give a flat heatmap; the fine buckets at the bottom contain the usual α values
# (p ≤ α is exactly the bucket `le=α`, the same inequality the flag uses).
P_VALUE_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Mutual information in nats lies in [0, log K]; log-spaced buckets resolve the small ID values.
MUTUAL_INFORMATION_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
# Feature density = squared Mahalanobis distance of the body features: ~ the body width (64–256) on
# ID rows, orders of magnitude more far from the data; log-spaced at 1-2-3-5-7 per decade to 1e6.
DENSITY_BUCKETS = (0.1, 0.2, 0.5, *(float(f"{m}e{e}") for e in range(6) for m in (1, 2, 3, 5, 7)), 1e6)
# Input typicality = squared Mahalanobis distance of the standardised raw row: ~ χ²_d on ID rows, d the
# number of features (2 … 784: medians ~1.4 … ~783), far *below* that on rows scaled towards the mean
# (×0.1: ~d/100) and far above on rows far out; log-spaced 0.01 … 1e6 at 1-2-3-5-7 per decade.
INPUT_DENSITY_BUCKETS = (*(float(f"{m}e{e}") for e in range(-2, 6) for m in (1, 2, 3, 5, 7)), 1e6)
# Classification vote disagreement is the fraction of heads disagreeing with the mean: [0, 1].
VOTE_DISAGREEMENT_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Regression disagreement is the std of head means in target units: scale unknown, so log-spaced wide.
SPREAD_BUCKETS = tuple(float(f"{m}e{e}") for e in range(-3, 4) for m in (1, 2, 5))
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
QUEUE_WAIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class BatchHistogram(Collector):
    """A labelled histogram updated with many values at once (numpy), exposed as a Prometheus histogram.

    Thread-safe: batches may be observed from worker threads while a scrape reads.
    """

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        bounds = np.asarray(sorted(float(b) for b in buckets), dtype=np.float64)
        if bounds.size == 0 or not np.all(np.isfinite(bounds)) or np.any(np.diff(bounds) <= 0):
            raise ValueError(f"{name}: buckets must be finite and strictly increasing, got {buckets}")
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._bounds = bounds
        self._lock = threading.Lock()
        # label values -> (per-bucket counts incl. +Inf, non-cumulative; sum of observed values)
        self._series: dict[tuple[str, ...], tuple[NDArray[np.int64], list[float]]] = {}

    def _check(self, labelvalues: tuple[str, ...]) -> None:
        if len(labelvalues) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {labelvalues}")

    def touch(self, *labelvalues: str) -> None:
        """Create the series with zero counts (so it is exported before the first observation)."""
        self._check(labelvalues)
        with self._lock:
            self._series.setdefault(labelvalues, (np.zeros(self._bounds.size + 1, np.int64), [0.0]))

    def observe_many(
        self, labelvalues: Sequence[str], values: NDArray[np.floating] | Sequence[float]
    ) -> None:
        """Add every value in `values` (any shape). Non-finite values are dropped: they have no bucket
        that means anything and would poison `_sum` forever."""
        key = tuple(labelvalues)
        self._check(key)
        v = np.asarray(values).ravel()
        if not np.issubdtype(v.dtype, np.floating):
            v = v.astype(np.float64)
        v = v[np.isfinite(v)]
        # Compare in the values' own precision: a float32 p-value equal to α (0.05 as float32 is
        # 0.0500000007) must land in the bucket le=α, as it was flagged with p <= α.
        bounds = self._bounds.astype(v.dtype)
        # side="left": index i satisfies bounds[i-1] < v <= bounds[i], the `le` semantics.
        counts = np.bincount(np.searchsorted(bounds, v, side="left"), minlength=self._bounds.size + 1)
        total = float(v.sum(dtype=np.float64))
        with self._lock:
            bucket_counts, acc = self._series.setdefault(
                key, (np.zeros(self._bounds.size + 1, np.int64), [0.0])
            )
            bucket_counts += counts.astype(np.int64)
            acc[0] += total

    def remove(self, *labelvalues: str) -> None:
        with self._lock:
            self._series.pop(tuple(labelvalues), None)

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            snapshot = [(k, c.copy(), a[0]) for k, (c, a) in self._series.items()]
        edges = [_format_bound(b) for b in self._bounds] + ["+Inf"]
        for key, counts, total in snapshot:
            cumulative = np.cumsum(counts)
            family.add_metric(
                list(key), [(e, float(c)) for e, c in zip(edges, cumulative, strict=True)], total
            )
        yield family

    def describe(self) -> Iterable[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)


def _format_bound(bound: float) -> str:
    # The same text prometheus-client uses for `le` (floatToGoString), so bounds like 0.1 read "0.1".
    return repr(float(bound))


class ServiceMetrics:
    """All metrics of one app, in the app's own registry (tests run several apps in one process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        # families declared elsewhere (service.monitoring) drop their series of a removed version here
        self.on_remove: list[Callable[[str, str], None]] = []
        r = self.registry
        p = PREFIX
        mv = ("model", "version")
        # -- HTTP
        self.requests = Counter(
            f"{p}_requests",
            "Requests by protocol (http, grpc), route template (gRPC: the full method), method and "
            "status code (gRPC: the HTTP status its code maps to, e.g. UNAVAILABLE → 503).",
            ("protocol", "route", "method", "code"),
            registry=r,
        )
        self.request_duration = Histogram(
            f"{p}_request_duration_seconds",
            "Request latency (first byte in to last byte out) by protocol, route template and method.",
            ("protocol", "route", "method"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # -- batching
        self.queue_wait = BatchHistogram(
            f"{p}_queue_wait_seconds",
            "Time a request waited in the batch queue before its batch ran.",
            mv,
            QUEUE_WAIT_BUCKETS,
        )
        r.register(self.queue_wait)
        self.batch_size = Histogram(
            f"{p}_batch_size_rows",
            "Rows per executed batch.",
            mv,
            buckets=BATCH_ROWS_BUCKETS,
            registry=r,
        )
        self.compute_duration = Histogram(
            f"{p}_batch_compute_seconds",
            "Model compute time per executed batch (inference + uncertainty).",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            f"{p}_queue_depth_rows", "Rows waiting in the batch queue.", ("model",), registry=r
        )
        self.in_flight = Gauge(
            f"{p}_in_flight_requests",
            "Inference requests admitted and not yet answered.",
            ("model",),
            registry=r,
        )
        self.rejected = Counter(
            f"{p}_rejected_requests",
            "Inference requests rejected (queue_full, deadline, disconnected).",
            ("model", "reason"),
            registry=r,
        )
        # -- model lifecycle
        self.model_info = Gauge(
            f"{p}_model_info",
            "Served model: always 1; the labels carry heads and execution provider.",
            ("model", "version", "heads", "provider"),
            registry=r,
        )
        self.model_ready = Gauge(
            f"{p}_model_ready", "1 when the model version is ready to serve, else 0.", mv, registry=r
        )
        self.load_failures = Counter(
            f"{p}_model_load_failures", "Model load failures by reason.", ("model", "reason"), registry=r
        )
        # -- uncertainty, per row
        self.predictions = Counter(f"{p}_predictions", "Rows predicted.", mv, registry=r)
        self.ood_flagged = Counter(
            f"{p}_ood_flagged",
            "Rows flagged OOD at the manifest's default alpha (compare with hydra_ood_alpha).",
            mv,
            registry=r,
        )
        self.ood_alpha = Gauge(
            f"{p}_ood_alpha", "The manifest's default alpha used for hydra_ood_flagged_total.", mv, registry=r
        )
        self.ood_p_value = BatchHistogram(
            f"{p}_ood_p_value",
            "Conformal OOD p-values per row (uniform on [0,1] under no shift).",
            mv,
            P_VALUE_BUCKETS,
        )
        self.mutual_information = BatchHistogram(
            f"{p}_mutual_information_nats",
            "Mutual information across heads per row (classification).",
            mv,
            MUTUAL_INFORMATION_BUCKETS,
        )
        self.density_score = BatchHistogram(
            f"{p}_density_score",
            "Feature-density score per row: squared Mahalanobis distance of the body features to the "
            "nearest class mean (models whose manifest declares a density output).",
            mv,
            DENSITY_BUCKETS,
        )
        self.input_density_score = BatchHistogram(
            f"{p}_input_density_score",
            "Input typicality per row: squared Mahalanobis distance of the standardised raw row to the "
            "training mean (models whose manifest declares an input_density output); unusual when "
            "far above or far below its in-distribution values.",
            mv,
            INPUT_DENSITY_BUCKETS,
        )
        self.vote_disagreement = BatchHistogram(
            f"{p}_vote_disagreement_ratio",
            "Fraction of heads whose vote differs from the mean prediction, per row (classification).",
            mv,
            VOTE_DISAGREEMENT_BUCKETS,
        )
        self.head_spread = BatchHistogram(
            f"{p}_head_spread",
            "Standard deviation of head means per row, in target units (regression).",
            mv,
            SPREAD_BUCKETS,
        )
        for collector in (
            self.ood_p_value,
            self.mutual_information,
            self.density_score,
            self.input_density_score,
            self.vote_disagreement,
            self.head_spread,
        ):
            r.register(collector)
        self.predicted_class = Counter(
            f"{p}_predicted_class",
            f"Rows by predicted class (first {MAX_CLASS_LABELS} labels, then 'other').",
            ("model", "version", "label"),
            registry=r,
        )
        self._lock = threading.Lock()
        # (model, version) -> (heads, provider) of its info series, to remove it when the labels change
        self._info_labels: dict[tuple[str, str], tuple[str, str]] = {}
        self._class_labels: dict[tuple[str, str], list[str]] = {}  # exported label values per model version
        self._known: set[tuple[str, str]] = set()

    def asgi_app(self) -> ASGIApp:
        """The exposition endpoint for this registry (mounted at /metrics)."""
        app: ASGIApp = make_asgi_app(registry=self.registry)
        return app

    # -- HTTP -----------------------------------------------------------------------------------------
    def observe_request(
        self, route: str, method: str, status: int, seconds: float, protocol: str = "http"
    ) -> None:
        self.requests.labels(protocol, route, method, str(status)).inc()
        self.request_duration.labels(protocol, route, method).observe(seconds)

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
        with self._lock:
            self._known.discard((model, version))
            info = self._info_labels.pop((model, version), None)
            class_labels = self._class_labels.pop((model, version), [])
            last_version = not any(m == model for m, _ in self._known)
        if info is not None:
            _remove(self.model_info, model, version, *info)
        for metric in (
            self.model_ready,
            self.predictions,
            self.ood_flagged,
            self.ood_alpha,
            self.batch_size,
            self.compute_duration,
        ):
            _remove(metric, model, version)
        for hist in (
            self.queue_wait,
            self.ood_p_value,
            self.mutual_information,
            self.density_score,
            self.input_density_score,
            self.vote_disagreement,
            self.head_spread,
        ):
            hist.remove(model, version)
        for label in class_labels:
            _remove(self.predicted_class, model, version, label)
        for hook in self.on_remove:
            hook(model, version)
        if last_version:
            _remove(self.queue_depth, model)
            _remove(self.in_flight, model)
            for reason in REJECT_REASONS:
                _remove(self.rejected, model, reason)

    def inc_load_failure(self, model: str, reason: str) -> None:
        self.load_failures.labels(model, reason).inc()

    # -- batching ------------------------------------------------------------------------------------
    def set_queue_depth(self, model: str, rows: int) -> None:
        self.queue_depth.labels(model).set(rows)

    def set_in_flight(self, model: str, requests: int) -> None:
        self.in_flight.labels(model).set(requests)

    def observe_batch(
        self,
        model: str,
        version: str,
        rows: int,
        compute_seconds: float,
        queue_wait_seconds: NDArray[np.floating],
    ) -> None:
        self._ensure_model(model, version)
        self.batch_size.labels(model, version).observe(rows)
        self.compute_duration.labels(model, version).observe(compute_seconds)
        self.queue_wait.observe_many((model, version), queue_wait_seconds)

    def inc_rejected(self, model: str, reason: str) -> None:
        self.rejected.labels(model, reason).inc()

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
        self.predictions.labels(*mv).inc(int(flags.size))
        self.ood_flagged.labels(*mv).inc(int(np.count_nonzero(flags)))
        self.ood_alpha.labels(*mv).set(default_alpha)
        self.ood_p_value.observe_many(mv, outputs["ood_p_value"])
        if "density_score" in outputs:  # schema-2 models with a density output, either task
            self.density_score.observe_many(mv, outputs["density_score"])
        if "input_density_score" in outputs:
            self.input_density_score.observe_many(mv, outputs["input_density_score"])
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
            self.predicted_class.labels(model, version, name).inc(int(counts[k]))


def _remove(metric: Counter | Gauge | Histogram, *labelvalues: str) -> None:
    with contextlib.suppress(KeyError):  # never created: nothing to drop
        metric.remove(*labelvalues)


class RequestMetricsMiddleware:
    """Pure ASGI middleware: one `observe_request` per HTTP request, labelled with the route template.

    The template comes from the route that handled the request (FastAPI puts it in `scope["route"]`),
    or, for mounted apps such as /metrics, from matching the app's routes; anything unmatched is
    `UNMATCHED_ROUTE`, so scanning for random paths cannot grow the label set.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        # Routers rewrite scope (root_path, path params) while dispatching; match against the original.
        original_scope = dict(scope)
        status = 500  # if the app dies before starting a response, the server answers 500
        recorded = False

        def record() -> None:
            nonlocal recorded
            if not recorded:
                recorded = True
                self.metrics.observe_request(
                    _route_template(scope, original_scope),
                    scope.get("method", "GET"),
                    status,
                    time.perf_counter() - start,
                )

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record()

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            record()


def _route_template(scope: Scope, original_scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    app = original_scope.get("app", scope.get("app"))
    router = getattr(app, "router", None)
    for candidate in getattr(router, "routes", ()):
        try:
            match, _ = candidate.matches(dict(original_scope))
        except Exception:  # a route that cannot judge this scope is not the one that served it
            continue
        if match == Match.FULL:
            candidate_path = getattr(candidate, "path", None)
            if isinstance(candidate_path, str):
                return candidate_path or "/"
    return UNMATCHED_ROUTE
