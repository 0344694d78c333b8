"""The transfer set: the inputs every teacher labels and Hydra is distilled on.

Hydra can only copy the teachers where it is shown them. Between and around the training rows a
few mixup blends and small-noise copies suffice; far from the data ReLU networks extrapolate
linearly along directions, and *where* their asymptotes disagree decides the ensemble's mutual
information out there. So the set reaches out over orders of magnitude, in many directions, built
from the training inputs alone (never from evaluation or probe sets):

    train        the training rows themselves
    mixup        λ·x_i + (1 − λ)·x_j, λ ~ U(0, 1)                             near, inside the data
    noise        x + σ·ε·s, s = `noise_std` (0.3 standardised units)         near
    far          x + σ·ε·s on a random subset of features, s log-uniform in
                 [`far_min_std`, `far_max_std`] (0.1 … 1000)                near to very far
    marginals    every column resampled independently from the training rows  product of marginals
    extrapolate  x_i + t·(x_i − x_j), t log-uniform in [0.1, `extrapolate_max`]  out of range, along the data
    shifted      images only: translated by up to `shift_pixels` pixels, zero fill

    rescaled     x · s about the raw origin, s log-uniform in [1/`rescale_max`, `rescale_max`], on
                 every feature or a subset: rows in the wrong unit. Off in DistilConfig, on in the
                 `file` preset (2 copies), whose tables are where units go wrong; the built-in
                 presets keep their published packages. With it on, the self-check's unit-error
                 probe families are this family at other draws (`families_in_transfer`).

One more family is an option, off by default (measured without gain on wide tables; docs/
TRAINING.md, "Wide tables, measured with 4,000 probe rows"):

    seek         per training row `seek_candidates` perturbations, the one the teachers disagree
                 on most kept (after Nam et al. 2021; `seek_disagreement`, run in distill.py
                 because it needs the teachers)

σ follows the network's own standardisation (per feature for tabular rows, one scalar for images
and sequences). Deterministic for a seed; each family draws from its own stream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, replace

import numpy as np

from training.config import DistilConfig
from training.data import TaskData


def _log_uniform(rng: np.random.Generator, lo: float, hi: float, size: tuple[int, ...]) -> np.ndarray:
    return np.exp(rng.uniform(np.log(lo), np.log(hi), size=size))


def _mixup(x: np.ndarray, max_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Convex blends of k rows, k uniform in 2..max_rows, weights ~ Dirichlet(1). k = 2 is classic
    mixup (λ ~ U(0, 1)); more rows reach the interior of the data's hull, which pairs of rows in many
    dimensions almost never visit."""
    n = len(x)
    k = rng.integers(2, max(2, max_rows) + 1, size=n)
    weights = rng.dirichlet(np.ones(max(2, max_rows)), size=n)
    weights = np.where(np.arange(weights.shape[1])[None, :] < k[:, None], weights, 0.0)
    weights /= weights.sum(axis=1, keepdims=True)
    picks = np.stack([rng.permutation(n) for _ in range(weights.shape[1])], axis=1)  # (n, max_rows)
    picks[:, 0] = np.arange(n)
    return np.einsum("nk,nkd->nd", weights, x[picks])


def _far(x: np.ndarray, scale: np.ndarray, dc: DistilConfig, rng: np.random.Generator) -> np.ndarray:
    n, d = x.shape
    magnitude = _log_uniform(rng, dc.far_min_std, dc.far_max_std, (n, 1))
    # every feature or a subset: far out along the axes and low-dimensional faces as well as along
    # the diagonals, which isotropic noise in d dimensions almost never visits
    keep = _subset_mask(n, d, rng)
    return x + rng.standard_normal((n, d)) * scale * magnitude * keep


