"""training/evaluate.py's metric pieces against numbers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluate import ReliabilityBins


def test_ece_by_hand() -> None:
    # two bins hold rows: confidence 0.95 with half right, 0.55 with all right
    conf = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([True, False, True, True])
    bins = ReliabilityBins.of(conf, correct)
    np.testing.assert_allclose(bins.confidence, [0.55, 0.95])
    np.testing.assert_allclose(bins.accuracy, [1.0, 0.5])
    assert bins.count.tolist() == [2, 2]
    assert bins.ece == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)


def test_perfectly_calibrated_bins_have_zero_ece_and_edges_fall_low() -> None:
    # 1.0 lands in the top bin, 0.0 in the bottom one; each bin right exactly as often as confident
    conf = np.array([1.0, 1.0, 0.0])
    correct = np.array([True, True, False])
    bins = ReliabilityBins.of(conf, correct, bins=10)
    assert bins.count.tolist() == [1, 2] and bins.ece == 0.0
