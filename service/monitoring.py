"""Live monitoring of one served model version: the drift alarm and the shadow teacher.

`ModelMonitor.observe(report)` is called on the event loop after a batch's answers have been
delivered (the batcher's `on_batches` hook, which joins the batches delivered meanwhile into one
report under load). The batch's drift update (~4 µs per row) is queued on
the loop with `call_soon`, behind the answers the batch just released, in batch order; a
`shadow_fraction` sample of its rows goes to the shadow teacher's bounded queue and worker thread.
No answer waits on either.

Metric families live here (registered on the app's `ServiceMetrics` registry), not in
`service.metrics`:
- `hydra_drift_martingale_log10{model,version}`: log10 of the current run's martingale;
- `hydra_drift_alarm_threshold_log10{model,version}`: log10(1/δ), the alarm line;
- `hydra_drift_alarms_total{model,version}`: alarms raised (each restarts the martingale);
- `hydra_shadow_rows_total`, `hydra_shadow_dropped_total{model,version}`: rows compared / dropped;
- `hydra_shadow_busy_seconds_total{model,version}`: the shadow worker's busy time (its cost);
- `hydra_shadow_fraction{model,version}`: the sampled fraction (0 when off or no ensemble);
- `hydra_shadow_fidelity{model,version,measure}`: the rolling window's measures (service.shadow).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from prometheus_client import Counter, Gauge

from service.batch_request import BatchReport
from service.drift import DriftMonitor
from service.errors import ModelLoadError
from service.fidelity import MEASURES
from service.manifest import ModelManifest
from service.metrics import PREFIX, ServiceMetrics
from service.metrics.multiprocess import remove_series
from service.settings import Settings
from service.shadow import ENSEMBLE_FILENAME, EnsembleRunner, ShadowBudget, ShadowTeacher

logger = logging.getLogger(__name__)
ALARM_LOG_INTERVAL_S = 60.0


class MonitoringMetrics:
    """The drift and shadow metric families of one app's registry (one instance per registry)."""

    _instances: ClassVar[weakref.WeakKeyDictionary[ServiceMetrics, MonitoringMetrics]] = (
        weakref.WeakKeyDictionary()
    )

    @classmethod
    def of(cls, metrics: ServiceMetrics) -> MonitoringMetrics:
        found = cls._instances.get(metrics)
        if found is None:
            found = cls._instances[metrics] = cls(metrics)
        return found

    def __init__(self, metrics: ServiceMetrics) -> None:
        r, p, mv = metrics.registry, PREFIX, ("model", "version")
        self.martingale = Gauge(
            f"{p}_drift_martingale_log10",
            "log10 of the drift alarm's conformal test martingale (current run; alarm at the threshold).",
            mv,
            registry=r,
            multiprocess_mode="livemax",  # each worker tests the rows it served: the highest
        )
        self.threshold = Gauge(
            f"{p}_drift_alarm_threshold_log10",
            "log10(1/delta): the drift alarm fires when the martingale reaches it.",
            mv,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.alarms = Counter(
            f"{p}_drift_alarms",
            "Drift alarms (P(false alarm) <= delta per run-to-alarm); each restarts the martingale.",
            mv,
            registry=r,
        )
        self.shadow_rows = Counter(
            f"{p}_shadow_rows", "Served rows also run through the ensemble (shadow teacher).", mv, registry=r
        )
        self.shadow_dropped = Counter(
            f"{p}_shadow_dropped",
            "Sampled rows the shadow teacher dropped because its queue was full.",
            mv,
            registry=r,
        )
        self.shadow_busy = Counter(
            f"{p}_shadow_busy_seconds",
            "Wall seconds the shadow worker spent running the ensemble and comparing (an upper bound on "
            "its CPU time; kept to shadow_max_busy of one core).",
            mv,
            registry=r,
        )
        self.shadow_fraction = Gauge(
            f"{p}_shadow_fraction",
            "Fraction of served rows sampled for the shadow teacher (0: off or no ensemble.onnx).",
            mv,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.fidelity = Gauge(
            f"{p}_shadow_fidelity",
            "Hydra vs its ensemble on the shadow window: mi_spearman, label_agreement, mi_ratio.",
            (*mv, "measure"),
            registry=r,
            multiprocess_mode="livemostrecent",  # the window the last worker computed
        )
        metrics.on_remove.append(self.remove)

    def remove(self, model: str, version: str) -> None:
        for metric in (
            self.martingale,
            self.threshold,
            self.alarms,
            self.shadow_rows,
            self.shadow_dropped,
            self.shadow_busy,
            self.shadow_fraction,
        ):
            remove_series(metric, model, version)
        for measure in MEASURES:
            remove_series(self.fidelity, model, version, measure)


def _shadow_runner(
    directory: Path, manifest: ModelManifest, fraction: float
) -> tuple[EnsembleRunner | None, str | None]:
    path = directory / ENSEMBLE_FILENAME
    if not path.is_file():
        return None, f"no {ENSEMBLE_FILENAME} in the package"
    if fraction <= 0.0:
        return None, "shadow_fraction is 0"
    try:
        return EnsembleRunner(path, manifest), None
    except ModelLoadError as exc:
        logger.error(
            "model %s version %s: shadow teacher off: %s", manifest.name, manifest.version, exc.message
        )
        return None, exc.message


class ModelMonitor:
    """Drift alarm + shadow teacher of one model version. Build with `load` (blocking: it may open
    the ensemble's session), then `start()`; `observe` per batch; `stop()` on retirement."""

    def __init__(
        self, manifest: ModelManifest, directory: Path, settings: Settings, metrics: ServiceMetrics
    ) -> None:
        self.name, self.version = manifest.name, str(manifest.version)
        self._metrics = MonitoringMetrics.of(metrics)
        self.drift = DriftMonitor(manifest.ood.calibration_scores, delta=settings.drift_delta)
        runner, reason = _shadow_runner(directory, manifest, settings.shadow_fraction)
        self.has_ensemble = (directory / ENSEMBLE_FILENAME).is_file()
        labels = (self.name, self.version)
        budget = ShadowBudget(
            settings.shadow_fraction,
            settings.shadow_window,
            settings.shadow_queue_size,
            settings.shadow_min_batch,
            settings.shadow_max_busy,
        )
        self.shadow = ShadowTeacher(
            runner,
            budget,
            task=manifest.task,
            reason=reason,
            on_rows=self._metrics.shadow_rows.labels(*labels).inc,
            on_dropped=self._metrics.shadow_dropped.labels(*labels).inc,
            on_busy=self._metrics.shadow_busy.labels(*labels).inc,
            on_fidelity=self._set_fidelity,
        )
        self._running = False
        self._last_log = -ALARM_LOG_INTERVAL_S
        # every series exported from the load on (zeros), so rate() and alerts have data at once
        self._metrics.martingale.labels(*labels).set(0.0)
        self._metrics.threshold.labels(*labels).set(self.drift.state().alarm_threshold_log10)
        self._metrics.alarms.labels(*labels)
        self._metrics.shadow_fraction.labels(*labels).set(self.shadow.fraction)

    def start(self) -> None:
        self._running = True
        self.shadow.start(self.name)

    def stop(self) -> None:
        self._running = False
        self.shadow.stop()

    def observe(self, report: BatchReport) -> None:
        """Queue one delivered batch's drift update on the event loop, behind the answers it just
        released, and hand a sample to the shadow queue.

        Not in a worker thread: a third thread contending for the GIL after every batch delayed the
        ORT thread's hand-back of finished batches (bench server, digits, 32-row requests: 22k →
        9k rows/s), while the update itself is ~0.3 ms of vectorised numpy per 64-row batch."""
        if self._running:
            scores = np.asarray(report.outputs["ood_score"], dtype=np.float64)
            asyncio.get_running_loop().call_soon(self._drift_update, scores)
        if report.inputs is not None:
            self.shadow.offer(report.inputs, report.outputs)

    def _drift_update(self, scores: np.ndarray[Any, Any]) -> None:
        try:
            raised = len(self.drift.observe(scores))
            labels = (self.name, self.version)
            if raised:
                self._metrics.alarms.labels(*labels).inc(raised)
                state = self.drift.state()
                now = time.monotonic()
                # while a shift lasts, alarms come every few rows: one log line a minute at most
                if now - self._last_log >= ALARM_LOG_INTERVAL_S:
                    self._last_log = now
                    logger.warning(
                        "drift alarm on %s version %s at row %s (%d alarms so far): the martingale "
                        "reached 1/delta = %g; restarted",
                        self.name,
                        self.version,
                        state.last_alarm_row,
                        state.alarms,
                        1.0 / state.delta,
                    )
            self._metrics.martingale.labels(*labels).set(self.drift.state().martingale_log10)
        except Exception:  # monitoring must never break serving
            logger.exception("drift update failed for %s version %s", self.name, self.version)

    def _set_fidelity(self, measures: dict[str, float]) -> None:
        for measure, value in measures.items():
            self._metrics.fidelity.labels(self.name, self.version, measure).set(value)

    def metadata(self) -> dict[str, Any]:
        shadow = self.shadow.state().as_dict()
        shadow["ensemble_in_package"] = self.has_ensemble
        return {"drift": self.drift.state().as_dict(), "shadow": shadow}
