"""Splits, OOD sets and bring-your-own files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.config import DataConfig
from training.data import load_data


def _rows(x: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in x.reshape(len(x), -1)}


def test_digits_splits_are_disjoint_and_ood_sets_unseen() -> None:
    data = load_data(DataConfig(dataset="digits"))
    parts = [data.train.x, data.val.x, data.cal.x, data.test.x]
    assert sum(len(p) for p in parts) == 1797
    assert len(data.cal) > 250 and len(data.test) > 250  # enough for a conformal false-alarm estimate
    train = _rows(data.train.x)
    assert not train & _rows(data.cal.x) and not train & _rows(data.test.x)
    for name, x in data.ood.items():
        assert x.shape[1:] == data.row_shape and x.dtype == np.float32, name
        assert len(train & _rows(x)) < 0.05 * len(x), name
    assert set(np.unique(data.train.y)) == set(range(10))  # stratified


def test_splits_are_fixed_by_split_seed() -> None:
    a = load_data(DataConfig(dataset="toy"))
    b = load_data(DataConfig(dataset="toy"))
    np.testing.assert_array_equal(a.cal.x, b.cal.x)
    assert a.sha256 == b.sha256
    c = load_data(DataConfig(dataset="toy", split_seed=1))
    assert not np.array_equal(a.cal.x, c.cal.x)


def test_npz_with_feature_matrix(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x=rng.standard_normal((100, 2, 3)), label=rng.integers(0, 3, 100))
    data = load_data(DataConfig(dataset="file", path=str(path), target="label", task="classification"))
    assert data.row_shape == (6,) and data.labels == ["0", "1", "2"]


def test_non_numeric_feature_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text(
        "colour,y\n" + "\n".join(f"{c},{i % 2}" for i, c in enumerate(["red", "blue"] * 20)) + "\n"
    )
    with pytest.raises(ValueError, match="not numeric"):
        load_data(DataConfig(dataset="file", path=str(path), target="y", task="classification"))
