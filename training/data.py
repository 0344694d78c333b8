"""Datasets, splits and OOD sets. Offline only: nothing here downloads anything.

Every dataset becomes a `TaskData`: raw (unstandardised) float32 features, shape (n, *row_shape),
split into train / validation / calibration / test, plus named OOD sets used for evaluation only
(never for training or distillation). Standardisation is fitted on the training split later and
baked into the exported graph, so clients send raw features.

Built-in OOD sets (see also docs/TRAINING.md):
- digits:   noise    (far)  i.i.d. uniform pixel intensities 0..16
            inverted (far)  test digits with intensities flipped, 16 - x
            rotated  (near) test digits rotated by 90 degrees
- mnist1d:  noise    (far)  smoothed Gaussian noise with the data's per-signal scale
            shifted  (near) MNIST-1D regenerated with 4x the correlated noise, 2x shear and a
                            different seed (a covariate shift of the same generator)
- toy:      gap      (near) inputs in the gap (-1, 1) between the two training clusters
            far      (far)  inputs with |x| in (5, 7), outside the training range
- diabetes: shifted  (near) test rows with bmi, bp and s5 moved up by 3 training std
            far      (far)  test rows scaled 5x about the training mean
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from training.config import DataConfig, Task

Array = NDArray[np.float32]
BUILTIN_DATASETS = ("digits", "mnist1d", "toy", "diabetes")


@dataclass(frozen=True)
class Split:
    x: Array  # (n, *row_shape) raw features
    y: NDArray[np.int64] | Array  # class ids (classification) or targets (regression)

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class TaskData:
    name: str
    task: Task
    kind: str  # "image" | "sequence" | "tabular": picks the default architecture and scaling
    row_shape: tuple[int, ...]
    train: Split
    val: Split
    cal: Split
    test: Split
    ood: dict[str, Array] = field(default_factory=dict)
    ood_notes: dict[str, str] = field(default_factory=dict)
    labels: list[str] | None = None
    feature_names: list[str] | None = None
    image_hw: tuple[int, int] | None = None
    sha256: str = ""
    # False: the file had no target column and `y` holds the teachers' own predictions (--teachers
    # without --target): quality metrics then measure agreement with the teachers, not accuracy
    labelled: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.labels) if self.labels else 0


def _sha256(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class Splits(NamedTuple):
    train: Split
    val: Split
    cal: Split
    test: Split


def _split(x: np.ndarray, y: np.ndarray, cfg: DataConfig, stratify: bool) -> Splits:
    """Random split (stratified by class for classification), fixed by `cfg.split_seed`."""
    rng = np.random.default_rng(cfg.split_seed)
    fractions = np.array([cfg.val_fraction, cfg.cal_fraction, cfg.test_fraction])
    groups = [np.flatnonzero(y == c) for c in np.unique(y)] if stratify else [np.arange(len(y))]
    parts: list[list[np.ndarray]] = [[], [], [], []]  # train, val, cal, test
    for idx in groups:
        idx = rng.permutation(idx)
        counts = np.floor(fractions * len(idx) + 0.5).astype(int)
        bounds = np.cumsum(counts)
        parts[1].append(idx[: bounds[0]])
        parts[2].append(idx[bounds[0] : bounds[1]])
        parts[3].append(idx[bounds[1] : bounds[2]])
        parts[0].append(idx[bounds[2] :])
    out = []
    for p in parts:
        idx = np.sort(np.concatenate(p))
        out.append(Split(x[idx].astype(np.float32), y[idx]))
    return Splits(*out)


OODSets = dict[str, tuple[Array, str]]  # name -> (rows, what they are: "near: ..." or "far: ...")


def _task_data(
    name: str,
    task: Task,
    kind: str,
    x: np.ndarray,
    y: np.ndarray,
    splits: Splits,
    ood: OODSets,
    sha256: str | None = None,
    **described: Any,
) -> TaskData:
    """The TaskData of rows `x` (n, *row_shape) with targets `y`; `sha256` defaults to that of (x, y),
    `described`: the optional fields (labels, feature_names, image_hw, labelled)."""
    return TaskData(
        name=name,
        task=task,
        kind=kind,
        row_shape=tuple(x.shape[1:]),
        train=splits.train,
        val=splits.val,
        cal=splits.cal,
        test=splits.test,
        ood={k: rows for k, (rows, _) in ood.items()},
        ood_notes={k: note for k, (_, note) in ood.items()},
        sha256=sha256 if sha256 is not None else _sha256(x, y),
        **described,
    )


def _digits(cfg: DataConfig) -> TaskData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.data.astype(np.float32)  # (1797, 64), intensities 0..16
    y = bunch.target.astype(np.int64)
    splits = _split(x, y, cfg, stratify=True)
    test = splits.test
    rng = np.random.default_rng(cfg.split_seed + 1000)
    n = len(test)
    images = test.x.reshape(-1, 8, 8)
    ood = {
        "noise": (
            rng.integers(0, 17, size=(n, 64)).astype(np.float32),
            "far: i.i.d. uniform pixel intensities 0..16",
        ),
        "inverted": (
            (16.0 - test.x).astype(np.float32),
            "far: test digits with flipped intensities (16 - x)",
        ),
        "rotated": (
            np.rot90(images, k=1, axes=(1, 2)).reshape(n, 64).astype(np.float32),
            "near: test digits rotated by 90 degrees",
        ),
    }
    pixels = [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
    labels = [str(i) for i in range(10)]
    return _task_data(
        "digits",
        "classification",
        "image",
        x,
        y,
        splits,
        ood,
        labels=labels,
        feature_names=pixels,
        image_hw=(8, 8),
    )


def _mnist1d(cfg: DataConfig) -> TaskData:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = 5000
    raw = make_dataset(args)  # procedural (numpy/scipy), never the downloading get_dataset
    x = np.concatenate([raw["x"], raw["x_test"]]).astype(np.float32)  # (5000, 40)
    y = np.concatenate([raw["y"], raw["y_test"]]).astype(np.int64)
    splits = _split(x, y, cfg, stratify=True)
    train, n = splits.train, len(splits.test)

    shifted_args = get_dataset_args()
    shifted_args.num_samples = n
    shifted_args.train_split = 0.0  # make_dataset puts everything after the split into x_test
    shifted_args.seed = 4242
    shifted_args.corr_noise_scale = 4 * args.corr_noise_scale
    shifted_args.shear_scale = 2 * args.shear_scale
    shifted_raw = make_dataset(shifted_args)
    shifted = np.concatenate([shifted_raw["x"], shifted_raw["x_test"]])[:n].astype(np.float32)

    from scipy.ndimage import gaussian_filter1d

    rng = np.random.default_rng(cfg.split_seed + 1000)
    noise = gaussian_filter1d(rng.standard_normal((n, x.shape[1])), sigma=2.0, axis=1)
    noise = noise / noise.std(axis=1, keepdims=True) * train.x.std(axis=1).mean()
    noise = noise + train.x.mean()
    ood = {
        "noise": (
            noise.astype(np.float32),
            "far: Gaussian noise smoothed (sigma 2) and scaled to the data's per-signal std",
        ),
        "shifted": (shifted, "near: MNIST-1D regenerated with 4x correlated noise, 2x shear, another seed"),
    }
    features = [f"t{i}" for i in range(x.shape[1])]
    labels = [str(i) for i in range(10)]
    return _task_data(
        "mnist1d", "classification", "sequence", x, y, splits, ood, labels=labels, feature_names=features
    )


def toy_function(x: np.ndarray) -> np.ndarray:
    """Mean of the toy regression target."""
    return np.sin(2.0 * x) + 0.3 * x


def toy_noise_std(x: np.ndarray) -> np.ndarray:
    """Heteroscedastic noise: grows with |x|."""
    return 0.05 + 0.1 * np.abs(x)


def _toy(cfg: DataConfig) -> TaskData:
    rng = np.random.default_rng(1234)  # the toy data itself is fixed
    n = 1200
    side = rng.choice([-1.0, 1.0], size=n)
    x = side * rng.uniform(1.0, 4.0, size=n)  # two clusters with a gap at (-1, 1)
    y = toy_function(x) + toy_noise_std(x) * rng.standard_normal(n)
    x2 = x[:, None].astype(np.float32)
    y2 = y.astype(np.float32)
    splits = _split(x2, y2, cfg, stratify=False)
    m = len(splits.test)
    ood_rng = np.random.default_rng(cfg.split_seed + 1000)
    gap = ood_rng.uniform(-0.9, 0.9, size=(m, 1)).astype(np.float32)
    far = ood_rng.choice([-1.0, 1.0], size=(m, 1)) * ood_rng.uniform(5.0, 7.0, size=(m, 1))
    ood = {
        "gap": (gap, "near: inputs in the gap (-0.9, 0.9) between the two training clusters"),
        "far": (far.astype(np.float32), "far: inputs with |x| in (5, 7), outside the training range"),
    }
    return _task_data("toy", "regression", "tabular", x2, y2, splits, ood, feature_names=["x"])


def _diabetes(cfg: DataConfig) -> TaskData:
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    x = bunch.data.astype(np.float32)
    y = bunch.target.astype(np.float32)
    splits = _split(x, y, cfg, stratify=False)
    train, test = splits.train, splits.test
    names = list(bunch.feature_names)
    mean, std = train.x.mean(axis=0), train.x.std(axis=0)
    shifted = test.x.copy()
    for col in ("bmi", "bp", "s5"):
        j = names.index(col)
        shifted[:, j] += 3.0 * std[j]
    far = mean + 5.0 * (test.x - mean)
    ood = {
        "shifted": (
            shifted.astype(np.float32),
            "near: test rows with bmi, bp and s5 moved up by 3 training std",
        ),
        "far": (far.astype(np.float32), "far: test rows scaled 5x about the training mean"),
    }
    return _task_data("diabetes", "regression", "tabular", x, y, splits, ood, feature_names=names)


def _read_table(path: Path) -> dict[str, np.ndarray]:
    """Columns of a CSV / Parquet / NPZ file. An NPZ with a 2-D `x` (or `X`) array keeps it whole."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    import pandas as pd

    if suffix == ".csv":
        frame = pd.read_csv(path)
    elif suffix in (".parquet", ".pq"):
        frame = pd.read_parquet(path)
    else:
        raise ValueError(f"unsupported data file {path} (use .csv, .parquet or .npz)")
    return {str(c): frame[c].to_numpy() for c in frame.columns}


