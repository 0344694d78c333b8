"""GPU decisions of training that a CPU machine can test: cuBLAS determinism, one process per GPU."""

from __future__ import annotations

import pytest
import torch

from training.determinism import deterministic_cuda_env
from training.distributed import local_cuda_device


def test_cuda_runs_get_a_deterministic_cublas_workspace() -> None:
    env: dict[str, str] = {}
    assert deterministic_cuda_env(torch.device("cuda", 0), env)
    assert env == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    mine = {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}  # the user's own choice stays
    assert not deterministic_cuda_env(torch.device("cuda"), mine)
    assert mine == {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    cpu: dict[str, str] = {}
    assert not deterministic_cuda_env(torch.device("cpu"), cpu) and cpu == {}


def test_one_process_per_gpu() -> None:
    assert local_cuda_device(0, 1, 1) == 0
    assert local_cuda_device(3, 4, 4) == 3
    assert local_cuda_device(1, 2) == 1  # no LOCAL_WORLD_SIZE: the rank alone decides
    # the README's 4-process example on a 1-GPU host: every rank refuses, rank 0 included
    for local_rank in range(4):
        with pytest.raises(
            RuntimeError, match=r"4 processes on this host but it has 1 GPU.*--nproc-per-node 1"
        ):
            local_cuda_device(local_rank, 1, 4)
    with pytest.raises(RuntimeError, match="this host has none: use --device cpu"):
        local_cuda_device(0, 0, 1)
