"""What the batcher knows of its model's cost: how fast it drains rows (the edge predicts waits and
Retry-After from it) and what one more run costs over a bigger one (the idle-model rule waits that
long for clients it just answered, and no longer)."""

from __future__ import annotations

import math
from collections import deque


class DrainRate:
    """Rows per second the model clears while running (an EWMA over batches): its compute speed,
    steady while the event loop is slow. The edge predicts waits and Retry-After from it."""

    def __init__(self) -> None:
        self.rows_per_s = 0.0

    def observe(self, rows: int, compute_s: float) -> None:
        rate = rows / max(compute_s, 1e-6)
        self.rows_per_s = rate if self.rows_per_s <= 0.0 else 0.8 * self.rows_per_s + 0.2 * rate

    def seconds_for(self, rows: float) -> float:
        """How long `rows` more rows take at the recent rate; inf before any batch ran."""
        return rows / self.rows_per_s if self.rows_per_s > 0.0 else math.inf

    def retry_after_s(self, queued_rows: int) -> int:
        """Whole seconds until `queued_rows` have run at the recent rate (1 … 60)."""
        if self.rows_per_s <= 0.0:
            return 1
        return int(min(60, max(1, math.ceil(queued_rows / self.rows_per_s))))


class ReturningCompany:
    """Clients just answered that have not sent their next request yet, and how long it pays to
    wait for them when a request finds the model idle.

    Closed-loop clients (most HTTP callers: send, await, send again) come back a moment after their
    answer. Running the first one back alone costs a whole run's fixed part again — per-call overhead
    that does not grow with rows — for each of the others, while waiting for them costs the time they
    take to come back. The rule is the ski-rental one: wait at most one run's fixed cost, and only
    while some answered client is still out (a lone client never waits: it was the only one out).
    The fixed cost is the intercept of run time against rows, fitted over recent batches. Only
    clients answered since the last idle-model wait count (`stop_waiting`).
    """

    DECAY = 0.95  # per batch: the fit follows the model's recent runs (load, threads, warm caches)

    def __init__(self, cap: int) -> None:
        self._cap = cap  # at most a batch's worth of company is worth waiting for
        self.outstanding = 0
        self._w = self._x = self._y = self._xx = self._xy = 0.0  # decayed sums of the fit
        self._recent: deque[float] = deque(maxlen=32)  # recent run times: the intercept's ceiling

    def answered(self, requests: int, rows: int, compute_s: float) -> None:
        """A batch of `rows` rows took `compute_s`; `requests` requests got their whole answer."""
        self.outstanding = min(self._cap, self.outstanding + requests)
        d = self.DECAY
        self._w = d * self._w + 1.0
        self._x = d * self._x + rows
        self._y = d * self._y + compute_s
        self._xx = d * self._xx + rows * rows
        self._xy = d * self._xy + rows * compute_s
        self._recent.append(compute_s)

    def arrived(self) -> None:
        """A request came in: one answered client fewer is out (or a new one, which counts the same)."""
        self.outstanding = max(0, self.outstanding - 1)

    def stop_waiting(self) -> None:
        """An idle-model wait is over: a client not back by now is not coming soon (an open-loop
        caller, one that left), so only the next batch's answers count. Without this, one batch of
        two under sparse open-loop traffic would leave one client "out" for good, and every later
        lone request would wait a run's fixed cost for it."""
        self.outstanding = 0

    def fixed_cost_s(self) -> float:
        """Seconds one run costs regardless of its rows: the fitted intercept, within [0, the fastest
        recent run]; the fastest recent run while all batches had one size (no slope to fit)."""
        if not self._recent:
            return 0.0
        fastest = min(self._recent)
        var = self._w * self._xx - self._x * self._x
        if var <= 1e-9 * max(1.0, self._w * self._xx):
            return fastest
        slope = (self._w * self._xy - self._x * self._y) / var
        intercept = (self._y - slope * self._x) / self._w
        return min(fastest, max(0.0, intercept))

    def wait_s(self) -> float:
        """How long a request that found the model idle should wait for company (0: run at once)."""
        return self.fixed_cost_s() if self.outstanding > 0 else 0.0
