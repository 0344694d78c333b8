"""A request waiting in (or running through) `service.batcher.DynamicBatcher`'s queue, the view of
its part of a batch's answers, and the records the batcher gives out (a batch's report, its
stats). The model's cost (drain rate, fixed cost per run) is in service/batch_cost.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

Outputs = Mapping[str, NDArray[np.generic]]


@dataclass(frozen=True)
class BatchReport:
    """What one executed batch looked like; handed to `on_batches` on the event loop."""

    rows: int
    requests: int
    compute_seconds: float
    queue_wait_seconds: NDArray[np.float64]  # one per request part in the batch
    outputs: Mapping[str, NDArray[np.generic]]
    inputs: NDArray[np.float32] | None = None  # the batch's rows (the shadow teacher samples them)


@dataclass(frozen=True)
class BatcherStats:
    """Counters a client may read through model metadata (batching is observable, not private)."""

    batches: int
    rows: int
    max_batch_rows: int
    queued_requests: int
    queued_rows: int


class RowSlice(Mapping[str, NDArray[np.generic]]):
    """Rows `[start, stop)` of every tensor of a batch's outputs, each sliced when it is read: a
    request's answer reads only the tensors it returns (four of ~20 for a lean V2 request).

    `casts` is shared by every slice of one batch: `cast` converts a tensor to an answer's dtype
    once per batch and slices that, where converting each request's rows cost a copy per tensor
    per request (the batch's summaries are float64, answers mostly float32)."""

    __slots__ = ("_casts", "_outputs", "_start", "_stop")

    def __init__(
        self,
        outputs: Mapping[str, NDArray[np.generic]],
        start: int,
        stop: int,
        casts: dict[tuple[str, np.dtype[Any]], NDArray[np.generic]] | None = None,
    ) -> None:
        self._outputs = outputs
        self._start = start
        self._stop = stop
        self._casts = {} if casts is None else casts

    def __getitem__(self, name: str) -> NDArray[np.generic]:
        return self._outputs[name][self._start : self._stop]

    def cast(self, name: str, dtype: np.dtype[Any]) -> NDArray[np.generic]:
        """This slice of tensor `name` as `dtype` (a view of the batch's one converted copy: read only)."""
        column = self._casts.get((name, dtype))
        if column is None:
            column = self._casts[(name, dtype)] = np.asarray(self._outputs[name], dtype=dtype)
        return column[self._start : self._stop]

    def __iter__(self) -> Iterator[str]:
        return iter(self._outputs)

    def __len__(self) -> int:
        return len(self._outputs)


class QueuedRequest:
    """One submitted request in a batcher's queue: its rows, future, deadline timer, and the parts of
    its answer that came back (a request larger than a batch's room is split; parts re-join in order)."""

    __slots__ = (
        "arrived_busy",
        "cursor",
        "done_rows",
        "enqueued_at",
        "future",
        "n",
        "parts",
        "queued",
        "rows",
        "timer",
    )

    def __init__(
        self, rows: NDArray[np.float32], future: asyncio.Future[Outputs], now: float, arrived_busy: bool
    ) -> None:
        self.rows = rows
        self.arrived_busy = arrived_busy  # a batch was running when it arrived
        self.n = int(rows.shape[0])
        self.future = future
        self.enqueued_at = now
        self.cursor = 0  # rows already handed to a batch
        self.done_rows = 0  # rows whose results came back
        self.parts: list[tuple[int, Outputs]] = []
        self.queued = True  # still holds a queue slot (not fully taken, expired or cancelled)
        self.timer: asyncio.TimerHandle | None = None

    def deliver(self, start: int, part: Outputs, rows: int) -> None:
        """`part`: the answers of this request's rows `start .. start + rows`."""
        if self.future.done():  # cancelled by its client, or failed by another part's batch
            return
        self.parts.append((start, part))
        self.done_rows += rows
        if self.done_rows < self.n:
            return
        if len(self.parts) == 1:
            self.future.set_result(part)
            return
        self.parts.sort(key=lambda p: p[0])
        keys = self.parts[0][1].keys()
        self.future.set_result({k: np.concatenate([p[k] for _, p in self.parts]) for k in keys})

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)
