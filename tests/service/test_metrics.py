"""ServiceMetrics and RequestMetricsMiddleware: what is exposed equals what was observed.

The exposition is parsed with prometheus_client's own parser, as a scraper would read it.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Iterator, Sequence

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bench.servers import free_port
from service.metrics import (
    DENSITY_BUCKETS,
    INPUT_DENSITY_BUCKETS,
    MAX_CLASS_LABELS,
    OTHER_CLASS,
    P_VALUE_BUCKETS,
    REJECT_REASONS,
    UNMATCHED_ROUTE,
    RequestMetricsMiddleware,
    ServiceMetrics,
)
from service.metrics.batch_histogram import SMALL_BATCH, BatchHistogram

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: ServiceMetrics) -> Samples:
    text = generate_latest(metrics.registry).decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def assert_histogram(
    samples: Samples, name: str, observed: np.ndarray, buckets: Sequence[float], **labels: str
) -> None:
    """Histogram `name` holds exactly `observed`: each bucket counts the values at or below its bound,
    compared in the values' own precision (as the server compares them), +Inf counts them all, and
    _sum is their sum."""
    for bound in buckets:
        expected = int((observed <= np.asarray(bound, dtype=observed.dtype)).sum())
        assert value(samples, f"{name}_bucket", le=repr(float(bound)), **labels) == expected, bound
    assert value(samples, f"{name}_bucket", le="+Inf", **labels) == observed.size
    total = observed.astype(np.float64).sum()
    assert value(samples, f"{name}_sum", **labels) == pytest.approx(total, rel=1e-9)


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def classification_outputs(
    rng: np.random.Generator, n: int, classes: int, alpha: float
) -> dict[str, np.ndarray]:
    probs = rng.dirichlet(np.ones(classes), size=n).astype(np.float32)
    p_values = rng.integers(1, 101, size=n) / 101.0  # conformal p-values are (1 + k) / (n_cal + 1)
    return {
        "probabilities": probs,
        "label": probs.argmax(axis=1).astype(np.int64),
        "ood_p_value": p_values.astype(np.float32),
        "ood_flag": p_values <= alpha,
        "ood_alpha": np.full(n, alpha, np.float32),
        "mutual_information": rng.exponential(0.05, size=n).astype(np.float32),
        "disagreement": (rng.integers(0, 6, size=n) / 5.0).astype(np.float32),
    }


def test_uncertainty_counts_equal_observations() -> None:
    rng = np.random.default_rng(0)
    metrics = ServiceMetrics()
    labels = [f"c{k}" for k in range(7)]
    batches = [classification_outputs(rng, n, 7, 0.05) for n in (1, 33, 250)]
    for out in batches:
        metrics.observe_uncertainty("clf", "1", out, 0.05, labels)
    s = scrape(metrics)
    mv = {"model": "clf", "version": "1"}

    p = np.concatenate([b["ood_p_value"] for b in batches]).astype(np.float64)
    flags = np.concatenate([b["ood_flag"] for b in batches])
    assert value(s, "hydra_predictions_total", **mv) == p.size
    assert value(s, "hydra_ood_flagged_total", **mv) == int(flags.sum()) > 0
    assert value(s, "hydra_ood_alpha", **mv) == pytest.approx(0.05)
    for bound in P_VALUE_BUCKETS:
        expected = int((p <= bound).sum())  # no p-value here lies within float32 rounding of a bound
        assert value(s, "hydra_ood_p_value_bucket", le=repr(float(bound)), **mv) == expected, bound
    assert value(s, "hydra_ood_p_value_bucket", le="+Inf", **mv) == p.size
    assert value(s, "hydra_ood_p_value_count", **mv) == p.size
    assert value(s, "hydra_ood_p_value_sum", **mv) == pytest.approx(p.sum(), rel=1e-9)
    # the flag counter and the bucket at α agree: both are p ≤ α
    assert value(s, "hydra_ood_p_value_bucket", le="0.05", **mv) == value(s, "hydra_ood_flagged_total", **mv)

    mi = np.concatenate([b["mutual_information"] for b in batches]).astype(np.float64)
    assert value(s, "hydra_mutual_information_nats_count", **mv) == mi.size
    assert value(s, "hydra_mutual_information_nats_bucket", le="0.05", **mv) == int((mi <= 0.05).sum())
    dis = np.concatenate([b["disagreement"] for b in batches]).astype(np.float64)
    assert value(s, "hydra_vote_disagreement_ratio_bucket", le="0.0", **mv) == int((dis <= 0).sum())
    assert value(s, "hydra_vote_disagreement_ratio_count", **mv) == dis.size

    predicted = collections.Counter(int(k) for b in batches for k in b["label"])
    for k, name in enumerate(labels):
        # every class is exported, a class never predicted as 0
        assert value(s, "hydra_predicted_class_total", label=name, **mv) == predicted.get(k, 0)
    assert "hydra_head_spread_count" not in names(s)  # regression-only metric stays empty


def test_regression_outputs_fill_spread_not_classification_metrics() -> None:
    metrics = ServiceMetrics()
    spread = np.array([0.001, 0.3, 7.0, 2000.0], np.float32)
    out = {
        "mean": np.zeros(4, np.float32),
        "disagreement": spread,
        "ood_p_value": np.array([0.5, 0.01, 1.0, 0.2], np.float32),
        "ood_flag": np.array([False, True, False, False]),
    }
    metrics.observe_uncertainty("reg", "3", out, 0.1, None)
    s = scrape(metrics)
    mv = {"model": "reg", "version": "3"}
    assert value(s, "hydra_head_spread_count", **mv) == 4
    assert value(s, "hydra_head_spread_bucket", le="0.5", **mv) == 2
    assert value(s, "hydra_head_spread_bucket", le="1000.0", **mv) == 3
    assert value(s, "hydra_ood_flagged_total", **mv) == 1
    assert value(s, "hydra_ood_alpha", **mv) == pytest.approx(0.1)
    assert not any(name.startswith("hydra_predicted_class_total") for name in names(s))
    assert "hydra_mutual_information_nats_count" not in names(s)


def test_density_scores_are_counted_only_for_outputs_that_carry_them() -> None:
    rng = np.random.default_rng(4)
    metrics = ServiceMetrics()
    # squared Mahalanobis distances: ~ the body width on ID rows, far larger off the data
    density = np.r_[rng.chisquare(64, 200), [0.05, 3e5, 2e6]].astype(np.float32)
    with_density = classification_outputs(rng, density.size, 3, 0.05) | {"density_score": density}
    metrics.observe_uncertainty("dens", "1", with_density, 0.05, None)
    regression = {
        "mean": np.zeros(2, np.float32),
        "disagreement": np.ones(2, np.float32),
        "density_score": np.array([10.0, 700.0], np.float32),
        "ood_p_value": np.ones(2, np.float32),
        "ood_flag": np.zeros(2, bool),
    }
    metrics.observe_uncertainty("dens_reg", "2", regression, 0.1, None)
    metrics.observe_uncertainty("clf", "1", classification_outputs(rng, 5, 3, 0.05), 0.05, None)
    s = scrape(metrics)
    mv = {"model": "dens", "version": "1"}
    assert_histogram(s, "hydra_density_score", density, DENSITY_BUCKETS, **mv)
    # ID values of a 64-wide body land in the resolved middle of the buckets, not in an end bucket
    assert value(s, "hydra_density_score_bucket", le="20.0", **mv) < 5
    assert value(s, "hydra_density_score_bucket", le="200.0", **mv) > 195
    assert value(s, "hydra_density_score_count", model="dens_reg", version="2") == 2
    assert value(s, "hydra_density_score_bucket", model="dens_reg", version="2", le="700.0") == 2
    assert ("hydra_density_score_count", frozenset({"model": "clf", "version": "1"}.items())) not in s
    metrics.remove_model("dens", "1")
    assert ("hydra_density_score_count", frozenset(mv.items())) not in scrape(metrics)
    # a loaded density model exports its histogram at zero before traffic (rate() then sees the
    # first batch); a model without a density exports none
    metrics.set_model_info("dens", "3", heads=4, provider="CPUExecutionProvider", has_density=True)
    metrics.set_model_info("clf", "3", heads=4, provider="CPUExecutionProvider")
    s = scrape(metrics)
    assert value(s, "hydra_density_score_count", model="dens", version="3") == 0
    assert ("hydra_density_score_count", frozenset({"model": "clf", "version": "3"}.items())) not in s


def test_input_density_scores_are_counted_only_for_outputs_that_carry_them() -> None:
    """χ²_d-like values for d = 2 … 784 (and rows shrunk ×0.1 towards the mean: ~d/100) all land
    inside the buckets, not in an end bucket; loaded models export zeros; unloading drops them."""
    rng = np.random.default_rng(5)
    metrics = ServiceMetrics()
    assert INPUT_DENSITY_BUCKETS[0] == 0.01 and INPUT_DENSITY_BUCKETS[-1] == 1e6
    assert (np.diff(np.log10(INPUT_DENSITY_BUCKETS)) <= np.log10(2.0) + 1e-9).all()  # ≤ 2× apart
    for d in (2, 64, 784):
        for shrink in (1.0, 0.01):  # ‖0.1 z‖² = 0.01 ‖z‖²
            values = (shrink * rng.chisquare(d, 400)).astype(np.float32)
            median = float(np.median(values))
            assert INPUT_DENSITY_BUCKETS[0] < median < INPUT_DENSITY_BUCKETS[-1], (d, shrink)
    typical = np.r_[rng.chisquare(8, 300), 0.01 * rng.chisquare(8, 100), [0.0, 2e6]].astype(np.float32)
    outputs = classification_outputs(rng, typical.size, 3, 0.05) | {
        "density_score": rng.chisquare(16, typical.size).astype(np.float32),
        "input_density_score": typical,
    }
    metrics.observe_uncertainty("dens", "1", outputs, 0.05, None)
    metrics.observe_uncertainty("clf", "1", classification_outputs(rng, 5, 3, 0.05), 0.05, None)
    s = scrape(metrics)
    mv = {"model": "dens", "version": "1"}
    assert_histogram(s, "hydra_input_density_score", typical, INPUT_DENSITY_BUCKETS, **mv)
    assert value(s, "hydra_density_score_count", **mv) == typical.size  # both observed, apart
    assert ("hydra_input_density_score_count", frozenset({"model": "clf", "version": "1"}.items())) not in s
    metrics.remove_model("dens", "1")
    assert ("hydra_input_density_score_count", frozenset(mv.items())) not in scrape(metrics)
    # zero-initialised on load, independently of the body density's histogram
    metrics.set_model_info(
        "both", "1", heads=4, provider="CPUExecutionProvider", has_density=True, has_input_density=True
    )
    metrics.set_model_info(
        "input_only", "1", heads=4, provider="CPUExecutionProvider", has_input_density=True
    )
    metrics.set_model_info("plain", "1", heads=4, provider="CPUExecutionProvider")
    s = scrape(metrics)
    for model, has_density, has_input_density in (
        ("both", True, True),
        ("input_only", False, True),
        ("plain", False, False),
    ):
        labels = frozenset({"model": model, "version": "1"}.items())
        assert (("hydra_density_score_count", labels) in s) is has_density, model
        assert (("hydra_input_density_score_count", labels) in s) is has_input_density, model
        if has_input_density:
            assert s[("hydra_input_density_score_count", labels)] == 0


def test_class_labels_are_capped_with_other() -> None:
    metrics = ServiceMetrics()
    classes = MAX_CLASS_LABELS + 10
    label_names = [f"class_{k}" for k in range(classes)]
    labels = np.array([0, 0, 3, MAX_CLASS_LABELS - 1, MAX_CLASS_LABELS, classes - 1, classes - 1], np.int64)
    n = labels.size
    out = {
        "probabilities": np.full((n, classes), 1.0 / classes, np.float32),
        "label": labels,
        "ood_p_value": np.ones(n, np.float32),
        "ood_flag": np.zeros(n, bool),
        "mutual_information": np.zeros(n, np.float32),
        "disagreement": np.zeros(n, np.float32),
    }
    metrics.observe_uncertainty("big", "1", out, 0.05, label_names)
    s = scrape(metrics)
    exported = {
        dict(lbls)["label"]: v for (name, lbls), v in s.items() if name == "hydra_predicted_class_total"
    }
    assert len(exported) == MAX_CLASS_LABELS + 1
    assert exported[OTHER_CLASS] == 3
    assert exported["class_0"] == 2
    assert exported["class_3"] == 1
    assert exported[f"class_{MAX_CLASS_LABELS - 1}"] == 1
    assert f"class_{MAX_CLASS_LABELS}" not in exported
    assert sum(exported.values()) == n


def test_known_series_are_exported_as_zero_before_traffic() -> None:
    metrics = ServiceMetrics()
    metrics.set_model_info("clf", "2", heads=5, provider="CPUExecutionProvider")
    metrics.set_model_ready("clf", "2", True)
    s = scrape(metrics)
    mv = {"model": "clf", "version": "2"}
    assert value(s, "hydra_model_info", heads="5", provider="CPUExecutionProvider", **mv) == 1
    assert value(s, "hydra_model_ready", **mv) == 1
    assert value(s, "hydra_predictions_total", **mv) == 0
    assert value(s, "hydra_ood_flagged_total", **mv) == 0
    assert value(s, "hydra_ood_p_value_count", **mv) == 0
    assert value(s, "hydra_batch_size_rows_count", **mv) == 0
    assert value(s, "hydra_queue_wait_seconds_count", **mv) == 0
    assert value(s, "hydra_queue_depth_rows", model="clf") == 0
    assert value(s, "hydra_in_flight_requests", model="clf") == 0
    for reason in REJECT_REASONS:
        assert value(s, "hydra_rejected_requests_total", model="clf", reason=reason) == 0

    metrics.set_model_ready("clf", "2", False)
    metrics.set_model_info("clf", "2", heads=5, provider="CUDAExecutionProvider")
    s = scrape(metrics)
    assert value(s, "hydra_model_ready", **mv) == 0
    info = [lbls for (name, lbls), _ in s.items() if name == "hydra_model_info"]
    assert info == [frozenset({**mv, "heads": "5", "provider": "CUDAExecutionProvider"}.items())]


def test_batch_queue_and_rejection_metrics() -> None:
    metrics = ServiceMetrics()
    waits = np.array([0.0002, 0.003, 0.003, 0.7])
    metrics.observe_batch("clf", "1", rows=9, compute_seconds=0.004, queue_wait_seconds=waits)
    metrics.observe_batch("clf", "1", rows=1, compute_seconds=0.002, queue_wait_seconds=np.array([0.01]))
    metrics.set_queue_depth("clf", 17)
    metrics.set_in_flight("clf", 3)
    metrics.inc_rejected("clf", "queue_full")
    metrics.inc_rejected("clf", "queue_full")
    metrics.inc_rejected("clf", "deadline")
    metrics.inc_load_failure("broken", "invalid_manifest")
    s = scrape(metrics)
    mv = {"model": "clf", "version": "1"}
    assert value(s, "hydra_batch_size_rows_count", **mv) == 2
    assert value(s, "hydra_batch_size_rows_sum", **mv) == 10
    assert value(s, "hydra_batch_size_rows_bucket", le="8.0", **mv) == 1
    assert value(s, "hydra_batch_compute_seconds_sum", **mv) == pytest.approx(0.006)
    assert value(s, "hydra_queue_wait_seconds_count", **mv) == 5
    assert value(s, "hydra_queue_wait_seconds_bucket", le="0.0025", **mv) == 1
    assert value(s, "hydra_queue_wait_seconds_bucket", le="0.01", **mv) == 4
    assert value(s, "hydra_queue_wait_seconds_sum", **mv) == pytest.approx(waits.sum() + 0.01)
    assert value(s, "hydra_queue_depth_rows", model="clf") == 17
    assert value(s, "hydra_in_flight_requests", model="clf") == 3
    assert value(s, "hydra_rejected_requests_total", model="clf", reason="queue_full") == 2
    assert value(s, "hydra_rejected_requests_total", model="clf", reason="deadline") == 1
    assert value(s, "hydra_model_load_failures_total", model="broken", reason="invalid_manifest") == 1


def test_remove_model_drops_its_series_only() -> None:
    rng = np.random.default_rng(1)
    metrics = ServiceMetrics()
    for version in ("1", "2"):
        metrics.set_model_info("clf", version, 4, "CPUExecutionProvider")
        metrics.set_model_ready("clf", version, True)
        metrics.observe_batch("clf", version, 3, 0.001, np.zeros(3))
        metrics.observe_uncertainty("clf", version, classification_outputs(rng, 5, 3, 0.05), 0.05, None)
    metrics.set_queue_depth("clf", 2)
    metrics.remove_model("clf", "1")
    s = scrape(metrics)
    versions = {dict(lbls).get("version") for (_, lbls) in s if dict(lbls).get("model") == "clf"}
    assert versions == {"2", None}  # None: the model-only gauges, kept while version 2 is served
    metrics.remove_model("clf", "2")
    s = scrape(metrics)
    assert not any(dict(lbls).get("model") == "clf" for (_, lbls) in s)
    # served again after its removal: it counts from zero, in series that are exported again (the
    # children the hot paths keep were dropped with the series)
    metrics.observe_batch("clf", "1", 3, 0.001, np.zeros(3))
    metrics.observe_uncertainty("clf", "1", classification_outputs(rng, 5, 3, 0.05), 0.05, None)
    metrics.set_queue_depth("clf", 4)
    metrics.inc_rejected("clf", "queue_full")
    s = scrape(metrics)
    assert value(s, "hydra_predictions_total", model="clf", version="1") == 5
    assert value(s, "hydra_batch_size_rows_count", model="clf", version="1") == 1
    assert value(s, "hydra_queue_depth_rows", model="clf") == 4
    assert value(s, "hydra_rejected_requests_total", model="clf", reason="queue_full") == 1


def test_concurrent_batches_are_all_counted() -> None:
    metrics = ServiceMetrics()
    rng = np.random.default_rng(2)
    batch = classification_outputs(rng, 100, 4, 0.05)

    def work() -> None:
        for _ in range(50):
            metrics.observe_uncertainty("clf", "1", batch, 0.05, None)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = scrape(metrics)
    assert value(s, "hydra_ood_p_value_count", model="clf", version="1") == 4 * 50 * 100
    assert value(s, "hydra_predictions_total", model="clf", version="1") == 4 * 50 * 100


def test_float32_values_on_a_bucket_bound_fall_in_that_bucket() -> None:
    """The served p-values are FP32: one equal to α is flagged (p <= α) and must count in le=α."""
    metrics = ServiceMetrics()
    p = np.array([0.05, 0.05, 0.1, 1.0, 0.0500001], np.float32)
    out = {"ood_p_value": p, "ood_flag": p <= np.float32(0.05), "disagreement": np.zeros(5, np.float32)}
    metrics.observe_uncertainty("reg", "1", out, 0.05, None)
    s = scrape(metrics)
    mv = {"model": "reg", "version": "1"}
    assert value(s, "hydra_ood_p_value_bucket", le="0.05", **mv) == 2
    assert value(s, "hydra_ood_p_value_bucket", le="0.05", **mv) == value(s, "hydra_ood_flagged_total", **mv)
    assert value(s, "hydra_ood_p_value_bucket", le="0.1", **mv) == 4
    assert value(s, "hydra_ood_p_value_bucket", le="0.9", **mv) == 4


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([np.float32, np.float64]),
    st.lists(
        st.one_of(
            st.sampled_from([0.0, 0.001, 0.01, 0.05, 0.1, 0.5, 1.0, np.nan, np.inf, -np.inf]),
            st.floats(-1.0, 2.0),
        ),
        min_size=1,
        max_size=40,
    ),
    st.integers(1, SMALL_BATCH),
)
def test_small_batches_land_in_the_buckets_the_vectorised_path_gives(
    dtype: type[np.floating], values: list[float], chunk: int
) -> None:
    """Batches of at most SMALL_BATCH values are bucketed in Python: the same `le` buckets (bounds
    rounded to float32 for float32 values) as one vectorised call over all of them."""
    bounds = [0.001, 0.01, 0.05, 0.1, 0.5, 1.0]
    v = np.asarray(values, dtype=dtype)
    few, many = BatchHistogram("few", "", ["m"], bounds), BatchHistogram("many", "", ["m"], bounds)
    for start in range(0, v.size, chunk):
        few.observe_many(["x"], v[start : start + chunk])
    many.observe_many(["x"], np.concatenate([v, np.full(SMALL_BATCH + 1, np.nan, dtype)]))
    (few_counts, few_sum), (many_counts, many_sum) = few._series[("x",)], many._series[("x",)]
    np.testing.assert_array_equal(few_counts, many_counts)
    assert few_sum[0] == pytest.approx(many_sum[0], rel=1e-12, abs=1e-12)


def test_non_finite_values_are_not_bucketed() -> None:
    metrics = ServiceMetrics()
    metrics.observe_batch("m", "1", 3, 0.001, np.array([0.001, np.nan, np.inf]))
    s = scrape(metrics)
    assert value(s, "hydra_queue_wait_seconds_count", model="m", version="1") == 1
    assert value(s, "hydra_queue_wait_seconds_sum", model="m", version="1") == pytest.approx(0.001)


# -- middleware against a real uvicorn server -------------------------------------------------------


@pytest.fixture()
def served_app() -> Iterator[tuple[str, ServiceMetrics]]:
    metrics = ServiceMetrics()
    app = FastAPI()

    @app.get("/v2/models/{model_name}/ready")
    async def ready(model_name: str) -> dict[str, str]:
        return {"name": model_name}

    @app.post("/fail")
    async def fail() -> None:
        raise RuntimeError("boom")

    app.mount("/metrics", metrics.asgi_app())
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", metrics
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_middleware_labels_requests_with_route_templates(served_app: tuple[str, ServiceMetrics]) -> None:
    base, metrics = served_app
    with httpx.Client(base_url=base, timeout=5) as client:
        for name in ("a", "b", "c"):
            assert client.get(f"/v2/models/{name}/ready").status_code == 200
        assert client.get("/no/such/path/123").status_code == 404
        exposition = client.get("/metrics/")
        assert exposition.status_code == 200
    # an unhandled exception escapes through the middleware; uvicorn then drops the connection (own client)
    with httpx.Client(base_url=base, timeout=5) as client, contextlib.suppress(httpx.TransportError):
        assert client.post("/fail").status_code == 500
    # the /metrics request itself is recorded after its body went out: scrape again
    s = scrape(metrics)
    route = "/v2/models/{model_name}/ready"
    assert value(s, "hydra_requests_total", protocol="http", route=route, method="GET", code="200") == 3
    assert value(s, "hydra_request_duration_seconds_count", protocol="http", route=route, method="GET") == 3
    unmatched = {"protocol": "http", "route": UNMATCHED_ROUTE, "method": "GET", "code": "404"}
    assert value(s, "hydra_requests_total", **unmatched) == 1
    assert value(s, "hydra_requests_total", protocol="http", route="/fail", method="POST", code="500") == 1
    assert value(s, "hydra_requests_total", protocol="http", route="/metrics", method="GET", code="200") == 1
    routes = {dict(lbls)["route"] for (name, lbls) in s if name == "hydra_requests_total"}
    assert routes == {route, UNMATCHED_ROUTE, "/fail", "/metrics"}  # never a raw path
    # the served exposition is this registry's
    assert "hydra_request_duration_seconds" in exposition.text


def test_large_batches_are_counted_without_a_per_row_loop() -> None:
    """200k rows in one call: vectorised counting takes milliseconds; a Python loop over rows (a few µs
    per row and metric) would take seconds. The bound leaves ample room for a loaded machine."""
    rng = np.random.default_rng(3)
    out = classification_outputs(rng, 200_000, 10, 0.05)
    metrics = ServiceMetrics()
    metrics.observe_uncertainty("clf", "1", out, 0.05, [str(k) for k in range(10)])  # series created
    start = time.perf_counter()
    metrics.observe_uncertainty("clf", "1", out, 0.05, [str(k) for k in range(10)])
    metrics.observe_batch("clf", "1", 200_000, 0.1, np.full(200_000, 0.001))
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"{elapsed:.3f} s for 200k rows"
    assert value(scrape(metrics), "hydra_ood_p_value_count", model="clf", version="1") == 400_000