def _features(columns: dict[str, np.ndarray], target: str | None) -> tuple[np.ndarray, list[str]]:
    rest = {k: v for k, v in columns.items() if k != target}
    for key in ("x", "X"):
        if key in rest and rest[key].ndim >= 2:
            x = rest[key].reshape(len(rest[key]), -1)
            return x.astype(np.float32), [f"x{i}" for i in range(x.shape[1])]
    names = list(rest)
    if not names:
        raise ValueError("the data file has no feature columns")
    for k in names:
        if not np.issubdtype(rest[k].dtype, np.number) and rest[k].dtype != bool:
            raise ValueError(f"feature column {k!r} is not numeric ({rest[k].dtype}); encode it first")
    x = np.stack([rest[k].astype(np.float64) for k in names], axis=1)
    if not np.all(np.isfinite(x)):
        raise ValueError("feature columns contain missing or non-finite values")
    return x.astype(np.float32), names


LabelFn = Callable[[np.ndarray], np.ndarray]  # raw rows -> class ids or regression targets


def _from_file(cfg: DataConfig, label_fn: LabelFn | None = None) -> TaskData:
    """A CSV / Parquet / NPZ table. Without a target column, `label_fn` (the user's teachers) labels
    the rows; class names are then the teachers' class indices."""
    if cfg.path is None or cfg.task is None or (cfg.target is None and label_fn is None):
        raise ValueError("--data needs --target and --task")
    path = Path(cfg.path)
    columns = _read_table(path)
    if cfg.target is not None and cfg.target not in columns:
        raise ValueError(f"target column {cfg.target!r} not in {sorted(columns)}")
    x, names = _features(columns, cfg.target)
    target = columns[cfg.target] if cfg.target is not None else np.asarray(label_fn(x))  # type: ignore[misc]
    labels: list[str] | None = None
    if cfg.task == "classification" and cfg.target is None:
        # the teachers' class indices: keep them as they are (a class they never predict keeps its id)
        y = np.asarray(target, dtype=np.int64)
        labels = [str(i) for i in range(int(y.max()) + 1)]
    elif cfg.task == "classification":
        classes, y = np.unique(target, return_inverse=True)
        labels = [str(c) for c in classes]
        if len(labels) < 2:
            raise ValueError("classification needs at least two classes in the target column")
        y = y.astype(np.int64)
    else:
        y = target.astype(np.float32)
    splits = _split(x, y, cfg, stratify=cfg.task == "classification")
    ood: OODSets = {}
    if cfg.ood_path:
        ood_x, ood_names = _features(_read_table(Path(cfg.ood_path)), cfg.target)
        if ood_names != names:
            raise ValueError(f"OOD file columns {ood_names} differ from the training columns {names}")
        ood["ood"] = (ood_x, f"user-supplied: {Path(cfg.ood_path).name}")
    return _task_data(
        path.stem,
        cfg.task,
        "tabular",
        x,
        y,
        splits,
        ood,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        labels=labels,
        feature_names=names,
        labelled=cfg.target is not None,
    )


def load_data(cfg: DataConfig, label_fn: LabelFn | None = None) -> TaskData:
    """The dataset of `cfg`; `label_fn` labels a target-less `--data` file (the user's teachers)."""
    builders = {
        "digits": _digits,
        "mnist1d": _mnist1d,
        "toy": _toy,
        "diabetes": _diabetes,
        "file": lambda c: _from_file(c, label_fn),
    }
    if cfg.dataset not in builders:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; built-in: {BUILTIN_DATASETS}, or --data FILE")
    data = builders[cfg.dataset](cfg)
    if cfg.max_train_rows is not None and len(data.train) > cfg.max_train_rows:
        rng = np.random.default_rng(cfg.split_seed)
        keep = np.sort(rng.permutation(len(data.train))[: cfg.max_train_rows])
        data = replace(data, train=Split(data.train.x[keep], data.train.y[keep]))
    return data
