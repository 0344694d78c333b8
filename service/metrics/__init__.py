"""Prometheus metrics for the service: declared once, one `hydra_` prefix, base units, bounded labels.

Label vocabulary (all bounded): `model` and `version` (served models), `route` (the route *template*,
never a raw path), `method`, `code`, `reason` (fixed short vocabularies), `label` (class names, capped
at `MAX_CLASS_LABELS`, the rest pooled into "other"), `heads`/`provider` on the info gauge only.

Per-row distributions (OOD p-value, mutual information, feature density, input typicality,
disagreement, queue wait) are updated once per batch with vectorised bucket counts (`BatchHistogram`).

Every known series is exported with zero as soon as its model is known, so `rate()` and ratios have
data before the first event (an OOD alert must be able to say "0 flagged of N").

Modules, one concern each: `buckets` (names, bucket bounds), `batch_histogram` (`BatchHistogram`),
`registry` (`ServiceMetrics`, every family of one app), `http` (`RequestMetricsMiddleware`),
`multiprocess` (one view of several worker processes: how each gauge aggregates).
"""

from service.metrics.batch_histogram import BatchHistogram
from service.metrics.buckets import (
    BATCH_ROWS_BUCKETS,
    DENSITY_BUCKETS,
    INPUT_DENSITY_BUCKETS,
    LATENCY_BUCKETS,
    MAX_CLASS_LABELS,
    MUTUAL_INFORMATION_BUCKETS,
    OTHER_CLASS,
    P_VALUE_BUCKETS,
    PREFIX,
    QUEUE_WAIT_BUCKETS,
    REJECT_REASONS,
    SPREAD_BUCKETS,
    UNMATCHED_ROUTE,
    VOTE_DISAGREEMENT_BUCKETS,
)
from service.metrics.http import RequestMetricsMiddleware
from service.metrics.registry import ServiceMetrics

__all__ = [
    "BATCH_ROWS_BUCKETS",
    "DENSITY_BUCKETS",
    "INPUT_DENSITY_BUCKETS",
    "LATENCY_BUCKETS",
    "MAX_CLASS_LABELS",
    "MUTUAL_INFORMATION_BUCKETS",
    "OTHER_CLASS",
    "PREFIX",
    "P_VALUE_BUCKETS",
    "QUEUE_WAIT_BUCKETS",
    "REJECT_REASONS",
    "SPREAD_BUCKETS",
    "UNMATCHED_ROUTE",
    "VOTE_DISAGREEMENT_BUCKETS",
    "BatchHistogram",
    "RequestMetricsMiddleware",
    "ServiceMetrics",
]
