"""Overload and soak against a real server whose capacity is bounded by model compute.

Overload: capacity is measured first (closed loop), then requests are offered open-loop at 10× that
rate. Checked: the server's resident memory stays bounded (peak RSS sampled from /proc), requests
beyond the queue are refused fast with 503 + Retry-After, every accepted answer equals a direct
ONNX Runtime run of its rows, nothing is lost (every request gets an HTTP answer), and throughput
is back to normal within seconds after the overload stops.

Soak (slow): open-loop at 70% of capacity for `HYDRA_SOAK_S` seconds (default 600): no upward
memory trend and no latency drift between the first and the last minute.

Each test prints one JSON line of figures (run with `-s` to see it; docs/RELIABILITY.md quotes them).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.http_load import (
    Outcome,
    closed_loop,
    open_loop,
    percentile,
    throughput,
)
from tests.reliability.checks import RowPool, is_error_body
from tests.reliability.memory import (
    RssSampler,
    peak_rss_bytes,
    rss_bytes,
)
from tests.service.support import Server, running_server

PATH = "/v1/models/wide:predict"
MiB = 1024 * 1024
QUEUE = 32  # requests that may wait per model: at ~30 req/s, about a second of work


# capacity is measured, then offered 10x: no other test may take CPU meanwhile (tests/conftest.py)
pytestmark = pytest.mark.serial


@pytest.fixture(scope="module", params=[1, 2], ids=["1-worker", "2-workers"])
def wide_server(wide_repository: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    # 2 workers: two processes on the port, each with its own queue of QUEUE and one ORT thread.
    # admission_wait_s 0: past the queue a request is refused at once. With a line (the default) the
    # waiters hold the open-loop client's connections and it cannot offer 10x (measured: 176 of 363
    # req/s sent, 35 served = capacity); the line is measured in bench/goodput.sh and test_admission.
    # refusal_hold_max_s 0 for the same reason: a resend on a refused connection would wait out its
    # Retry-After (measured: 98 of 676 req/s sent), and this test measures refusals at once.
    with running_server(
        wide_repository,
        max_batch_size="64",
        max_queue_size=str(QUEUE),
        intra_op_threads="1",
        workers=str(request.param),
        admission_wait_s="0",
        refusal_hold_max_s="0",
    ) as server:
        yield server


@pytest.fixture(scope="module")
def pool(wide_repository: Path) -> RowPool:
    return RowPool(wide_repository / "wide" / "1", rows=64)


def _capacity(server: Server, pool: RowPool, seconds: float) -> tuple[float, list[Outcome]]:
    """Answers per second with 8 clients always waiting on the server (its saturated throughput)."""
    outcomes = asyncio.run(closed_loop(server.url, PATH, pool.body, concurrency=8, duration_s=seconds))
    assert outcomes and all(o.status == 200 for o in outcomes), Counter(o.status for o in outcomes)
    return throughput(outcomes), outcomes


def run_overload(
    server: Server, pool: RowPool, *, factor: float, seconds: float, capacity_s: float, recovery_s: float
) -> dict[str, Any]:
    """Capacity over `capacity_s`, `factor` x that open-loop for `seconds`, recovery over `recovery_s`."""
    pid = server.process.pid
    capacity, _ = _capacity(server, pool, capacity_s)
    baseline_rss = rss_bytes(pid)
    rate = factor * capacity
    with RssSampler(pid, interval_s=0.05) as sampler:
        outcomes = asyncio.run(
            open_loop(
                server.url, PATH, pool.body, rate=rate, duration_s=seconds, connections=96, first_index=10**6
            )
        )
    overload_end = time.perf_counter()
    recovery = asyncio.run(
        closed_loop(server.url, PATH, pool.body, concurrency=8, duration_s=recovery_s, first_index=10**8)
    )

    statuses = Counter(o.status for o in outcomes)
    accepted = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 503]
    mismatched = [problem for o in accepted for problem in pool.mismatches(o.index, o.body)]
    first_ok_after = (
        min((o.finished for o in recovery if o.status == 200), default=float("inf")) - overload_end
    )
    settled = [o for o in recovery if o.started >= overload_end + 1.0]  # after the leftover queue drained
    rss = [r for _, r in sampler.samples]
    tenth = max(1, len(rss) // 10)
    figures: dict[str, Any] = {
        "capacity_req_s": round(capacity, 1),
        "rows_per_request": pool.rows_per_request,
        "factor": factor,
        "offered_req_s": round(rate, 1),
        "sent_req_s": round(
            len(outcomes) / (max(o.started for o in outcomes) - min(o.scheduled for o in outcomes)), 1
        ),
        "duration_s": seconds,
        "requests": len(outcomes),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "accepted_req_s": round(throughput(outcomes), 1),
        "mismatched": len(mismatched),
        "lost": statuses.get(0, 0),
        "refusal_latency_p50_ms": round(1000 * percentile([o.latency_s for o in refused], 50), 1),
        "refusal_latency_p99_ms": round(1000 * percentile([o.latency_s for o in refused], 99), 1),
        "accepted_latency_p99_ms": round(1000 * percentile([o.latency_s for o in accepted], 99), 1),
        "client_late_p99_ms": round(1000 * percentile([o.late_s for o in outcomes], 99), 1),
        "rss_before_mib": round(baseline_rss / MiB, 1),
        "rss_peak_mib": round(sampler.peak / MiB, 1),
        "rss_hwm_mib": round(peak_rss_bytes(pid) / MiB, 1),
        "rss_first_tenth_max_mib": round(max(rss[:tenth]) / MiB, 1),
        "rss_last_tenth_max_mib": round(max(rss[-tenth:]) / MiB, 1),
        "first_ok_after_overload_s": round(first_ok_after, 3),
        "recovered_req_s": round(throughput(settled), 1),
        "recovery_statuses": dict(Counter(str(o.status) for o in recovery)),
    }
    print("\nOVERLOAD " + json.dumps(figures))

    assert statuses.get(0, 0) == 0, "requests without an HTTP answer"
    assert set(statuses) <= {200, 503}, statuses
    assert figures["sent_req_s"] >= 0.8 * rate, "the client could not offer the load; figures meaningless"
    assert len(refused) > len(accepted), "10x capacity must be mostly refused"
    assert not mismatched, mismatched[:5]
    for o in refused:
        retry = o.headers.get("retry-after", "")  # from the queue's drain rate: 1 ... 60 s
        assert retry.isdigit() and 1 <= int(retry) <= 60 and is_error_body(o.body), (o.headers, o.body)
    # refusals are cheap: far faster than an accepted answer, which waits for the queue
    assert figures["refusal_latency_p99_ms"] < 500
    assert figures["refusal_latency_p50_ms"] < 0.5 * 1000 * percentile([o.latency_s for o in accepted], 50)
    # accepted throughput under overload does not collapse (refusals cost the event loop some CPU,
    # which on 2 shared cores the model run misses; the figure is reported)
    assert figures["accepted_req_s"] >= 0.4 * capacity
    # memory bounded: the queue is bounded, so overload costs at most a little working memory
    assert sampler.peak - baseline_rss < 150 * MiB, figures
    assert rss[-tenth:] and max(rss[-tenth:]) - max(rss[:tenth]) < 40 * MiB, "RSS grows with overload time"
    # back to normal within seconds: every recovery request answered, throughput near capacity
    assert all(o.status == 200 for o in recovery), figures["recovery_statuses"]
    assert first_ok_after < 2.0
    # (2-second windows on a shared 2-core machine vary by about ±30%, hence the margin)
    assert figures["recovered_req_s"] >= 0.5 * capacity, figures
    return figures


def test_overload_10x_short(wide_server: Server, pool: RowPool) -> None:
    # short phases (the suite's time budget): the ratios checked hold with margin (measured: accepted
    # 0.80-0.99 and recovered 0.89-0.98 of capacity, against 0.4 and 0.5)
    run_overload(wide_server, pool, factor=10.0, seconds=3.0, capacity_s=1.0, recovery_s=2.0)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_overload_10x_60s(wide_server: Server, pool: RowPool) -> None:
    run_overload(wide_server, pool, factor=10.0, seconds=60.0, capacity_s=2.0, recovery_s=3.0)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the 600 s run plus set-up and checks, past pytest's 600 s default
def test_soak_at_70_percent(wide_server: Server, pool: RowPool) -> None:
    seconds = float(os.environ.get("HYDRA_SOAK_S", "600"))
    capacity, _ = _capacity(wide_server, pool, 3.0)
    rate = 0.7 * capacity
    with RssSampler(wide_server.process.pid, interval_s=1.0) as sampler:
        outcomes = asyncio.run(
            open_loop(
                wide_server.url,
                PATH,
                pool.body,
                rate=rate,
                duration_s=seconds,
                connections=32,
                first_index=10**9,
            )
        )
    statuses = Counter(o.status for o in outcomes)
    t0 = min(o.started for o in outcomes)
    window = min(60.0, seconds / 5)
    first = [o.latency_s for o in outcomes if o.started - t0 < window]
    last = [o.latency_s for o in outcomes if o.started - t0 >= seconds - window]
    # memory trend after the first window (allocator and ORT arenas settle first): least-squares slope
    samples = [(t, r) for t, r in sampler.samples if t - sampler.samples[0][0] >= window]
    times = np.array([t for t, _ in samples]) - samples[0][0]
    mib = np.array([r for _, r in samples]) / MiB
    slope_mib_per_min = float(np.polyfit(times, mib, 1)[0] * 60.0)
    checked = outcomes[:: max(1, len(outcomes) // 500)]
    mismatched = [p for o in checked if o.status == 200 for p in pool.mismatches(o.index, o.body)]
    figures = {
        "capacity_req_s": round(capacity, 1),
        "rate_req_s": round(rate, 1),
        "duration_s": seconds,
        "requests": len(outcomes),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "rss_start_mib": round(mib[0], 1),
        "rss_end_mib": round(mib[-1], 1),
        "rss_max_mib": round(float(mib.max()), 1),
        "rss_slope_mib_per_min": round(slope_mib_per_min, 3),
        "latency_first_p50_ms": round(1000 * percentile(first, 50), 1),
        "latency_first_p99_ms": round(1000 * percentile(first, 99), 1),
        "latency_last_p50_ms": round(1000 * percentile(last, 50), 1),
        "latency_last_p99_ms": round(1000 * percentile(last, 99), 1),
        "checked_against_ort": len(checked),
        "mismatched": len(mismatched),
    }
    print("\nSOAK " + json.dumps(figures))
    assert statuses == {200: len(outcomes)}, statuses
    assert not mismatched, mismatched[:5]
    assert abs(slope_mib_per_min) < 1.0, figures  # < 1 MiB per minute: no leak trend
    assert figures["latency_last_p50_ms"] < 1.5 * figures["latency_first_p50_ms"] + 20, figures
    assert figures["latency_last_p99_ms"] < 2.0 * figures["latency_first_p99_ms"] + 50, figures
