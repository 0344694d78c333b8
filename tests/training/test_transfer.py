"""The transfer set: training inputs first, then each family with its defining property,
deterministic for a seed; and the radial temperature factor."""

from __future__ import annotations

import numpy as np
import pytest

from training.config import DataConfig, DistilConfig
from training.data import load_data
from training.transfer import radial_scale, transfer_inputs, transfer_parts

NONE = DistilConfig(mixup_copies=0, noise_copies=0, far_copies=0, marginal_copies=0, extrapolate_copies=0)


def test_layout_and_determinism() -> None:
    data = load_data(DataConfig(dataset="digits", max_train_rows=50))
    dc = DistilConfig(shift_copies=2, shift_pixels=1)
    x = transfer_inputs(dc, data, seed=0)
    n = len(data.train)
    copies = 1 + dc.mixup_copies + dc.noise_copies + dc.far_copies + dc.marginal_copies
    copies += dc.extrapolate_copies + dc.shift_copies
    assert x.shape == (copies * n, 64) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:n], data.train.x)  # the training inputs themselves come first
    np.testing.assert_array_equal(x, transfer_inputs(dc, data, seed=0))
    assert not np.array_equal(x, transfer_inputs(dc, data, seed=1))
    # adding copies of one family leaves every other family's rows as they were
    more = transfer_parts(DistilConfig(shift_copies=2, shift_pixels=1, far_copies=6), data, seed=0)
    base = transfer_parts(dc, data, seed=0)
    for family in ("mixup", "noise", "marginals", "extrapolate", "shifted"):
        np.testing.assert_array_equal(base[family], more[family])


