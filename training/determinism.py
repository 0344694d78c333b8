"""Where a run computes, and how reproducibly: the device, fixed threads, seeded RNGs, deterministic
kernels."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

import torch

from training.config import RunConfig


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    return torch.device(name)


# cuBLAS is deterministic only with a fixed workspace configuration, read when its first handle is
# created; without it `use_deterministic_algorithms` cannot make CUDA matmuls reproducible.
CUBLAS_WORKSPACE = ("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def deterministic_cuda_env(device: torch.device, environ: MutableMapping[str, str]) -> bool:
    """Set CUBLAS_WORKSPACE_CONFIG for a CUDA run unless the user chose one; True when set here."""
    key, value = CUBLAS_WORKSPACE
    if device.type != "cuda" or key in environ:
        return False
    environ[key] = value
    return True


def setup(cfg: RunConfig) -> torch.device:
    """Determinism for a seed: fixed threads, seeded RNGs, deterministic kernels (cuBLAS included)."""
    torch.set_num_threads(max(1, cfg.threads))
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    deterministic_cuda_env(device, os.environ)  # before the first CUDA matmul creates a handle
    torch.use_deterministic_algorithms(True, warn_only=True)
    return device