def _subset_mask(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """(n, d) bool: half the rows every feature, half a random subset of k features, k log-uniform
    in 1 … d (a uniform k would make 1-3 features rare in wide tables)."""
    k = np.clip(np.floor(np.exp(rng.uniform(0.0, np.log(d + 1), size=n))), 1, d).astype(int)
    keep = np.argsort(rng.random((n, d)), axis=1) < k[:, None]
    keep[rng.random(n) < 0.5] = True
    return keep


def _rescaled(x: np.ndarray, dc: DistilConfig, rng: np.random.Generator) -> np.ndarray:
    """x · s about the origin of the raw units, s log-uniform in [1 / rescale_max, rescale_max], on
    every feature or a subset: a row sent in the wrong unit moves along its own ray from 0, which
    neither additive noise nor blends of rows reach (x 0.1 on a table of positive features lands in
    the corner by the origin, inside every feature's range)."""
    n, d = x.shape
    s = _log_uniform(rng, 1.0 / dc.rescale_max, dc.rescale_max, (n, 1))
    return np.where(_subset_mask(n, d, rng), x * s, x)


UNIT_ERROR_PROBES = (
    "scaled_x0.1",
    "scaled_x4",
    "scaled_x10",
    "one_feature_x0.1",
    "one_feature_x4",
    "one_feature_x10",
)


def families_in_transfer(dc: DistilConfig) -> tuple[str, ...]:
    """The self-check's probe families (training/probes.py) that a transfer family of `dc` also
    draws from: the unit-error ones when rows are rescaled (x·s on every feature or a subset covers
    x 0.1 / 4 / 10 of all features or one). Their probes are then other draws of a family the
    student saw, not a way of leaving the data it was never shown; the report says which."""
    return UNIT_ERROR_PROBES if dc.rescale_copies > 0 else ()


def disagreement_scores(raw: np.ndarray, task: str) -> np.ndarray:
    """How much the teachers disagree on each row, from their raw outputs (n, M, out): the mutual
    information of their softmaxes (classification) or the variance of their means (regression,
    standardised units)."""
    if task == "classification":
        z = raw - raw.max(axis=-1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=-1, keepdims=True)
        mean = p.mean(axis=1)
        entropy_of_mean = -(mean * np.log(np.clip(mean, 1e-12, None))).sum(-1)
        mean_entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(-1).mean(axis=1)
        return entropy_of_mean - mean_entropy
    return raw[..., 0].var(axis=1)


def seek_disagreement(
    dc: DistilConfig, data: TaskData, seed: int, label: Callable[[np.ndarray], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Rows near the data where the teachers disagree most, and their labels (after Nam et al. 2021,
    who step along the gradient of the teachers' diversity; a random search needs no gradient, so
    it serves the user's ONNX teachers too). Each copy draws `seek_candidates` perturbations of every
    training row, x + s·σ·ε on every feature or a subset, s log-uniform in
    [seek_min_std, seek_max_std], labels them all and keeps, per row, the one of highest
    disagreement (`disagreement_scores`). Returns (rows shaped like the training rows, float32;
    raw teacher outputs (n, M, out))."""
    x = data.train.x.reshape(len(data.train), -1).astype(np.float64)
    _, scale = _standardisation(x, data.kind)
    n, d = x.shape
    kept_rows, kept_raw = [], []
    for c in range(dc.seek_copies):
        rng = np.random.default_rng([seed + 777, 7, c])
        k = dc.seek_candidates
        base = np.repeat(x, k, axis=0)
        magnitude = _log_uniform(rng, dc.seek_min_std, dc.seek_max_std, (n * k, 1))
        cand = base + rng.standard_normal((n * k, d)) * scale * magnitude * _subset_mask(n * k, d, rng)
        cand = cand.reshape(n * k, *data.train.x.shape[1:]).astype(np.float32)
        raw = label(cand)
        best = disagreement_scores(raw.astype(np.float64), data.task).reshape(n, k).argmax(axis=1)
        pick = np.arange(n) * k + best
        kept_rows.append(cand[pick])
        kept_raw.append(raw[pick])
    return np.concatenate(kept_rows), np.concatenate(kept_raw)


def _marginals(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n, d = x.shape
    return x[rng.integers(0, n, size=(n, d)), np.arange(d)[None, :]]


def _extrapolate(x: np.ndarray, dc: DistilConfig, rng: np.random.Generator) -> np.ndarray:
    j = rng.permutation(len(x))
    t = _log_uniform(rng, 0.1, dc.extrapolate_max, (len(x), 1))
    return x + t * (x - x[j])


def _shifted(x: np.ndarray, hw: tuple[int, int], max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Each image translated by a random (dy, dx) in [-max_shift, max_shift], zero fill."""
    h, w = hw
    images = x.reshape(len(x), h, w)
    pad = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    dy = rng.integers(0, 2 * max_shift + 1, size=len(x))
    dx = rng.integers(0, 2 * max_shift + 1, size=len(x))
    rows = dy[:, None] + np.arange(h)[None, :]  # (n, h)
    cols = dx[:, None] + np.arange(w)[None, :]  # (n, w)
    out = pad[np.arange(len(x))[:, None, None], rows[:, :, None], cols[:, None, :]]
    return out.reshape(len(x), h * w)


def _standardisation(x: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per feature as the network standardises (one scalar for images and sequences)."""
    if kind in ("image", "sequence"):
        mean, scale = np.full(x.shape[1], x.mean()), np.full(x.shape[1], x.std())
    else:
        mean, scale = x.mean(axis=0), x.std(axis=0)
    return mean, np.where(scale > 1e-6, scale, 1.0)


def radial_scale(rows: np.ndarray, data: TaskData) -> np.ndarray:
    """max(1, r / r_train) per row, float32: r is the row's distance from the training mean in the
    network's standardised units, r_train the training rows' RMS distance.

    Far out a ReLU network's logits grow linearly with r, so a softmax at a fixed temperature
    saturates to one-hot and carries only the argmax, while the KL loss and its gradient grow
    with r and swamp the rows near the data. Dividing the temperature by this factor compares
    the teachers' and the student's logit *directions* there instead: soft targets, and a far row
    weighs as much as a near one.
    """
    train = data.train.x.reshape(len(data.train), -1).astype(np.float64)
    mean, scale = _standardisation(train, data.kind)
    r_train = float(np.sqrt((((train - mean) / scale) ** 2).sum(axis=1).mean())) or 1.0
    r = np.sqrt((((rows.reshape(len(rows), -1) - mean) / scale) ** 2).sum(axis=1))
    return np.maximum(1.0, r / r_train).astype(np.float32)


def transfer_parts(dc: DistilConfig, data: TaskData, seed: int) -> dict[str, np.ndarray]:
    """Every family of the transfer set, in raw feature units, flat (n, features) float64."""
    x = data.train.x.reshape(len(data.train), -1).astype(np.float64)
    _, scale = _standardisation(x, data.kind)

    def stream(family: int, copy: int) -> np.random.Generator:
        return np.random.default_rng([seed + 777, family, copy])

    parts: dict[str, list[np.ndarray]] = {"train": [x]}
    parts["mixup"] = [_mixup(x, dc.mixup_rows, stream(1, c)) for c in range(dc.mixup_copies)]
    parts["noise"] = [
        x + stream(2, c).standard_normal(x.shape) * dc.noise_std * scale for c in range(dc.noise_copies)
    ]
    parts["far"] = [_far(x, scale, dc, stream(3, c)) for c in range(dc.far_copies)]
    parts["marginals"] = [_marginals(x, stream(4, c)) for c in range(dc.marginal_copies)]
    parts["extrapolate"] = [_extrapolate(x, dc, stream(5, c)) for c in range(dc.extrapolate_copies)]
    parts["rescaled"] = [_rescaled(x, dc, stream(8, c)) for c in range(dc.rescale_copies)]
    if data.image_hw is not None:
        parts["shifted"] = [
            _shifted(x, data.image_hw, dc.shift_pixels, stream(6, c)) for c in range(dc.shift_copies)
        ]
    return {k: np.concatenate(v) for k, v in parts.items() if v}


def train_only(dc: DistilConfig) -> DistilConfig:
    """`dc` with a transfer set of the training rows alone: every perturbed family (each `*_copies`
    field, so one added later too) at 0 copies."""
    return replace(dc, **{f.name: 0 for f in fields(dc) if f.name.endswith("_copies")})


def near_only(dc: DistilConfig) -> DistilConfig:
    """`dc` with the near families only (mixup, small noise, shifts): the recipe before the far ones."""
    return replace(dc, far_copies=0, marginal_copies=0, extrapolate_copies=0, rescale_copies=0, seek_copies=0)


def transfer_inputs(dc: DistilConfig, data: TaskData, seed: int) -> np.ndarray:
    """The whole transfer set, shaped like the training rows (n, *row_shape), float32; the
    training rows come first."""
    flat = np.concatenate(list(transfer_parts(dc, data, seed).values()))
    return flat.reshape(len(flat), *data.train.x.shape[1:]).astype(np.float32)
