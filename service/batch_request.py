"""A request waiting in (or running through) `service.batcher.DynamicBatcher`'s queue."""

from __future__ import annotations

import asyncio

import numpy as np
from numpy.typing import NDArray

Outputs = dict[str, NDArray[np.generic]]


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

    def deliver(self, start: int, part: Outputs) -> None:
        if self.future.done():  # cancelled by its client, or failed by another part's batch
            return
        self.parts.append((start, part))
        self.done_rows += next(iter(part.values())).shape[0]
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
