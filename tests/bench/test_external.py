"""bench/external.py: the user's ensemble made outside our code, and the criteria as code."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.external import export_teachers, verdict
from bench.report import external_section
from training.onnx_teachers import OnnxTeachers, find_teacher_files, inspect_teachers


def test_exported_sklearn_ensemble_is_a_valid_teacher_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    paths = export_teachers("mixed", x, y, tmp_path / "t")
    assert len(paths) == 5 and sum("gbm" in p.name for p in paths) == 2
    specs = inspect_teachers(find_teacher_files([tmp_path / "t"]), "classification")
    assert {s.kind for s in specs} == {"probs"} and all(s.classes == 2 for s in specs)
    probs = np.exp(OnnxTeachers(specs).log_probs(x[:10]))
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)


def _run(gap: float, rho: float, retention: float) -> dict[str, object]:
    return {
        "dataset": "wine",
        "ensemble": "mixed",
        "accuracy": {"ensemble": 0.95, "kd": 0.95, "hydra": 0.95 - gap},
        "spearman_vs_teachers": rho,
        "families": {"box": {"ensemble": 0.9, "hydra": 0.9, "hydra_retention": retention}},
        "seconds": 1.0,
    }


def test_verdict_and_section() -> None:
    assert verdict([_run(0.01, 0.95, 0.95)])["met"]
    misses = verdict([_run(0.03, 0.85, 0.5)])["misses"]
    assert len(misses) == 3 and any("accuracy" in m for m in misses)
    machine = {"date_utc": "2026-01-01", "cpu": "cpu", "cores": 2, "command": "python -m bench external"}
    doc = external_section(
        {"preset": "reduced", "machine": machine, "runs": [_run(0.0, 0.97, 0.92)], "seconds": 1}
    )
    assert "| wine | mixed |" in doc and "**met**" in doc and "0.92 (box)" in doc
