"""Per-dataset presets: the network shape and schedules each built-in dataset was measured with,
and the `file` preset every `--data` table gets (docs/TRAINING.md). Plain values, no logic."""

from __future__ import annotations

from typing import Any

from training.config import ArchConfig, DistilConfig, TeacherConfig

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
        # a shared body twice a teacher's width: on wide tables one 128-unit body could not carry
        # eight teachers' extrapolations (docs/TRAINING.md); ~2x a tiny MLP's microseconds
        "distil": DistilConfig(student_width=2.0),
    },
}


# Student bodies for `--arch` (external teachers bring no architecture of ours): the tabular MLP of
# the `file` preset, and the conv stacks of the MNIST-1D and digits presets.
STUDENT_BODIES = {
    "mlp": ArchConfig(kind="mlp", hidden=(128, 128), head_layers=1),
    "cnn1d": ArchConfig(kind="cnn1d", conv_channels=(32, 32, 64), hidden=(128,), head_layers=1),
    "cnn2d": ArchConfig(kind="cnn2d", conv_channels=(16, 32), hidden=(64,), head_layers=1),
}
