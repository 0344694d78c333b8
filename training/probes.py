"""Generic OOD probe families, generated from the training rows alone (no labels, no OOD data).

They serve two readers: the fidelity self-check at the end of every training run (does Hydra's
mutual information still follow the ensemble's on inputs nobody chose?) and the dataset suites in
`bench/suites.py`. Every family works on any input kind, because it treats a row as a flat vector
of raw feature values; training ranges are per feature (per pixel / time step for images and
sequences, where a constant feature simply keeps its value under `box`).

The first five are no transfer family (`training/transfer.py` perturbs training rows with
Gaussian noise, blends rows, resamples columns and extrapolates along row differences): they
measure generalisation to a *different* way of leaving the data, drawn with its own seed. The
unit-error families are, where the transfer set rescales rows about the origin (the `file`
preset): there they are other draws of a family the student saw, and the self-check marks them
`in_transfer`.

    independent      near: every feature Gaussian with its training mean and std, independently
                           (the marginals' first two moments kept, every correlation broken)
    off_manifold     near: a training row moved 3-10 std along the 3 least-varying principal
                           directions of the standardised training rows (where the data never varies)
    box              far:  every feature uniform in [min - range, max + range] of the training rows
    feature_outlier  far:  a training row with 1-3 features set 1-10 ranges beyond the training range
    shell            far:  the training mean + a random direction at 3-30 times the data's radius
    scaled_x0.1      unit error: a training row with every feature multiplied by 0.1
    scaled_x4        unit error: ... by 4
    scaled_x10       unit error: ... by 10
    one_feature_x0.1 unit error in one column: one (non-zero) feature of a training row x 0.1
    one_feature_x4   ... x 4
    one_feature_x10  ... x 10

The unit-error families are rows in the wrong unit, the most common production error; an
ensemble's own mutual information often ranks them as *more* familiar than real rows (ReLU
networks grow confident far out), so their AUROC says what MI can and cannot see, and the
self-check only asks Hydra to follow the ensemble there, not to beat it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Generator = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

PROBE_SEED_OFFSET = 31_337  # far from the transfer set's seed offsets


def _ranges(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo, hi = flat.min(axis=0), flat.max(axis=0)
    width = hi - lo
    fallback = float(width[width > 0].mean()) if np.any(width > 0) else 1.0
    return lo, hi, np.where(width > 0, width, fallback)


def _independent(flat: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return flat.mean(axis=0) + flat.std(axis=0) * rng.standard_normal((n, flat.shape[1]))


def _off_manifold(flat: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    mean, std = flat.mean(axis=0), flat.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    _, _, vt = np.linalg.svd((flat - mean) / std, full_matrices=False)
    tail = vt[-min(3, len(vt)) :]  # (k, d): the least-varying directions, unit norm
    coef = rng.standard_normal((n, len(tail)))
    coef *= rng.uniform(3.0, 10.0, size=(n, 1)) / np.linalg.norm(coef, axis=1, keepdims=True)
    return flat[rng.integers(0, len(flat), n)] + std * (coef @ tail)


def _box(flat: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    lo, hi = flat.min(axis=0), flat.max(axis=0)
    width = hi - lo
    return rng.uniform(lo - width, hi + width, size=(n, flat.shape[1]))


def _feature_outlier(flat: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    lo, hi, width = _ranges(flat)
    rows = flat[rng.integers(0, len(flat), n)].copy()
    d = flat.shape[1]
    for i in range(n):
        cols = rng.choice(d, size=min(d, int(rng.integers(1, 4))), replace=False)
        far = rng.uniform(1.0, 10.0, size=len(cols)) * width[cols]
        up = rng.random(len(cols)) < 0.5
        rows[i, cols] = np.where(up, hi[cols] + far, lo[cols] - far)
    return rows


def _shell(flat: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    mean, std = flat.mean(axis=0), flat.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    radius = np.sqrt(((((flat - mean) / std) ** 2).sum(axis=1)).mean())  # the data's typical radius
    u = rng.standard_normal((n, flat.shape[1]))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    r = radius * np.exp(rng.uniform(np.log(3.0), np.log(30.0), size=(n, 1)))
    return mean + std * u * r


def _scaled(factor: float) -> Generator:
    def make(flat: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        return flat[rng.integers(0, len(flat), n)] * factor

    return make


def _scaled_one(factor: float) -> Generator:
    def make(flat: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        rows = flat[rng.integers(0, len(flat), n)].copy()
        for i in range(n):
            # a zero stays zero in any unit: scale one of the row's non-zero features where it has one
            candidates = np.flatnonzero(rows[i] != 0.0)
            col = rng.choice(candidates) if candidates.size else rng.integers(0, rows.shape[1])
            rows[i, col] *= factor
        return rows

    return make


FAMILIES: dict[str, tuple[Generator, str]] = {
    "independent": (
        _independent,
        "near: every feature Gaussian with its training mean and std, independently",
    ),
    "off_manifold": (
        _off_manifold,
        "near: a training row 3-10 std along the 3 least-varying principal directions",
    ),
    "box": (_box, "far: every feature uniform in [min - range, max + range] of the training rows"),
    "feature_outlier": (_feature_outlier, "far: 1-3 features of a training row 1-10 ranges out of range"),
    "shell": (_shell, "far: the training mean + a random direction at 3-30x the data's radius"),
    "scaled_x0.1": (_scaled(0.1), "unit error: every feature of a training row x 0.1"),
    "scaled_x4": (_scaled(4.0), "unit error: every feature of a training row x 4"),
    "scaled_x10": (_scaled(10.0), "unit error: every feature of a training row x 10"),
    # appended after the others: a family's stream is seeded by its index, so earlier rows stay put
    "one_feature_x0.1": (_scaled_one(0.1), "unit error: one non-zero feature of a training row x 0.1"),
    "one_feature_x4": (_scaled_one(4.0), "unit error: one non-zero feature of a training row x 4"),
    "one_feature_x10": (_scaled_one(10.0), "unit error: one non-zero feature of a training row x 10"),
}


def probe_sets(
    train_x: np.ndarray, rows: int, seed: int, families: tuple[str, ...] | None = None
) -> dict[str, np.ndarray]:
    """`rows` probe rows per family, shaped like the training rows (n, *row_shape), float32.

    Deterministic for (`train_x`, `rows`, `seed`); each family has its own stream, so adding a
    family never changes another's rows.
    """
    names = families or tuple(FAMILIES)
    unknown = [f for f in names if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown probe families {unknown}; known: {list(FAMILIES)}")
    flat = train_x.reshape(len(train_x), -1).astype(np.float64)
    out = {}
    for index, name in enumerate(FAMILIES):
        if name not in names:
            continue
        rng = np.random.default_rng([seed + PROBE_SEED_OFFSET, index])
        made = FAMILIES[name][0](flat, rows, rng)
        out[name] = made.reshape(rows, *train_x.shape[1:]).astype(np.float32)
    return out


def probe_notes(families: tuple[str, ...] | None = None) -> dict[str, str]:
    return {k: FAMILIES[k][1] for k in families or tuple(FAMILIES)}
