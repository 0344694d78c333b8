"""A member cut out of the shipped ensemble graph computes exactly that member's slice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bench.flops import count_flops
from bench.members import NotAnEnsembleGraph, extract_member

ENSEMBLE = Path(__file__).resolve().parents[2] / "models" / "digits" / "1" / "ensemble.onnx"


def test_member_matches_its_slice_of_the_ensemble() -> None:
    ensemble = onnx.load(str(ENSEMBLE))
    rows = np.random.default_rng(0).uniform(0, 16, (7, 64)).astype(np.float32)
    full = ort.InferenceSession(str(ENSEMBLE)).run(None, {"input": rows})[0]  # (7, M, 10)
    for m in (0, full.shape[1] - 1):
        member = extract_member(ensemble, m)
        got = ort.InferenceSession(member.SerializeToString()).run(None, {"input": rows})[0]
        assert got.shape == (7, 1, 10)
        np.testing.assert_allclose(got, full[:, m : m + 1], atol=1e-6)
    # the ensemble's FLOPs are its members' plus at most the output op on the concatenated heads
    member_flops = count_flops(extract_member(ensemble, 0)).total
    assert full.shape[1] * member_flops == pytest.approx(count_flops(ensemble).total, rel=0.01)


def test_graph_without_a_member_concat_is_refused() -> None:
    model = onnx.load(str(ENSEMBLE.with_name("model.onnx")))
    with pytest.raises(NotAnEnsembleGraph):
        extract_member(model, 0)
