"""The two serving workloads of parts 2 and 3.

- `digits`: the shipped default model (models/digits/1), a small 2-D CNN: per-request overhead
  dominates its serving cost.
- `mnist1d_wide`: a compute-bound MNIST-1D model built for the benchmark through the training
  pipeline's own API: a 1-D CNN (32, 64 channels) with a wide dense body (4096, 2048), 8 teachers and
  an 8-head Hydra. Its 54 MB of body weights do not stay in cache at batch 1, so each one-row run is
  memory-bound and batching pays. It is trained for 1 epoch per stage only: it is a serving-cost workload,
  its accuracy is not a result (part 1 measures quality).

Every workload also gets `member.onnx`, one teacher cut out of its `ensemble.onnx` (bench.members).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from bench.members import write_member

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD = REPO_ROOT / "bench" / "build"
WIDE_NAME = "mnist1d_wide"


@dataclass(frozen=True)
class Workload:
    name: str  # the served model name
    repository: Path  # a model repository: <repository>/<name>/<version>/
    version: int = 1

    @property
    def package(self) -> Path:
        return self.repository / self.name / str(self.version)

    @property
    def graphs(self) -> dict[str, Path]:
        """hydra / ensemble / member graph files (member.onnx lives in bench/build)."""
        return {
            "hydra": self.package / "model.onnx",
            "ensemble": self.package / "ensemble.onnx",
            "member": BUILD / "members" / self.name / "member.onnx",
        }

    def ensure_member(self) -> Path:
        path = self.graphs["member"]
        ensemble = self.graphs["ensemble"]
        if not path.exists() or path.stat().st_mtime < ensemble.stat().st_mtime:
            write_member(ensemble, path, member=0)
        return path


def digits() -> Workload:
    return Workload("digits", REPO_ROOT / "models")


def build_wide_model(
    repository: Path, *, epochs: int = 1, members: int = 8, seed: int = 0, threads: int = 2
) -> Path:
    """Train and export the compute-bound model with the training pipeline (teachers -> Hydra -> ONNX)."""
    from training.config import ArchConfig, DataConfig
    from training.pipeline import run_all
    from training.presets import make_config
    from training.transfer import train_only

    cfg = make_config(
        DataConfig(dataset="mnist1d"),
        name=WIDE_NAME,
        members=members,
        seed=seed,
        epochs=epochs,
        threads=threads,
    )
    cfg = replace(
        cfg,
        arch=ArchConfig(kind="cnn1d", conv_channels=(32, 64), hidden=(4096, 2048), head_layers=1),
        # a serving workload: the transfer set is the training inputs only, to keep the build short
        distil=train_only(cfg.distil),
    )
    out = repository / WIDE_NAME / "1"
    run_dir = BUILD / "runs" / f"{WIDE_NAME}-s{seed}"
    if out.exists():
        shutil.rmtree(out)
    run_all(cfg, run_dir, out)
    return out


def wide(*, build_if_missing: bool = True) -> Workload:
    workload = Workload(WIDE_NAME, BUILD / "models")
    if not (workload.package / "manifest.json").exists():
        if not build_if_missing:
            raise FileNotFoundError(f"{workload.package} missing: run `python -m bench build-model`")
        build_wide_model(workload.repository)
    return workload


def all_workloads() -> list[Workload]:
    return [digits(), wide()]
