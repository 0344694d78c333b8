"""The batcher's cost model (service/batch_cost.py): the drain rate, and the fixed cost per run
and the answered clients still out that decide how long an idle model waits for company."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.batch_cost import DrainRate, ReturningCompany


def test_drain_rate_predicts_waits_from_observed_runs() -> None:
    drain = DrainRate()
    assert drain.seconds_for(100) == math.inf and drain.retry_after_s(100) == 1
    drain.observe(1000, 0.5)  # 2,000 rows/s
    assert drain.seconds_for(500) == pytest.approx(0.25)
    assert drain.retry_after_s(5000) == 3  # 2.5 s, rounded up
    assert drain.retry_after_s(10**9) == 60  # capped


def test_fixed_cost_is_the_intercept_of_run_time_against_rows() -> None:
    company = ReturningCompany(cap=64)
    assert company.fixed_cost_s() == 0.0  # nothing measured: no reason to wait
    for rows in (1, 8, 32, 64, 16, 4) * 5:
        company.answered(1, rows, 0.002 + 0.0001 * rows)  # 2 ms per run + 0.1 ms per row
    assert company.fixed_cost_s() == pytest.approx(0.002, rel=1e-6)


def test_fixed_cost_with_one_batch_size_is_the_fastest_recent_run() -> None:
    company = ReturningCompany(cap=8)
    for t in (0.05, 0.03, 0.04):
        company.answered(8, 8, t)
    assert company.fixed_cost_s() == pytest.approx(0.03)


def test_only_answered_clients_still_out_are_waited_for() -> None:
    company = ReturningCompany(cap=4)
    company.answered(10, 10, 0.01)  # ten answered, but at most a batch's worth counts
    assert company.outstanding == 4
    for _ in range(3):
        company.arrived()
        assert company.wait_s() == pytest.approx(0.01)
    company.arrived()
    assert company.outstanding == 0 and company.wait_s() == 0.0
    company.arrived()  # a new client: never below zero
    assert company.outstanding == 0


def test_stop_waiting_forgets_the_clients_still_out() -> None:
    company = ReturningCompany(cap=8)
    company.answered(2, 2, 0.01)
    company.arrived()
    assert company.wait_s() == pytest.approx(0.01)  # one of the two may still come
    company.stop_waiting()  # it did not, within the wait
    assert company.outstanding == 0 and company.wait_s() == 0.0


@given(
    st.lists(st.tuples(st.integers(1, 256), st.floats(1e-5, 1.0, allow_nan=False)), min_size=1, max_size=80)
)
def test_fixed_cost_never_exceeds_the_fastest_recent_run(runs: list[tuple[int, float]]) -> None:
    """Whatever the runs look like (noise, negative slopes), the wait is within [0, fastest run]:
    never longer than running the lone request would have cost."""
    company = ReturningCompany(cap=256)
    for rows, seconds in runs:
        company.answered(1, rows, seconds)
    fastest = min(s for _, s in runs[-32:])
    assert 0.0 <= company.fixed_cost_s() <= fastest
