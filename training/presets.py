"""Per-dataset presets: the network shape and schedules each built-in dataset was measured with,
and the `file` preset every `--data` table gets (docs/TRAINING.md); `make_config` is a run's
`RunConfig`: its dataset's preset with the CLI's overrides applied."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from training.config import (
    PROBE_ROWS,
    ArchConfig,
    DataConfig,
    DistilConfig,
    ExternalTeachersConfig,
    RunConfig,
    TeacherConfig,
)

# a --smoke run's self-check rows per probe family: two epochs say nothing of the recipe, so its
# retention needs no PROBE_ROWS (4,000) precision; 500 run in an eighth of the ORT time
SMOKE_PROBE_ROWS = 500

# Per-dataset architecture and schedules (measured; docs/TRAINING.md). Distillation uses the
# one default recipe (DistilConfig's defaults) everywhere but the two regression toys' schedules.
PRESETS: dict[str, dict[str, Any]] = {
    "digits": {
        "arch": ArchConfig(kind="cnn2d", conv_channels=(16, 32), hidden=(64,), head_layers=1),
        "teacher": TeacherConfig(epochs=40, patience=8, lr=2e-3),
        "distil": DistilConfig(),
    },
    "mnist1d": {
        "arch": ArchConfig(kind="cnn1d", conv_channels=(32, 32, 64), hidden=(128,), head_layers=1),
        "teacher": TeacherConfig(epochs=60, patience=10, lr=2e-3),
        "distil": DistilConfig(),
    },
    "toy": {
        "arch": ArchConfig(kind="mlp", hidden=(64, 64), head_layers=1),
        "teacher": TeacherConfig(epochs=300, patience=40, lr=3e-3, batch_size=64),
        "distil": DistilConfig(phase1_epochs=100, phase2_epochs=100, temperature=1.0),
    },
    "diabetes": {
        "arch": ArchConfig(kind="mlp", hidden=(64, 64), head_layers=1, dropout=0.0),
        "teacher": TeacherConfig(epochs=300, patience=30, lr=2e-3, batch_size=32, weight_decay=1e-3),
        "distil": DistilConfig(phase1_epochs=100, phase2_epochs=100, temperature=1.0),
    },
    "file": {
        "arch": ArchConfig(kind="mlp", hidden=(128, 128), head_layers=1),
        "teacher": TeacherConfig(epochs=100, patience=15),
        # the student's body: one hidden layer as wide as the eight teachers' layers side by side
        # (8 x 128), linear heads on it. Far from the data each head must copy its own teacher's
        # extrapolation; two stacked layers 2x a teacher's width could not on wide tables, one wide
        # layer can, at under half the ensemble's FLOPs (docs/TRAINING.md, "Wide tables, measured
        # with 4,000 probe rows")
        # (conv students of `--arch cnn1d/cnn2d` keep their stacks, dense widths x 2).
        # Two copies of the rows rescaled about the origin: rows x 0.1 of a table of positive
        # features land in the corner by the origin, inside every range, where no other family
        # reaches and Hydra followed the ensemble only by the seed's luck (fresh4's friedman1 20d;
        # docs/TRAINING.md, "Rows rescaled about the origin")
        # Three product-of-marginals copies instead of one, and (regression) the heads' spread loss
        # at weight 3: on a small noisy table the per-head KL let Hydra's epistemic variance shrink
        # to 0.75-0.85x the ensemble's (caschool), and one marginals copy left Mroz 2-3 boundary
        # labels short; both chosen on seen tables (docs/TRAINING.md, "The heads' spread")
        "distil": DistilConfig(
            student_width=2.0, student_hidden=(1024,), rescale_copies=2, marginal_copies=3, spread_weight=3.0
        ),
    },
}


# Student bodies for `--arch` (external teachers bring no architecture of ours): the tabular MLP of
# the `file` preset, and the conv stacks of the MNIST-1D and digits presets.
STUDENT_BODIES = {
    "mlp": ArchConfig(kind="mlp", hidden=(128, 128), head_layers=1),
    "cnn1d": ArchConfig(kind="cnn1d", conv_channels=(32, 32, 64), hidden=(128,), head_layers=1),
    "cnn2d": ArchConfig(kind="cnn2d", conv_channels=(16, 32), hidden=(64,), head_layers=1),
}


def make_config(
    data: DataConfig,
    *,
    name: str | None = None,
    version: int = 1,
    members: int = 8,
    seed: int = 0,
    device: str = "auto",
    threads: int = 1,
    epochs: int | None = None,
    smoke: bool = False,
    student_width: float | None = None,
    student_hidden: tuple[int, ...] | None = None,
    external: ExternalTeachersConfig | None = None,
    arch_kind: str | None = None,
) -> RunConfig:
    preset = PRESETS[data.dataset]
    arch: ArchConfig = preset["arch"]
    if arch_kind is not None:
        if arch_kind not in STUDENT_BODIES:
            raise ValueError(f"--arch must be one of {sorted(STUDENT_BODIES)}, got {arch_kind!r}")
        arch = STUDENT_BODIES[arch_kind]
    teacher = replace(preset["teacher"], members=members)
    dc: DistilConfig = preset["distil"]
    if arch.kind != "mlp":  # one wide dense layer is the MLP student's shape, not a conv stack's
        dc = replace(dc, student_hidden=())
    if student_hidden is not None:
        dc = replace(dc, student_hidden=tuple(student_hidden))
    if student_width is not None:  # the teachers' widths x this, in place of the preset's shape
        dc = replace(dc, student_width=student_width, student_hidden=())
    if epochs is not None:  # one override for every stage's epoch count
        teacher = replace(teacher, epochs=epochs)
        dc = replace(dc, phase1_epochs=epochs, phase2_epochs=epochs)
    probe_rows = PROBE_ROWS
    if smoke:
        data = replace(data, max_train_rows=256)
        probe_rows = SMOKE_PROBE_ROWS
        teacher = replace(teacher, members=min(members, 3), epochs=2)
        dc = replace(
            dc, phase1_epochs=2, phase2_epochs=2, mixup_copies=1, noise_copies=1, far_copies=1, shift_copies=0
        )
    if name is None:
        name = Path(data.path).stem if data.dataset == "file" and data.path else data.dataset
    return RunConfig(
        name=name,
        version=version,
        seed=seed,
        device=device,
        threads=threads,
        data=data,
        arch=arch,
        teacher=teacher,
        distil=dc,
        external=external or ExternalTeachersConfig(),
        probe_rows=probe_rows,
    )
