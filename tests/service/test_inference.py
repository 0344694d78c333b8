"""service.inference: the answer tensors follow service.uncertainty exactly, per-request α and level."""

from __future__ import annotations

from statistics import NormalDist
from typing import Any

import numpy as np
import pytest

from service import inference
from service.batch_request import RowSlice
from service.manifest import ModelManifest
from service.uncertainty import ConformalOODCalibrator, classification_uncertainty, log_softmax


def manifest(task: str) -> ModelManifest:
    common = {"name": "m", "version": 1, "heads": 3, "provenance": {"dataset": "x"}}
    if task == "classification":
        return ModelManifest.model_validate(
            common | {"task": task, "input": {"name": "input", "shape": [-1, 2]},
                      "labels": ["a", "b", "c", "d"], "outputs": {"log_probs": "log_probs"},
                      "ood": {"score": "epkl", "calibration_scores": [0.1, 0.2, 0.3, 0.4]}}
        )  # fmt: skip
    return ModelManifest.model_validate(
        common | {"task": task, "input": {"name": "input", "shape": [-1, 2]},
                  "outputs": {"mean": "mean", "variance": "variance"},
                  "ood": {"score": "disagreement", "calibration_scores": [0.5, 1.0, 2.0]}}
    )  # fmt: skip


def test_classification_answer_matches_the_shared_math() -> None:
    m = manifest("classification")
    log_p = log_softmax(np.random.default_rng(0).normal(0, 3, (6, 3, 4)))
    calibrator = ConformalOODCalibrator(m.ood.calibration_scores)
    out = inference.finalise(
        m, inference.summarise(m, calibrator, {"log_probs": log_p}), alpha=0.4, include_heads=True
    )
    u = classification_uncertainty(log_p)
    assert [n for n, _, _ in inference.output_specs(m)] == list(out)
    np.testing.assert_allclose(out["probabilities"], u.mean_probs, rtol=1e-6)
    np.testing.assert_array_equal(out["label"], u.label)
    assert out["label_name"].tolist() == [m.labels[i] for i in u.label]  # type: ignore[index]
    np.testing.assert_allclose(out["ood_score"], u.epkl, rtol=1e-6)
    np.testing.assert_allclose(out["ood_p_value"], calibrator.p_values(u.epkl), rtol=1e-6)
    np.testing.assert_array_equal(out["ood_flag"], calibrator.flags(u.epkl, 0.4))
    np.testing.assert_allclose(out["heads"], np.exp(log_p), rtol=1e-5)
    assert out["heads"].shape == (6, 3, 4) and out["ood_alpha"].tolist() == [pytest.approx(0.4)] * 6
    assert {k: v.dtype.kind for k, v in out.items() if k in ("label", "ood_flag", "label_name")} == {
        "label": "i", "ood_flag": "b", "label_name": "O"}  # fmt: skip


def test_regression_interval_at_the_requested_level() -> None:
    m = manifest("regression")
    rng = np.random.default_rng(1)
    mu, var = rng.normal(0, 2, (5, 3)), rng.uniform(0.1, 1, (5, 3))
    calibrator = ConformalOODCalibrator(m.ood.calibration_scores)
    summary = inference.summarise(m, calibrator, {"mean": mu, "variance": var})
    out = inference.finalise(m, summary, alpha=0.3, level=0.8)
    total = var.mean(axis=1) + mu.var(axis=1)
    half = NormalDist().inv_cdf(0.9) * np.sqrt(total)
    np.testing.assert_allclose(out["interval_lower"], mu.mean(axis=1) - half, rtol=1e-5)
    np.testing.assert_allclose(out["interval_upper"], mu.mean(axis=1) + half, rtol=1e-5)
    np.testing.assert_allclose(out["disagreement"], mu.std(axis=1), rtol=1e-5)
    assert "heads_mean" not in out and out["interval_level"].tolist() == [pytest.approx(0.8)] * 5


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_requests_sliced_from_one_batch_get_the_answers_of_their_own_rows(task: str) -> None:
    """The batcher hands each request a RowSlice of its batch's summary; the answer's dtypes are
    converted once per batch (shared by the slices) and each request's answer is exactly what
    finalising its own rows alone gives."""
    m = manifest(task)
    rng = np.random.default_rng(1)
    raw = (
        {"log_probs": log_softmax(rng.normal(0, 3, (7, 3, 4)))}
        if task == "classification"
        else {"mean": rng.normal(size=(7, 3)), "variance": rng.uniform(0.1, 2.0, (7, 3))}
    )
    summary = inference.summarise(m, ConformalOODCalibrator(m.ood.calibration_scores), raw)
    casts: dict[tuple[str, np.dtype[Any]], np.ndarray] = {}
    cuts = [(0, 1), (1, 4), (4, 7)]
    for start, stop in cuts:
        shared = inference.finalise(
            m, RowSlice(summary, start, stop, casts), alpha=0.3, level=0.8, include_heads=True
        )
        alone = inference.finalise(
            m, {k: v[start:stop] for k, v in summary.items()}, alpha=0.3, level=0.8, include_heads=True
        )
        assert list(shared) == list(alone)
        for name in alone:
            assert shared[name].dtype == alone[name].dtype, name
            np.testing.assert_array_equal(shared[name], alone[name], err_msg=name)
    # one converted copy per tensor for the whole batch, not one per request
    assert casts and all(column.shape[0] == 7 for column in casts.values())
    assert len(casts) == len({name for name, _ in casts})
