"""Per-model dynamic batcher: requests of any size in, one model run per batch, each row's answer back.

Composition in the style of Ray Serve's `_BatchQueue`: routes `submit()` rows and await the returned
future; one loop task forms batches and runs them in a worker thread. Invariants:

- a batch runs when it holds `max_batch_size` rows, or when the oldest queued request has waited
  `max_delay_s` (deadline = its arrival time + max delay), or at once while stopping;
- with `run_when_idle` (the service's default) a request that arrives while no batch is running
  waits only for clients just answered that have not come back yet, at most one run's fixed cost
  (service/batch_cost.py), and runs with whatever else is queued: a lone request never waits for
  company on an idle model. The full delay applies only to requests that arrived while a batch
  was running — traffic dense enough that waiting fills the next batch. `run_when_idle=False` is
  Triton's rule: every partial batch waits out the delay;
- while a batch runs, a full next batch is staged behind it in the model thread (at most one), so
  the model goes from batch to batch without waiting for the event loop; a partial batch waits
  for the model to be free (it fills meanwhile). Answers come back in batch order;
- a request larger than the room left in a batch is split; its parts are re-joined in order;
- the model must return exactly one result per input row (checked; otherwise the batch fails);
- a request still queued at its deadline is dropped before it runs (DeadlineExceeded) and a
  cancelled request (client gone) is skipped, so neither costs a model run;
- every future is settled, also when the model raises (ModelRunError for that batch only);
- the queue is bounded in requests; beyond it `submit` raises QueueFull at once;
- `stop()` stops accepting, runs what is queued without waiting for the delay, then returns;
- each delivered batch is reported (its metrics, `on_batches`) once, after its answers, in groups
  (service/batch_reports.py): when the batcher is next idle (nothing queued, nothing running: the
  answers are written by then), or when a group is full while it is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.batch_cost import DrainRate, ReturningCompany
from service.batch_reports import GroupedBatchReporter
from service.batch_request import BatcherStats, BatchReport, Outputs, QueuedRequest, RowSlice
from service.errors import DeadlineExceeded, ModelRunError, ModelUnavailable, QueueFull, ServiceError
from service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

RunFn = Callable[[NDArray[np.float32]], Mapping[str, NDArray[np.generic]]]


class DynamicBatcher:
    """One per model. `run` is blocking (ONNX Runtime) and is called in a dedicated worker thread.

    `metrics`: the batcher's own series go there as they change (refusals by reason, queue depth,
    requests in flight, batch size, compute time, queue waits) under `name` and `version`;
    `on_batches`: what the model does with delivered batches, in batch order (its answers' metrics,
    monitoring); called on the event loop as the module docstring says.
    """

    def __init__(
        self,
        name: str,
        run: RunFn,
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_size: int,
        run_when_idle: bool = False,
        metrics: ServiceMetrics | None = None,
        version: str = "",
        on_batches: Callable[[list[BatchReport]], None] | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self._run = run
        self._max_batch = max_batch_size
        self._max_delay = max_delay_s
        self._max_queue = max_queue_size
        self._run_when_idle = run_when_idle
        self._metrics = metrics
        self._reporter = GroupedBatchReporter(name, version, metrics, on_batches)
        self._state_pending = False  # the gauges' update is scheduled
        self._queue: deque[QueuedRequest] = deque()
        self._queued_requests = 0
        self._queued_rows = 0
        self._in_flight = 0
        self._executions: set[asyncio.Future[None]] = set()  # batches started, not yet delivered
        self._in_model = 0  # of those, the ones the model thread has not returned yet (at most 2)
        self._drain = DrainRate()
        self._company = ReturningCompany(cap=max_batch_size)
        self._batches = 0
        self._rows_run = 0
        self._max_batch_rows = 0
        self._wake = asyncio.Event()
        self._accepting = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"batcher {self.name} already started")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{self.name}")
        self._accepting = True
        self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Stop accepting, run everything already queued (no delay), wait for it, release the thread."""
        self._accepting = False
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await asyncio.shield(self._task)
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def full(self) -> bool:
        """The queue holds `max_queue_size` requests: `submit` would refuse."""
        return self._queued_requests >= self._max_queue

    def has_room(self, unsettled: int) -> bool:
        """Would one more request find room in the queue after `unsettled` requests the caller holds
        (queued, running, or not yet submitted: those not yet in the batcher count as queued)?"""
        return self._queued_requests + max(0, unsettled - self._in_flight) < self._max_queue

    def seconds_for(self, requests: int) -> float:
        """How long the model takes to run `requests` more requests of the queue's mean size at its
        recent drain rate (its compute speed: steady while the event loop is slow); inf before any."""
        rows = self._queued_rows / self._queued_requests if self._queued_requests else 1.0
        return self._drain.seconds_for(requests * rows)

    def retry_after_s(self) -> int:
        """Whole seconds until what is queued now has run at the recent drain rate (1 … 60)."""
        return self._drain.retry_after_s(self._queued_rows)

    def queue_full(self) -> QueueFull:
        message = f"queue of model {self.name!r} is full ({self._max_queue} requests waiting); retry later"
        return QueueFull(message, retry_after_s=self.retry_after_s())

    def stats(self) -> BatcherStats:
        counts = (self._batches, self._rows_run, self._max_batch_rows)
        return BatcherStats(*counts, self._queued_requests, self._queued_rows)

    # ---- submission ------------------------------------------------------------------------------
    def submit(self, rows: NDArray[np.float32], timeout_s: float | None = None) -> asyncio.Future[Outputs]:
        """Queue `rows` (n, ...) and return the future of their outputs (each with leading dim n).

        Synchronous on purpose: once `submit` returns, the request is in this batcher's queue, so a
        model swap between a route's lookup and its `await` cannot lose it.
        """
        if not self._accepting:
            raise ModelUnavailable(f"model {self.name!r} is not accepting requests (stopping or reloading)")
        if self.full:
            self.count_refusal("queue_full")
            raise self.queue_full()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outputs] = loop.create_future()
        request = QueuedRequest(rows, future, loop.time(), self._running)
        if timeout_s is not None:
            request.timer = loop.call_later(timeout_s, self._expire, request, timeout_s)
        future.add_done_callback(functools.partial(self._settled, request))
        self._queue.append(request)
        self._company.arrived()
        self._queued_requests += 1
        self._queued_rows += request.n
        self._in_flight += 1
        self._publish_state()
        self._wake.set()
        return future

    def _unqueue(self, request: QueuedRequest) -> None:
        if request.queued:
            request.queued = False
            self._queued_requests -= 1
            self._queued_rows -= request.n - request.cursor
        if request.timer is not None:
            request.timer.cancel()
            request.timer = None

    def _expire(self, request: QueuedRequest, timeout_s: float) -> None:
        if not request.queued or request.cursor > 0 or request.future.done():
            return  # already (partly) running: let it finish
        self._unqueue(request)
        self.count_refusal("deadline")
        request.fail(
            DeadlineExceeded(
                f"request waited {timeout_s:g}s in the queue of model {self.name!r} without running"
            )
        )

    def _settled(self, request: QueuedRequest, _: asyncio.Future[Outputs]) -> None:
        self._in_flight -= 1
        if request.future.cancelled() and request.queued:
            # the client went away before its rows ran: free its slot, never run it
            self._unqueue(request)
            self.count_refusal("disconnected")
        self._publish_state()

    def count_refusal(self, reason: str) -> None:
        """Count a request refused or dropped (`hydra_rejected_total{reason}`): queue_full, deadline,
        disconnected, or the edge's own reasons."""
        if self._metrics is not None:
            self._metrics.inc_rejected(self.name, reason)

    def _publish_state(self) -> None:
        """Set the queue-depth and in-flight gauges once this step of the event loop is over: a
        submit, a take and a settle each change them, many in one step under load."""
        if self._metrics is not None and not self._state_pending:
            self._state_pending = True
            asyncio.get_running_loop().call_soon(self._write_state)

    def _write_state(self) -> None:
        self._state_pending = False
        if self._metrics is not None:
            self._metrics.set_queue_depth(self.name, self._queued_rows)
            self._metrics.set_in_flight(self.name, self._in_flight)

    # ---- batch loop ------------------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._drop_dead_head()
                if not self._queue:
                    if self._stopping:
                        break
                    if not self._executions:  # idle: the answers are out, now the bookkeeping
                        self._reporter.flush()
                    await self._sleep_until_woken()
                    continue
                if self._executions:
                    # A batch is in the model. A full next batch (or any, when stopping) is staged
                    # behind it at once, so the model goes from batch to batch without waiting for
                    # this loop to come round — under overload the loop is slow to (issue 13). A
                    # partial batch waits for the model to be free, and fills meanwhile.
                    if not self._stage_full_batch():
                        await self._sleep_until_woken()
                    continue
                head = self._queue[0]
                found_idle = self._run_when_idle and not head.arrived_busy
                if found_idle:
                    # on an idle model wait only while a client just answered is out, for at most a
                    # run's fixed cost; one pass of the loop lets requests already read join first
                    await asyncio.sleep(0)
                delay = min(self._max_delay, self._company.wait_s()) if found_idle else self._max_delay
                flush_at = head.enqueued_at + delay
                while self._queued_rows < self._max_batch and not self._stopping:
                    remaining = flush_at - loop.time()
                    if remaining <= 0 or (found_idle and not self._company.outstanding):
                        break  # waited out, or (idle model) everyone answered is back
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), remaining)
                if found_idle:
                    self._company.stop_waiting()
                self._start(self._take_batch())
            while self._executions:  # stopping: the last batches finish before the loop returns
                await asyncio.wait(set(self._executions))
            self._reporter.flush()
        except BaseException:
            logger.exception("batch loop of model %s stopped unexpectedly", self.name)
            raise
        finally:
            # Normally the queue is empty here (stop() drained it). If the loop was cancelled or
            # broke, refuse new work and settle everything left so no caller waits forever.
            self._accepting = False
            for execution in self._executions:
                execution.cancel()  # its batch's requests are failed as it unwinds
            for request in self._queue:
                self._unqueue(request)
                request.fail(ModelUnavailable(f"model {self.name!r} stopped before this request ran"))
            self._queue.clear()

    async def _sleep_until_woken(self) -> None:
        self._wake.clear()
        await self._wake.wait()

    def _start(self, batch: list[tuple[QueuedRequest, int, int]]) -> None:
        """Run `batch`: handed to the model thread now (behind any batch already there)."""
        if not batch:
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        parts = [req.rows[a:b] for req, a, b in batch]
        inputs = parts[0] if len(parts) == 1 else np.concatenate(parts)
        run = loop.run_in_executor(self._executor, self._timed_run, inputs)
        self._in_model += 1
        execution = asyncio.ensure_future(self._execute(batch, inputs, run, started))
        self._executions.add(execution)
        execution.add_done_callback(self._execution_done)

    def _execution_done(self, execution: asyncio.Future[None]) -> None:
        self._executions.discard(execution)
        self._wake.set()

    @property
    def _running(self) -> bool:
        """A batch is in the model thread (running, or staged behind one); not the executions still
        being delivered, or a caller that resubmits as soon as its answer is set waits out the delay."""
        return self._in_model > 0

    def _drop_dead_head(self) -> None:
        while self._queue and not self._queue[0].queued:
            self._queue.popleft()

    def _take_batch(self) -> list[tuple[QueuedRequest, int, int]]:
        batch: list[tuple[QueuedRequest, int, int]] = []
        room = self._max_batch
        while self._queue and room > 0:
            request = self._queue[0]
            if not request.queued or request.future.done():  # expired, cancelled, or an earlier part failed
                self._unqueue(request)
                self._queue.popleft()
                continue
            if request.timer is not None:  # it starts now: its deadline no longer applies
                request.timer.cancel()
                request.timer = None
            take = min(room, request.n - request.cursor)
            batch.append((request, request.cursor, request.cursor + take))
            request.cursor += take
            self._queued_rows -= take
            room -= take
            if request.cursor == request.n:
                request.queued = False
                self._queued_requests -= 1
                self._queue.popleft()
        self._publish_state()
        return batch

    def _timed_run(self, inputs: NDArray[np.float32]) -> tuple[Mapping[str, NDArray[np.generic]], float]:
        """The model run and its duration, both in the model thread (a staged batch's wait for the
        batch ahead of it is not compute time)."""
        t0 = time.perf_counter()
        outputs = self._run(inputs)
        return outputs, time.perf_counter() - t0

    def _stage_full_batch(self) -> bool:
        """Hand a full next batch (any, when stopping) to the model thread now, behind the one it
        runs, unless one is staged already: called as the model returns a batch, not when the loop
        next comes round (under overload, milliseconds later). True if it did."""
        if self._in_model < 2 and (self._queued_rows >= self._max_batch or self._stopping):
            self._start(self._take_batch())
            return True
        return False

    async def _execute(
        self,
        batch: list[tuple[QueuedRequest, int, int]],
        inputs: NDArray[np.float32],
        run: asyncio.Future[tuple[Mapping[str, NDArray[np.generic]], float]],
        started: float,
    ) -> None:
        waits = np.array([started - req.enqueued_at for req, _, _ in batch], dtype=np.float64)
        n = int(inputs.shape[0])
        try:
            try:
                outputs, compute_s = await run
            finally:
                self._in_model -= 1
            self._stage_full_batch()
            bad = {k: v.shape for k, v in outputs.items() if v.ndim == 0 or v.shape[0] != n}
            if bad or not outputs:
                raise ModelRunError(
                    f"model {self.name!r} returned {bad or 'no outputs'} for a batch of {n} rows"
                )
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, ServiceError)
                else ModelRunError(
                    f"model {self.name!r} failed on a batch of {n} rows: {type(exc).__name__}: {exc}"
                )
            )
            logger.error("%s", error)
            for request, _, _ in batch:
                request.fail(error)
            return
        except asyncio.CancelledError:  # the loop itself is being cancelled: settle this batch too
            for request, _, _ in batch:
                request.fail(ModelUnavailable(f"model {self.name!r} stopped while this request ran"))
            raise
        self._drain.observe(n, compute_s)
        self._company.answered(sum(b == req.n for req, _, b in batch), n, compute_s)
        self._batches += 1
        self._rows_run += n
        self._max_batch_rows = max(self._max_batch_rows, n)
        offset = 0
        casts: dict[tuple[str, np.dtype[Any]], NDArray[np.generic]] = {}  # shared by the batch's slices
        for request, a, b in batch:
            request.deliver(a, RowSlice(outputs, offset, offset + (b - a), casts), b - a)
            offset += b - a
        self._reporter.add(BatchReport(n, len(batch), compute_s, waits, outputs, inputs))
