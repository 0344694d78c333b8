"""Shadow teacher: a sampled fraction of served rows also runs through the package's `ensemble.onnx`.

After a batch's answers have gone out, each of its rows is picked with probability `shadow_fraction`
and the picked rows (a copy) go to a bounded queue; one worker thread runs them through the ensemble
(its own ONNX Runtime session, one intra-op thread) and compares, on the same rows, Hydra's served
summaries with the ensemble's — computed with `service.uncertainty`, the same functions the answers
use. Nothing on the answer path waits on it: the queue never blocks (a full queue drops the rows and
counts them), and the worker is a separate thread.

The worker's cost is bounded, whatever the ensemble costs:
- it gathers queued samples into one ensemble run of at least `min_batch` rows (waiting at most
  GATHER_S for them): a one-row run of a large ensemble costs nearly what a 64-row run does (the
  weights are read either way; measured on the 8-teacher mnist1d_wide ensemble, 20 ms for 1 row,
  101 ms for 64), and a batch of a one-row-request server yields 1-3 sampled rows;
- it keeps its busy time to `max_busy` of one core: after a run of t seconds it rests
  t × (1/max_busy − 1) before the next, while samples wait in the queue (a full queue drops them,
  counted). Without the rest, the shadow of that ensemble took 32 % of the server's samples at 0.01.

Fidelity over a rolling window of the last `shadow_window` compared rows: `mi_spearman`,
`label_agreement` and `mi_ratio`, defined in service/fidelity.py.

The measures are recomputed at most once every `FIDELITY_EVERY_S` while samples arrive (a window's
Spearman is two argsorts of `shadow_window` values; Prometheus reads the gauges every 15 s or so),
when the worker has waited that long with nothing queued, and whenever `state()` is read, so the
model's metadata is always the window's exact value and the gauges trail it by about a second.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from service.errors import ModelLoadError
from service.fidelity import FidelityWindow, FloatArray, Sample, pick
from service.manifest import ModelManifest
from service.uncertainty import classification_uncertainty, regression_uncertainty

logger = logging.getLogger(__name__)

ENSEMBLE_FILENAME = "ensemble.onnx"
# The longest the exported measures trail the window while rows are compared (module docstring).
FIDELITY_EVERY_S = 1.0
# The longest a sample waits for others to fill an ensemble run of `min_batch` rows.
GATHER_S = 1.0


class EnsembleRunner:
    """The package's `ensemble.onnx` on CPU, one intra-op thread: the ensemble's own summaries."""

    def __init__(self, path: Path, manifest: ModelManifest) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelLoadError(f"ONNX Runtime cannot load {path.name}: {exc}", reason="onnx") from exc
        self.task = manifest.task
        names = manifest.outputs
        wanted = [names.log_probs] if manifest.task == "classification" else [names.mean, names.variance]
        present = {o.name for o in self._session.get_outputs()}
        missing = [n for n in wanted if n not in present]
        if missing or any(n is None for n in wanted):
            raise ModelLoadError(
                f"{path.name} lacks outputs {missing} of the manifest's contract", reason="manifest"
            )
        self._outputs = [str(n) for n in wanted]
        self._input = manifest.input.name

    def __call__(self, rows: NDArray[np.float32]) -> tuple[FloatArray, FloatArray, FloatArray | None]:
        """The ensemble's epistemic score, top label (classification) or mean (regression), and for
        regression its predictive sd (√ total variance), for `rows`."""
        raw = self._session.run(self._outputs, {self._input: rows})
        if self.task == "classification":
            u = classification_uncertainty(np.asarray(raw[0]))
            return u.mutual_information, u.label.astype(np.float64), None
        r = regression_uncertainty(np.asarray(raw[0]), np.asarray(raw[1]))
        return r.epistemic_variance, r.mean, np.sqrt(r.total_variance)


@dataclass(frozen=True)
class ShadowState:
    enabled: bool
    available: bool
    reason: str | None
    fraction: float
    window: int
    rows: int
    dropped: int
    window_rows: int
    fidelity: dict[str, float] | None
    busy_s: float  # seconds the worker spent in ensemble runs and comparisons
    max_busy: float
    min_batch: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "ensemble_available": self.available,
            "reason": self.reason,
            "fraction": self.fraction,
            "window": self.window,
            "rows": self.rows,
            "dropped_rows": self.dropped,
            "window_rows": self.window_rows,
            "fidelity": self.fidelity,
            "busy_seconds": self.busy_s,
            "max_busy": self.max_busy,
            "min_batch": self.min_batch,
        }


@dataclass(frozen=True)
class ShadowBudget:
    """What the shadow may take (settings `shadow_*`): the fraction of served rows it samples, the
    rolling window's length in rows, the queue's size in samples, the least rows per ensemble run
    and its share of one core."""

    fraction: float
    window: int
    queue_size: int
    min_batch: int = 64
    max_busy: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 < self.max_busy <= 1.0:
            raise ValueError(f"max_busy must be in (0, 1], got {self.max_busy}")


class ShadowTeacher:
    """The bounded queue, the worker thread and the rolling window of one model version.

    `offer(inputs, summary)` is called on the event loop after a batch's answers went out: it only
    samples, copies the picked rows and `put_nowait`s them (dropped and counted when the queue is
    full). `on_rows(n)`, `on_dropped(n)`, `on_busy(seconds)` and `on_fidelity(measures)` report to
    the metrics.
    """

    def __init__(
        self,
        runner: EnsembleRunner | None,
        budget: ShadowBudget,
        *,
        task: str,
        reason: str | None = None,
        seed: int | None = None,
        on_rows: Callable[[int], None] = lambda n: None,
        on_dropped: Callable[[int], None] = lambda n: None,
        on_busy: Callable[[float], None] = lambda s: None,
        on_fidelity: Callable[[dict[str, float]], None] = lambda m: None,
    ) -> None:
        self._runner = runner
        self.min_batch = max(1, budget.min_batch)
        self.max_busy = budget.max_busy
        self.task = task
        self.fraction = budget.fraction if runner is not None else 0.0
        self.requested_fraction = budget.fraction
        self.window = budget.window
        self.reason = reason
        self._rng = np.random.default_rng(seed)
        self._queue: queue.Queue[Sample | None] = queue.Queue(maxsize=budget.queue_size)
        self._on_rows, self._on_dropped, self._on_fidelity = on_rows, on_dropped, on_fidelity
        self._on_busy = on_busy
        self._stopping = threading.Event()  # wakes a resting worker at stop()
        self._busy_s = 0.0
        self._lock = threading.Lock()
        self._window = FidelityWindow(budget.window)
        self._rows = 0
        self._dropped = 0
        self._fidelity: dict[str, float] | None = None
        self._stale = False  # rows compared since the measures were last computed
        self._computed_at = -FIDELITY_EVERY_S  # time.monotonic() of that computation
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.fraction > 0.0

    def start(self, name: str) -> None:
        if self.enabled and self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._work, name=f"shadow-{name}", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the worker: what is queued is dropped (counted), the row in progress finishes."""
        if self._thread is None:
            return
        while True:  # make room for the sentinel without blocking
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            self._queue.task_done()
            if item is not None:
                self._count_dropped(int(item.rows.shape[0]))
        self._stopping.set()
        self._queue.put(None)
        self._thread.join(timeout_s)
        self._thread = None

    def offer(self, inputs: NDArray[np.float32], summary: Mapping[str, NDArray[np.generic]]) -> None:
        if not self.enabled:
            return
        sample = pick(self._rng, self.fraction, inputs, summary, self.task)
        if sample is None:
            return
        try:
            self._queue.put_nowait(sample)
        except queue.Full:
            self._count_dropped(int(sample.rows.shape[0]))

    def _count_dropped(self, n: int) -> None:
        with self._lock:
            self._dropped += n
        self._on_dropped(n)

    def _work(self) -> None:
        assert self._runner is not None
        while True:
            samples = self._gather()
            if samples is None:  # stop()
                return
            if not samples:  # nothing came for FIDELITY_EVERY_S while the measures were stale
                self._refresh(force=True)
                continue
            started = time.monotonic()
            try:
                self.compare(Sample.joined(samples))
            except Exception:  # the shadow must never take the server down
                logger.exception("shadow teacher failed on %d rows", sum(x.rows.shape[0] for x in samples))
            finally:
                for _ in samples:
                    self._queue.task_done()
            busy = time.monotonic() - started
            with self._lock:
                self._busy_s += busy
            self._on_busy(busy)
            # keep to max_busy of one core; samples meanwhile wait in the queue (or are dropped)
            self._stopping.wait(busy * (1.0 / self.max_busy - 1.0))

    def _gather(self) -> list[Sample] | None:
        """The next samples to compare: the first queued one (waiting at most FIDELITY_EVERY_S while
        the measures are stale: [] if none came), then more until `min_batch` rows or GATHER_S.
        None at stop() (what was gathered is dropped and counted)."""
        try:
            first = self._queue.get(timeout=FIDELITY_EVERY_S if self._stale else None)
        except queue.Empty:
            return []
        samples: list[Sample] = []
        item: Sample | None = first
        rows, deadline = 0, time.monotonic() + GATHER_S
        while item is not None:
            samples.append(item)
            rows += int(item.rows.shape[0])
            remaining = deadline - time.monotonic()
            if rows >= self.min_batch or remaining <= 0.0:
                return samples
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                return samples
        # the stop sentinel
        self._queue.task_done()
        for sample in samples:
            self._queue.task_done()
            self._count_dropped(int(sample.rows.shape[0]))
        return None

    def compare(self, sample: Sample) -> None:
        """Run the ensemble on the sample's rows and fold the comparison into the window."""
        assert self._runner is not None
        teacher_epistemic, teacher_point, teacher_sd = self._runner(sample.rows)
        if self.task == "classification":
            assert sample.label is not None
            agree = sample.label == teacher_point.astype(np.int64)
        else:
            assert sample.mean is not None and teacher_sd is not None
            agree = np.abs(sample.mean - teacher_point) <= teacher_sd
        n = int(sample.rows.shape[0])
        with self._lock:
            self._window.add(sample.epistemic, teacher_epistemic, agree)
            self._rows += n
            self._stale = True
        self._on_rows(n)
        self._refresh(force=False)

    def _refresh(self, *, force: bool) -> None:
        """Recompute the window's measures if rows came since the last time and (unless `force`)
        FIDELITY_EVERY_S has passed; export them."""
        with self._lock:
            now = time.monotonic()
            if not self._stale or (not force and now - self._computed_at < FIDELITY_EVERY_S):
                return
            self._stale, self._computed_at = False, now
            measures = self._window.measures()
            if measures is None:
                return
            self._fidelity = measures
        self._on_fidelity(measures)

    def state(self) -> ShadowState:
        self._refresh(force=True)
        with self._lock:
            return ShadowState(
                enabled=self.enabled,
                available=self._runner is not None,
                reason=self.reason,
                fraction=self.fraction,
                window=self.window,
                rows=self._rows,
                dropped=self._dropped,
                window_rows=len(self._window),
                fidelity=dict(self._fidelity) if self._fidelity is not None else None,
                busy_s=self._busy_s,
                max_busy=self.max_busy,
                min_batch=self.min_batch,
            )

    def drain(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued sample has been compared (tests, benches); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True
