"""The transfer set: training inputs first, then perturbed copies, deterministic for a seed."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from training.config import DataConfig, DistilConfig, RunConfig
from training.data import load_data
from training.distill import transfer_inputs


def test_transfer_set_layout_and_determinism() -> None:
    data = load_data(DataConfig(dataset="digits", max_train_rows=50))
    cfg = replace(
        RunConfig(), distil=DistilConfig(mixup_copies=1, noise_copies=1, shift_copies=2, shift_pixels=1)
    )
    x = transfer_inputs(cfg, data, seed=0)
    n = len(data.train)
    assert x.shape == (5 * n, 64) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:n], data.train.x)  # the training inputs themselves come first
    np.testing.assert_array_equal(x, transfer_inputs(cfg, data, seed=0))
    assert not np.array_equal(x, transfer_inputs(cfg, data, seed=1))
    # mixup blends stay inside the per-pixel range of the data
    mix = x[n : 2 * n]
    assert mix.min() >= 0 and mix.max() <= 16
    # a shifted copy keeps the image's pixels, only moved (zero fill at the border): same values or fewer
    shifted = x[3 * n : 4 * n].reshape(n, 8, 8)
    for img, orig in zip(shifted, data.train.x.reshape(n, 8, 8), strict=True):
        assert img.sum() <= orig.sum() + 1e-4
        found = any(
            np.array_equal(
                img[max(dy, 0) : 8 + min(dy, 0), max(dx, 0) : 8 + min(dx, 0)],
                orig[max(-dy, 0) : 8 + min(-dy, 0), max(-dx, 0) : 8 + min(-dx, 0)],
            )
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        )
        assert found


def test_shift_copies_apply_to_images_only() -> None:
    data = load_data(DataConfig(dataset="toy", max_train_rows=40))
    cfg = replace(RunConfig(), distil=DistilConfig(mixup_copies=0, noise_copies=0, shift_copies=3))
    assert transfer_inputs(cfg, data, seed=0).shape == (40, 1)
