"""`BatchHistogram`: a labelled histogram updated with a whole batch of values at once.

prometheus-client's `Histogram` only has a per-value `observe`; per-row distributions (OOD p-value,
mutual information, densities, disagreement, queue wait) are updated once per batch with vectorised
numpy bucket counts, kept per label set and exposed at scrape time. With several worker processes
(`service.metrics.multiprocess`) each batch's bucket counts are also added to prometheus-client's
per-process files, in the layout its `Histogram` writes, so `MultiProcessCollector` sums them.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from prometheus_client import values as prometheus_values
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from service.metrics.multiprocess import multiprocess_active

# per label set: one file-backed value per bucket (non-cumulative, +Inf last) and one for the sum
_FileValues = tuple[list[Any], Any]
# Batches of at most this many values are bucketed with Python's bisect: on a one-row batch the
# dozen numpy calls of the vectorised path cost ~6 us a histogram, five histograms a batch.
SMALL_BATCH = 8


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
        # the bounds as Python floats, for float64 values and rounded to float32 for float32 ones
        self._small_bounds = {
            np.dtype(np.float64): bounds.tolist(),
            np.dtype(np.float32): bounds.astype(np.float32).tolist(),
        }
        self._lock = threading.Lock()
        # label values -> (per-bucket counts incl. +Inf, non-cumulative; sum of observed values)
        self._series: dict[tuple[str, ...], tuple[NDArray[np.int64], list[float]]] = {}
        # several worker processes: the same counts also go to prometheus-client's files
        self._files: dict[tuple[str, ...], _FileValues] | None = {} if multiprocess_active() else None

    def _check(self, labelvalues: tuple[str, ...]) -> None:
        if len(labelvalues) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {labelvalues}")

    def touch(self, *labelvalues: str) -> None:
        """Create the series with zero counts (so it is exported before the first observation)."""
        self._check(labelvalues)
        with self._lock:
            self._series.setdefault(labelvalues, (np.zeros(self._bounds.size + 1, np.int64), [0.0]))
            if self._files is not None:
                self._file_values(labelvalues)

    def _file_values(self, key: tuple[str, ...]) -> _FileValues:
        """The file-backed values of one label set, keyed exactly as prometheus-client's `Histogram`
        keys its own (so `MultiProcessCollector` merges them as one histogram family)."""
        assert self._files is not None
        found = self._files.get(key)
        if found is None:
            value_class, name, doc = prometheus_values.ValueClass, self.name, self.documentation
            bucket_labels = (*self.labelnames, "le")
            edges = [floatToGoString(b) for b in self._bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
            buckets = [
                value_class("histogram", name, f"{name}_bucket", bucket_labels, (*key, e), doc) for e in edges
            ]
            total = value_class("histogram", name, f"{name}_sum", self.labelnames, key, doc)
            found = self._files[key] = (buckets, total)
        return found

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
        small_bounds = self._small_bounds.get(v.dtype) if v.size <= SMALL_BATCH else None
        if small_bounds is not None:
            self._observe_few(key, [x for x in v.tolist() if math.isfinite(x)], small_bounds)
            return
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
            if self._files is not None:
                file_buckets, file_sum = self._file_values(key)
                for i in np.flatnonzero(counts):  # at most len(buckets) + 1 writes, never per row
                    file_buckets[i].inc(float(counts[i]))
                file_sum.inc(total)

    def _observe_few(self, key: tuple[str, ...], values: list[float], bounds: list[float]) -> None:
        """`observe_many` for a few finite values: the same buckets (float32 values against the
        float32-rounded bounds, exact in Python floats), one at a time."""
        indices = [bisect.bisect_left(bounds, x) for x in values]  # bounds[i-1] < x <= bounds[i]
        total = sum(values)
        with self._lock:
            bucket_counts, acc = self._series.setdefault(
                key, (np.zeros(self._bounds.size + 1, np.int64), [0.0])
            )
            for i in indices:
                bucket_counts[i] += 1
            acc[0] += total
            if self._files is not None:
                file_buckets, file_sum = self._file_values(key)
                for i in indices:
                    file_buckets[i].inc(1.0)
                file_sum.inc(total)

    def remove(self, *labelvalues: str) -> None:
        # (the multiprocess files cannot drop a series: see service.metrics.multiprocess)
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