def test_each_family_has_its_defining_property() -> None:
    data = load_data(DataConfig(dataset="diabetes"))
    train = data.train.x.astype(np.float64)
    lo, hi, std = train.min(axis=0), train.max(axis=0), train.std(axis=0)
    parts = transfer_parts(DistilConfig(), data, seed=3)
    assert set(parts) == {"train", "mixup", "noise", "far", "marginals", "extrapolate"}
    # mixup blends stay inside each feature's training range
    assert np.all(parts["mixup"] >= lo - 1e-9) and np.all(parts["mixup"] <= hi + 1e-9)
    # product of marginals: every value of column j is a training value of column j, rows are new
    m = parts["marginals"]
    for j in range(train.shape[1]):
        assert np.isin(m[:, j], train[:, j]).all()
    assert not np.isin(
        m.view([("", m.dtype)] * m.shape[1]), train.view([("", train.dtype)] * train.shape[1])
    ).all()
    # far noise spans orders of magnitude of the per-feature std, some rows moving one axis only
    far = parts["far"]
    n = len(train)
    delta = (far - np.tile(train, (len(far) // n, 1))) / std
    size = np.abs(delta).max(axis=1)
    assert np.quantile(size, 0.05) < 1.0 and np.quantile(size, 0.95) > 100.0
    moved = (np.abs(delta) > 0).sum(axis=1)
    assert (
        moved.min() >= 1 and (moved < train.shape[1]).mean() > 0.2 and (moved == train.shape[1]).mean() > 0.4
    )
    # extrapolation leaves the training range along row differences
    out_of_range = (parts["extrapolate"] < lo) | (parts["extrapolate"] > hi)
    assert out_of_range.any(axis=1).mean() > 0.3


def test_shift_copies_apply_to_images_only() -> None:
    data = load_data(DataConfig(dataset="toy", max_train_rows=40))
    dc = DistilConfig(**{**NONE.__dict__, "shift_copies": 3})
    assert transfer_inputs(dc, data, seed=0).shape == (40, 1)


def test_shifted_images_are_translations() -> None:
    data = load_data(DataConfig(dataset="digits", max_train_rows=30))
    dc = DistilConfig(**{**NONE.__dict__, "shift_copies": 1, "shift_pixels": 1})
    x = transfer_inputs(dc, data, seed=0)
    n = len(data.train)
    for img, orig in zip(x[n:].reshape(n, 8, 8), data.train.x.reshape(n, 8, 8), strict=True):
        assert img.sum() <= orig.sum() + 1e-4  # zero fill: same pixels or fewer
        assert any(
            np.array_equal(
                img[max(dy, 0) : 8 + min(dy, 0), max(dx, 0) : 8 + min(dx, 0)],
                orig[max(-dy, 0) : 8 + min(-dy, 0), max(-dx, 0) : 8 + min(-dx, 0)],
            )
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        )


@pytest.mark.parametrize("dataset", ["diabetes", "digits"])
def test_radial_scale_is_one_near_the_data_and_linear_far_out(dataset: str) -> None:
    data = load_data(DataConfig(dataset=dataset))
    near = radial_scale(data.test.x, data)
    assert near.dtype == np.float32 and near.min() == 1.0 and np.median(near) < 1.3
    mean = data.train.x.mean(axis=0)
    direction = data.test.x[:5] - mean
    s100 = radial_scale(mean + 100 * direction, data)
    s1000 = radial_scale(mean + 1000 * direction, data)
    assert np.all(s100 > 10)
    np.testing.assert_allclose(s1000 / s100, 10.0, rtol=0.05)  # linear in the distance far out


def test_rescaled_rows_move_along_their_own_ray_from_the_origin() -> None:
    data = load_data(DataConfig(dataset="diabetes", max_train_rows=200))
    train = data.train.x.astype(np.float64)
    dc = DistilConfig(**{**NONE.__dict__, "rescale_copies": 2, "rescale_max": 20.0})
    parts = transfer_parts(dc, data, seed=0)
    assert set(parts) == {"train", "rescaled"}
    rows = parts["rescaled"]
    base = np.tile(train, (2, 1))
    ratio = np.divide(rows, base, out=np.ones_like(rows), where=np.abs(base) > 1e-9)
    moved = np.abs(ratio - 1.0) > 1e-9
    # each row: the moved features share one factor s, 1/20 <= s <= 20, and some rows keep features
    for r, m in zip(ratio, moved, strict=True):
        if m.any():
            assert np.allclose(r[m], r[m][0]) and 1 / 20 - 1e-9 <= r[m][0] <= 20 + 1e-9
    s = np.array([r[m][0] for r, m in zip(ratio, moved, strict=True) if m.any()])
    assert (s < 0.2).mean() > 0.1 and (s > 5).mean() > 0.1  # both ways, orders of magnitude
    assert (moved.sum(axis=1) < train.shape[1]).mean() > 0.2
    np.testing.assert_array_equal(rows, transfer_parts(dc, data, seed=0)["rescaled"])


def test_disagreement_seeking_keeps_the_candidate_the_teachers_disagree_on_most() -> None:
    from training.transfer import disagreement_scores, seek_disagreement

    data = load_data(DataConfig(dataset="toy", max_train_rows=60))
    dc = DistilConfig(**{**NONE.__dict__, "seek_copies": 2, "seek_candidates": 6})
    seen: list[np.ndarray] = []

    def label(x: np.ndarray) -> np.ndarray:
        # two "teachers" whose means differ by x² (regression raw outputs: mean, raw variance)
        seen.append(x.copy())
        flat = x.reshape(len(x), -1).astype(np.float64)
        mean = np.stack([flat[:, 0], flat[:, 0] + flat[:, 0] ** 2], axis=1)
        return np.stack([mean, np.zeros_like(mean)], axis=-1).astype(np.float32)

    rows, raw = seek_disagreement(dc, data, seed=0, label=label)
    n = len(data.train)
    assert rows.shape == (2 * n, *data.train.x.shape[1:]) and raw.shape == (2 * n, 2, 2)
    assert len(seen) == 2 and all(len(c) == n * 6 for c in seen)  # every candidate labelled once
    for copy, candidates in enumerate(list(seen)):
        scores = disagreement_scores(label(candidates).astype(np.float64), "regression").reshape(n, 6)
        kept = disagreement_scores(raw[copy * n : (copy + 1) * n].astype(np.float64), "regression")
        np.testing.assert_allclose(kept, scores.max(axis=1), rtol=1e-6)
    # classification: MI of identical teachers is 0, of opposite confident ones log 2
    same = np.tile(np.array([[[3.0, 0.0]]]), (1, 2, 1))
    opposite = np.array([[[6.0, 0.0], [0.0, 6.0]]])
    assert disagreement_scores(same, "classification")[0] == pytest.approx(0.0, abs=1e-9)
    assert disagreement_scores(opposite, "classification")[0] > 0.6


def test_distillation_appends_the_sought_rows_with_their_teacher_labels() -> None:
    from dataclasses import replace

    import torch

    from training.distill import distil
    from training.presets import make_config
    from training.teachers import build_network

    cfg = make_config(DataConfig(dataset="toy", max_train_rows=60), members=2, seed=0, epochs=1)
    dc = replace(NONE, seek_copies=1, seek_candidates=4, phase1_epochs=1, phase2_epochs=1)
    cfg = replace(cfg, distil=dc)
    data = load_data(cfg.data)
    torch.manual_seed(0)
    members = [build_network(cfg, data, heads=1).eval() for _ in range(2)]  # untrained: they disagree
    result = distil(cfg, data, members, torch.device("cpu"))
    assert result.transfer_size == len(transfer_inputs(dc, data, cfg.seed)) + len(data.train)


def test_rescaled_rows_mark_the_unit_error_probes_as_seen_families() -> None:
    from training.presets import make_config
    from training.probes import FAMILIES
    from training.transfer import families_in_transfer

    file_dc = make_config(DataConfig(dataset="file", path="t.csv", target="y", task="regression")).distil
    assert file_dc.rescale_copies > 0  # the `file` preset rescales rows about the origin
    seen = families_in_transfer(file_dc)
    assert seen and set(seen) <= set(FAMILIES)
    unit_errors = {f for f, (_, note) in FAMILIES.items() if note.startswith("unit error")}
    assert unit_errors == set(seen)  # every unit-error family, none other
    assert families_in_transfer(NONE) == ()
    digits = make_config(DataConfig(dataset="digits")).distil
    assert families_in_transfer(digits) == ()  # the built-ins keep their published recipe
