"""Prometheus multiprocess mode: one /metrics view of every worker process (`--workers N`).

prometheus-client keeps each process's values in mmap files under `PROMETHEUS_MULTIPROC_DIR`. The
choice is made when `prometheus_client` is first imported, so the supervisor (`service.workers`)
sets the variable before it starts any worker; `MultiProcessCollector` merges the files of every
process at scrape time, so /metrics from any worker shows the whole server:

- counters and histograms are summed over all worker processes, dead ones included: the requests a
  worker answered stay counted after it exits, and totals never go down;
- gauges merge as each declares with `multiprocess_mode`, always a `live*` mode, so the gauges of a
  dead worker vanish once the supervisor calls `mark_process_dead` (done for every worker exit):
  queue depth and in-flight requests are summed (`livesum`); the info, α, drift-threshold and
  shadow-fraction gauges are the same in every worker (`livemax`); `hydra_model_ready` is 1 only
  where every worker serving that version says so (`livemin`); the drift martingale is the largest
  over workers (`livemax`: each worker tests the rows it served); shadow fidelity is the window the
  last worker computed (`livemostrecent`).

prometheus-client cannot remove a series from its files. `remove_series` sets a removed gauge to NaN
in this worker's file, and the exposition leaves out gauge series that merge to NaN: once every
worker has dropped a version (a reload or unload is applied by all of them), its gauges are gone, as
with one process (so `hydra_model_ready == 0` does not fire for a retired version). Counters and
histograms of a retired version stay exported with their last totals, constant (no alert reads a
rate of zero), until the server restarts. With one process nothing here applies: series are removed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_active() -> bool:
    """True when this process writes its metric values to the multiprocess files."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def exposition_registry(directory: Path) -> CollectorRegistry:
    """A registry whose only collector merges every process's files in `directory` (for /metrics)."""
    if not multiprocess_active():
        raise RuntimeError(
            f"metrics of several workers need {ENV_VAR}={directory} in the environment before "
            "prometheus_client is imported"
        )
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_MergedWithoutRemoved(directory))
    return registry


class _MergedWithoutRemoved(Collector):
    """Every process's files merged (`MultiProcessCollector`), less the gauge series removed (NaN)."""

    def __init__(self, directory: Path) -> None:
        self._merged = MultiProcessCollector(None, path=str(directory))  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        for metric in self._merged.collect():  # type: ignore[no-untyped-call]
            if metric.type == "gauge":
                metric.samples = [s for s in metric.samples if not math.isnan(s.value)]
            yield metric


def remove_series(metric: Counter | Gauge | Histogram, *labelvalues: str) -> None:
    """Drop one series (single process), or mark a gauge's as removed (multiprocess: see above)."""
    if multiprocess_active():
        if isinstance(metric, Gauge):
            metric.labels(*labelvalues).set(math.nan)
        return
    with contextlib.suppress(KeyError):  # never created: nothing to drop
        metric.remove(*labelvalues)
