"""DynamicBatcher behaviour through its public API (submit / start / stop / stats), in-process."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping

import numpy as np
import pytest
from numpy.typing import NDArray

from service.batch_reports import REPORT_EVERY_BATCHES
from service.batch_request import BatchReport
from service.batcher import DynamicBatcher
from service.errors import DeadlineExceeded, ModelRunError, ModelUnavailable, QueueFull

pytestmark = pytest.mark.anyio


class RecordingModel:
    """A real computation (row sums and a copy of the rows) that records every batch it was given."""

    def __init__(self, delay_s: float = 0.0, fail_when: float | None = None) -> None:
        self.batches: list[int] = []
        self.seen: list[float] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s
        self.fail_when = fail_when

    def __call__(self, rows: NDArray[np.float32]) -> Mapping[str, NDArray[np.generic]]:
        self.threads.add(threading.current_thread().name)
        self.batches.append(int(rows.shape[0]))
        self.seen.extend(rows[:, 0].tolist())
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_when is not None and (rows[:, 0] == self.fail_when).any():
            raise RuntimeError("poisoned row")
        return {"sum": rows.sum(axis=1), "rows": rows.copy()}


def make(model: RecordingModel, **kwargs: float) -> tuple[DynamicBatcher, list[BatchReport]]:
    reports: list[BatchReport] = []
    options: dict[str, float] = {"max_batch_size": 8, "max_delay_s": 0.02, "max_queue_size": 100} | kwargs
    batcher = DynamicBatcher(
        "m",
        model,
        max_batch_size=int(options["max_batch_size"]),
        max_delay_s=options["max_delay_s"],
        max_queue_size=int(options["max_queue_size"]),
        on_batches=reports.extend,
    )
    return batcher, reports


def rows(start: int, n: int) -> NDArray[np.float32]:
    return np.arange(start, start + n, dtype=np.float32)[:, None] * np.ones((1, 3), dtype=np.float32)


async def test_concurrent_requests_share_batches_and_each_gets_its_own_rows() -> None:
    model = RecordingModel()
    batcher, reports = make(model)
    await batcher.start()
    sizes = [1, 3, 2, 5, 1, 4, 2, 2, 7, 1]
    starts = np.cumsum([0, *sizes[:-1]]) * 10
    futures = [batcher.submit(rows(int(s), n)) for s, n in zip(starts, sizes, strict=True)]
    results = await asyncio.gather(*futures)
    await batcher.stop()
    for s, n, out in zip(starts, sizes, results, strict=True):
        np.testing.assert_array_equal(out["rows"], rows(int(s), n))
        np.testing.assert_array_equal(out["sum"], rows(int(s), n).sum(axis=1))
    assert sum(model.batches) == sum(sizes)
    assert max(model.batches) == 8  # full batches formed (requests were split to fill them)
    assert len(model.batches) == -(-sum(sizes) // 8)
    assert batcher.stats().max_batch_rows == 8
    assert all(r.queue_wait_seconds.shape == (r.requests,) for r in reports)
    assert not any(name == threading.main_thread().name for name in model.threads)


async def test_large_request_is_split_and_rejoined_in_order() -> None:
    model = RecordingModel()
    batcher, _ = make(model, max_batch_size=4)
    await batcher.start()
    out = await batcher.submit(rows(0, 11))
    await batcher.stop()
    assert model.batches == [4, 4, 3]
    np.testing.assert_array_equal(out["rows"], rows(0, 11))


async def test_partial_batch_waits_at_most_the_max_delay() -> None:
    batcher, _ = make(RecordingModel(), max_delay_s=0.05)
    await batcher.start()
    t0 = time.perf_counter()
    await batcher.submit(rows(0, 1))
    waited = time.perf_counter() - t0
    await batcher.stop()
    assert 0.04 <= waited < 1.0


async def test_full_queue_rejects_at_once_with_retry_after() -> None:
    batcher, _ = make(RecordingModel(), max_queue_size=2, max_delay_s=0.2, max_batch_size=64)
    await batcher.start()
    first = [batcher.submit(rows(i, 1)) for i in range(2)]
    with pytest.raises(QueueFull) as info:
        batcher.submit(rows(9, 1))
    assert info.value.status_code == 503 and info.value.headers["Retry-After"] == "1"
    await asyncio.gather(*first)
    await batcher.stop()


async def test_expired_request_is_dropped_before_running() -> None:
    model = RecordingModel()
    batcher, _ = make(model, max_delay_s=0.3, max_batch_size=64)
    await batcher.start()
    doomed = batcher.submit(rows(100, 2), timeout_s=0.02)
    kept = batcher.submit(rows(0, 1), timeout_s=5)
    with pytest.raises(DeadlineExceeded):
        await doomed
    await kept
    await batcher.stop()
    assert 100.0 not in model.seen and model.batches == [1]


async def test_cancelled_request_costs_no_model_run() -> None:
    model = RecordingModel()
    batcher, _ = make(model, max_delay_s=0.1, max_batch_size=64)
    await batcher.start()
    gone = batcher.submit(rows(100, 3))
    kept = batcher.submit(rows(0, 1))
    gone.cancel()
    await kept
    await batcher.stop()
    assert 100.0 not in model.seen and model.batches == [1]
    assert batcher.stats().queued_requests == 0


async def test_model_error_fails_only_its_batch_and_batcher_keeps_serving() -> None:
    model = RecordingModel(fail_when=666.0)
    batcher, _ = make(model, max_batch_size=2, max_delay_s=0.0)
    await batcher.start()
    bad = batcher.submit(rows(666, 1))
    with pytest.raises(ModelRunError, match="poisoned row"):
        await bad
    good = await batcher.submit(rows(0, 2))
    await batcher.stop()
    np.testing.assert_array_equal(good["rows"], rows(0, 2))


async def test_wrong_number_of_results_is_an_error_not_a_misrouted_answer() -> None:
    def short(rows: NDArray[np.float32]) -> Mapping[str, NDArray[np.generic]]:
        return {"sum": rows.sum(axis=1)[:-1]}

    batcher = DynamicBatcher("m", short, max_batch_size=4, max_delay_s=0.0, max_queue_size=10)
    await batcher.start()
    with pytest.raises(ModelRunError, match="for a batch of 2 rows"):
        await batcher.submit(rows(0, 2))
    await batcher.stop()


async def test_stop_drains_queued_requests_then_refuses_new_ones() -> None:
    model = RecordingModel(delay_s=0.01)
    batcher, _ = make(model, max_delay_s=5.0, max_batch_size=64)  # only stop() can flush this fast
    await batcher.start()
    futures = [batcher.submit(rows(i * 10, 2)) for i in range(5)]
    t0 = time.perf_counter()
    await batcher.stop()
    assert time.perf_counter() - t0 < 2.0
    assert all(f.done() and not f.cancelled() and f.exception() is None for f in futures)
    with pytest.raises(ModelUnavailable):
        batcher.submit(rows(0, 1))


async def test_run_when_idle_never_waits_out_the_delay_on_an_idle_model() -> None:
    batcher = DynamicBatcher(
        "m", RecordingModel(), max_batch_size=8, max_delay_s=5.0, max_queue_size=10, run_when_idle=True
    )
    await batcher.start()
    t0 = time.perf_counter()
    out = await batcher.submit(rows(0, 1))
    waited = time.perf_counter() - t0
    await batcher.stop()
    assert waited < 1.0  # the 5 s delay would apply under Triton's rule
    np.testing.assert_array_equal(out["rows"], rows(0, 1))


async def test_run_when_idle_a_caller_resubmitting_at_once_finds_the_model_idle() -> None:
    """A closed-loop caller sends its next request in the step its answer arrives, before the
    finished batch's bookkeeping has run: the model has returned, so that request must not count
    as arriving during a run (it did, and waited out the whole delay each time)."""
    batcher = DynamicBatcher(
        "m", RecordingModel(), max_batch_size=8, max_delay_s=30.0, max_queue_size=10, run_when_idle=True
    )
    await batcher.start()
    for i in range(5):  # with the 30 s delay applied, the first resubmission alone would time out
        async with asyncio.timeout(10):  # not wait_for: its extra task would hide the race
            out = await batcher.submit(rows(i, 1))
        np.testing.assert_array_equal(out["rows"], rows(i, 1))
    await batcher.stop()


async def test_run_when_idle_delays_only_requests_that_arrive_during_a_run() -> None:
    model = RecordingModel(delay_s=0.2)
    batcher = DynamicBatcher(
        "m", model, max_batch_size=8, max_delay_s=2.0, max_queue_size=100, run_when_idle=True
    )
    await batcher.start()
    first = batcher.submit(rows(0, 1))
    while not model.batches:  # until the first row is running alone
        await asyncio.sleep(0.001)
    late = [batcher.submit(rows(i, 1)) for i in range(1, 20)]
    # 19 rows queue behind the run: two full batches go at once, the last 3 rows arrived while the
    # model was busy, so they wait out the delay for company (none comes) and then run
    outs = await asyncio.gather(first, *late)
    assert model.batches == [1, 8, 8, 3]
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out["rows"], rows(i, 1))
    # the model is idle again: a lone request waits at most one run's fixed cost (0.2 s here) for
    # the clients just answered to come back, not the 2 s delay
    t0 = time.perf_counter()
    await batcher.submit(rows(20, 1))
    assert time.perf_counter() - t0 < 1.5
    await batcher.stop()


async def test_run_when_idle_waits_for_answered_clients_coming_back() -> None:
    """Eight closed-loop clients: each sends its next row 0-7 ms after its answer arrives. The first
    one back finds the model idle; running it alone would split every round. It waits (at most a
    run's fixed cost) for the other seven it knows are out, so each round runs as one batch."""
    model = RecordingModel(delay_s=0.03)
    batcher = DynamicBatcher(
        "m", model, max_batch_size=8, max_delay_s=0.1, max_queue_size=100, run_when_idle=True
    )
    await batcher.start()

    async def client(i: int, rounds: int) -> None:
        for r in range(rounds):
            await asyncio.sleep(0.001 * i)  # the way back (network, the client's own work) differs
            out = await batcher.submit(rows(100 * i + r, 1))
            np.testing.assert_array_equal(out["rows"], rows(100 * i + r, 1))

    async with asyncio.timeout(30):
        await asyncio.gather(*(client(i, 6) for i in range(8)))
    await batcher.stop()
    # [1, 8, 8, 8, 8, 8, 7] here: the first client runs alone (nobody was answered yet), then every
    # round is one batch; running the first one back at once took 12 runs, [1, 8, 1, 8, 1, 7, 2, ...]
    assert sum(model.batches) == 48 and len(model.batches) <= 8, model.batches


async def test_run_when_idle_a_lone_client_never_waits_for_company() -> None:
    """One closed-loop client is the only one out after each answer: when it comes back nobody else
    is expected, so it runs at once although a run's fixed cost (0.3 s here) would allow a wait."""
    model = RecordingModel(delay_s=0.3)
    reports: list[BatchReport] = []
    batcher = DynamicBatcher(
        "m",
        model,
        max_batch_size=8,
        max_delay_s=5.0,
        max_queue_size=10,
        run_when_idle=True,
        on_batches=reports.extend,
    )
    await batcher.start()
    for i in range(4):
        await asyncio.wait_for(batcher.submit(rows(i, 1)), 10)
    await batcher.stop()
    assert model.batches == [1, 1, 1, 1]
    waits = np.concatenate([r.queue_wait_seconds for r in reports])
    assert waits.max() < 0.15, waits  # waiting for company would show as ~0.3 s


async def test_run_when_idle_stops_waiting_for_clients_that_do_not_come_back() -> None:
    """Open-loop callers are not coming back: after one batch of two, the next lone request may wait
    (a run's fixed cost, 0.3 s here) for the second caller, but once that wait ran out nobody is
    counted out any more, so the lone requests after it run at once."""
    model = RecordingModel(delay_s=0.3)
    reports: list[BatchReport] = []
    batcher = DynamicBatcher(
        "m", model, max_batch_size=8, max_delay_s=5.0, max_queue_size=10, run_when_idle=True,
        on_batches=reports.extend,
    )  # fmt: skip
    await batcher.start()
    await asyncio.wait_for(asyncio.gather(batcher.submit(rows(0, 1)), batcher.submit(rows(1, 1))), 10)
    for i in range(2, 6):
        await asyncio.wait_for(batcher.submit(rows(i, 1)), 10)
    await batcher.stop()
    assert model.batches == [2, 1, 1, 1, 1]
    waits = np.concatenate([r.queue_wait_seconds for r in reports])
    assert (waits[3:] < 0.15).all(), waits  # waiting each time would show ~0.3 s on every one


async def test_retry_after_follows_the_drain_rate() -> None:
    model = RecordingModel(delay_s=0.1)  # 64 rows per 0.1 s run: at most 640 rows/s
    batcher, _ = make(model, max_batch_size=64, max_delay_s=5.0, max_queue_size=10)
    assert batcher.retry_after_s() == 1  # nothing measured yet
    await batcher.start()
    await asyncio.wait_for(batcher.submit(rows(0, 64)), 10)  # a full batch runs at once
    pending = [batcher.submit(rows(64 * i, 320)) for i in range(4)]  # 1,280 rows wait out the delay
    assert 2 <= batcher.retry_after_s() <= 6  # 1,280 rows / ≤ 640 rows/s, plus overheads
    for _ in range(6):
        pending.append(batcher.submit(rows(0, 1)))
    assert batcher.full
    error = batcher.queue_full()
    assert int(error.headers["Retry-After"]) == batcher.retry_after_s()
    await batcher.stop()
    await asyncio.gather(*pending)


class GatedModel(RecordingModel):
    """Holds its first batch until `release` is set; records when each batch started (monotonic)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.started: list[float] = []

    def __call__(self, rows: NDArray[np.float32]) -> Mapping[str, NDArray[np.generic]]:
        self.started.append(time.monotonic())
        if len(self.started) == 1:
            self.release.wait(10)
        return super().__call__(rows)


async def test_a_full_batch_is_staged_behind_the_running_one() -> None:
    """The model goes from batch to batch without waiting for the event loop: the second full batch
    starts while the loop is still blocked, right after the first one returns."""
    model = GatedModel()
    batcher, _ = make(model, max_batch_size=8, max_delay_s=5.0)
    await batcher.start()
    first = batcher.submit(rows(0, 8))
    await asyncio.sleep(0.05)  # the first batch is in the model now, held
    second = batcher.submit(rows(8, 8))  # full: staged behind it
    await asyncio.sleep(0.05)
    model.release.set()
    time.sleep(0.3)  # the event loop is blocked: nothing it does could start the next batch
    loop_back = time.monotonic()
    outs = await asyncio.gather(first, second)
    assert model.batches == [8, 8]
    assert model.started[1] < loop_back  # it started while the loop was blocked
    np.testing.assert_array_equal(outs[1]["rows"], rows(8, 8))
    await batcher.stop()


async def test_a_partial_batch_waits_for_the_model_and_fills_meanwhile() -> None:
    model = GatedModel()
    batcher, _ = make(model, max_batch_size=8, max_delay_s=0.01)
    await batcher.start()
    first = batcher.submit(rows(0, 8))
    await asyncio.sleep(0.05)
    later = [batcher.submit(rows(8 + i, 1)) for i in range(3)]  # 3 rows, past their 10 ms delay
    await asyncio.sleep(0.05)
    model.release.set()
    await asyncio.gather(first, *later)
    assert model.batches == [8, 3]  # one batch of the three, not three staged singletons
    await batcher.stop()


async def test_each_batch_is_reported_once_in_order_after_its_answers() -> None:
    model = RecordingModel(delay_s=0.002)
    futures: dict[float, asyncio.Future[dict[str, NDArray[np.generic]]]] = {}
    groups: list[int] = []
    first_rows: list[float] = []

    def on_batches(reports: list[BatchReport]) -> None:
        groups.append(len(reports))
        for report in reports:
            firsts = report.outputs["rows"][:, 0].tolist()
            first_rows.extend(firsts)
            # every request with a row in this batch has its answer already
            assert all(futures[v].done() for v in firsts if v in futures)

    batcher = DynamicBatcher("m", model, max_batch_size=4, max_delay_s=0.0, max_queue_size=1000,
                             on_batches=on_batches)  # fmt: skip
    await batcher.start()
    for i in range(200):  # one row each: 50 batches of 4, the queue never empty meanwhile
        futures[float(i)] = batcher.submit(rows(i, 1))
    await asyncio.gather(*futures.values())
    await batcher.stop()
    assert first_rows == [float(i) for i in range(200)]  # every row once, in batch order
    assert sum(groups) == len(model.batches) and max(groups) <= REPORT_EVERY_BATCHES  # 4 rows a batch
    assert len(groups) < len(model.batches)  # under load several batches per report
