"""Typed configuration for one pipeline run: plain dataclasses, no globals.

A `RunConfig` is saved as `config.json` in the run directory so that stages can be re-run one by one
(`python -m training teachers|distil|export|evaluate --run-dir ...`) against the same settings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

Task = Literal["classification", "regression"]
ArchKind = Literal["mlp", "cnn1d", "cnn2d"]
# rows per probe family of the fidelity self-check (training/selfcheck.py); the ID side is the
# held-out test split. 500 rows let one family's retention swing 0.77-0.92 with the probe seed
# alone on a fixed package (AUROC 0.7-0.8, where retention is four times Hydra's AUROC noise);
# 4,000 hold it within ±0.03 (docs/TRAINING.md), for seconds of ORT
PROBE_ROWS = 4000


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from. Built-in datasets ignore `path`/`target`/`task`."""

    dataset: str = "digits"  # digits | mnist1d | toy | diabetes | file
    path: str | None = None  # CSV / Parquet / NPZ for dataset == "file"
    target: str | None = None
    task: Task | None = None
    ood_path: str | None = None
    split_seed: int = 0  # splits are fixed per dataset, independent of the training seed
    # fractions of the labelled pool; calibration is held out from everything else (conformal OOD)
    val_fraction: float = 0.1
    cal_fraction: float = 0.175
    test_fraction: float = 0.175
    # keep at most this many training rows (a random subset): --smoke runs use it to stay seconds-long
    max_train_rows: int | None = None


@dataclass(frozen=True)
class ArchConfig:
    """Network shape. Dense widths chain `features -> *hidden -> out`; the last `head_layers`
    of those linear layers form a head (fused over M heads in the Hydra student)."""

    kind: ArchKind = "mlp"
    conv_channels: tuple[int, ...] = ()
    hidden: tuple[int, ...] = (128, 128)
    head_layers: int = 1
    dropout: float = 0.0


@dataclass(frozen=True)
class TeacherConfig:
    members: int = 8
    epochs: int = 60
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 10  # early stopping on validation loss


@dataclass(frozen=True)
class DistilConfig:
    temperature: float = 2.0
    phase1_epochs: int = 60
    phase2_epochs: int = 60
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm per step (0 = off)
    student_width: float = 1.0  # the student's dense hidden widths = the teachers' x this
    # when set, the student's dense hidden layers exactly (student_width then unused): the `file`
    # preset's one wide layer (training/presets.py)
    student_hidden: tuple[int, ...] = ()
    # phase-2 body learning rate as a multiple of lr; 0 freezes the body
    phase2_body_lr_scale: float = 1.0
    # transfer set (training/transfer.py): train rows + mixup + near noise + far multi-scale noise
    # + product-of-marginals rows + extrapolation along row differences (+ shifted images)
    mixup_copies: int = 6
    mixup_rows: int = 8  # blends of 2..mixup_rows rows (2: classic mixup)
    noise_copies: int = 2
    noise_std: float = 0.3  # in standardised feature units
    far_copies: int = 4
    far_min_std: float = 0.1  # far noise magnitudes: log-uniform in [far_min_std, far_max_std]
    far_max_std: float = 1000.0
    marginal_copies: int = 1
    extrapolate_copies: int = 1
    extrapolate_max: float = 100.0  # x_i + t (x_i - x_j), t log-uniform in [0.1, extrapolate_max]
    # rows rescaled about the origin, x * s with s log-uniform in [1 / rescale_max, rescale_max], on
    # every feature or a random subset: the wrong-unit rows production sends
    rescale_copies: int = 0
    rescale_max: float = 20.0
    # disagreement seeking (after Nam et al. 2021): per training row `seek_candidates` perturbations
    # at seek_min_std..seek_max_std, the one the teachers disagree on most kept, `seek_copies` times
    seek_copies: int = 0
    seek_candidates: int = 8
    seek_min_std: float = 0.1
    seek_max_std: float = 3.0
    # per-row factor max(1, distance / training radius): divides the temperature (classification) or
    # the Gaussian KL (regression) of far rows (training/transfer.py, radial_scale)
    radial_temperature: bool = True
    # images only: copies translated by up to `shift_pixels` in each axis (zero fill)
    shift_copies: int = 2
    shift_pixels: int = 2
    # Hydra+ style penalty on the mean pairwise cosine similarity of head weights (0 = off)
    diversity_weight: float = 0.0
    # regression: weight of the heads' spread error in the spread's own units (losses.spread_loss;
    # 0 = off, the per-head Gaussian KL alone)
    spread_weight: float = 0.0


@dataclass(frozen=True)
class ExternalTeachersConfig:
    """The user's own ONNX teachers (`--teachers`): distilled instead of training ours."""

    paths: tuple[str, ...] = ()  # .onnx files and/or folders of them
    output: str | None = None  # classification: "logits" | "probs"; None = detected per teacher

    @property
    def used(self) -> bool:
        return bool(self.paths)


@dataclass(frozen=True)
class RunConfig:
    name: str = "digits"
    version: int = 1
    seed: int = 0
    device: str = "auto"
    threads: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    arch: ArchConfig = field(default_factory=ArchConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distil: DistilConfig = field(default_factory=DistilConfig)
    external: ExternalTeachersConfig = field(default_factory=ExternalTeachersConfig)
    ood_score: str | None = None  # default: mutual_information / epistemic_variance
    default_alpha: float = 0.05
    probe_rows: int = PROBE_ROWS

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RunConfig:
        def build(kind: type[Any], values: dict[str, Any]) -> Any:
            kwargs = {}
            for f in fields(kind):
                if f.name not in values:
                    continue
                value = values[f.name]
                kwargs[f.name] = tuple(value) if isinstance(value, list) else value
            return kind(**kwargs)

        top = {k: v for k, v in raw.items() if k not in ("data", "arch", "teacher", "distil", "external")}
        return replace(
            build(cls, top),
            data=build(DataConfig, raw.get("data", {})),
            arch=build(ArchConfig, raw.get("arch", {})),
            teacher=build(TeacherConfig, raw.get("teacher", {})),
            distil=build(DistilConfig, raw.get("distil", {})),
            external=build(ExternalTeachersConfig, raw.get("external", {})),
        )

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        return cls.from_json(json.loads(path.read_text()))
