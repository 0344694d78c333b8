"""Training across processes and GPUs with PyTorch's own launcher (`torchrun`).

    torchrun --nproc-per-node N -m training run --dataset digits --out models/digits/1

What is spread how:
  teachers      member m trains on rank m % world_size (`rank_members`); every rank receives every
                member's weights and metadata (`gather_members`, an all_gather_object), so the
                ensemble does not depend on the number of processes;
  distillation  DistributedDataParallel (`data_parallel`): each rank steps on its shard of every
                epoch's permutation of the transfer set (`shard`), with `local_batch_size` rows so
                that one step still consumes `batch_size` rows over all ranks;
  files         only rank 0 writes checkpoints, exports and evaluates (`save_on_main`,
                `from_main`); the others wait for its result.

Without torchrun's environment (RANK / WORLD_SIZE unset) there is no process group and every helper
here is the identity: the same code is the single-process pipeline.
"""

from __future__ import annotations

import datetime as dt
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training.teachers import MemberResult

T = TypeVar("T")

# Ranks wait for each other in collectives: for the slowest rank's teachers in `gather_members`, and
# for rank 0's export + evaluation in `from_main`. torch's default (30 min for gloo, 10 for NCCL)
# is too short for a full-size ensemble, so the timeout is generous and configurable.
TIMEOUT_ENV = "HYDRA_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 4 * 3600


def launched_by_torchrun() -> bool:
    """torchrun (and any env:// launcher) sets RANK and WORLD_SIZE for every worker."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def backend_for(device: str) -> str:
    """NCCL when the run trains on CUDA (`--device cuda`, or `auto` on a GPU machine), else gloo."""
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


def local_cuda_device(local_rank: int, device_count: int, local_world_size: int | None = None) -> int:
    """The GPU of this local rank (one GPU per process); refuses more processes than GPUs on a host.

    Checked against the host's process count (torchrun's LOCAL_WORLD_SIZE) when known, so every rank
    stops with the same message rather than only those beyond the last GPU.
    """
    processes = local_world_size if local_world_size is not None else local_rank + 1
    if device_count < 1:
        raise RuntimeError("NCCL/CUDA training needs a GPU, and this host has none: use --device cpu (gloo)")
    if processes > device_count or local_rank >= device_count:
        raise RuntimeError(
            f"torchrun started {max(processes, local_rank + 1)} processes on this host but it has "
            f"{device_count} GPU(s): one process per GPU, so use --nproc-per-node {device_count} "
            "(or --device cpu to train on CPU with gloo)"
        )
    return local_rank


@contextmanager
def process_group(device: str) -> Iterator[int]:
    """Join torchrun's process group for the duration of a command; yields this process's rank.

    Under torchrun: init from the env:// rendezvous (gloo on CPU, NCCL with one GPU per local rank),
    and destroy the group on the way out. Otherwise: no group, rank 0.
    """
    if not launched_by_torchrun() or dist.is_initialized():
        yield rank()
        return
    backend = backend_for(device)
    if backend == "nccl":
        # before any CUDA work: "cuda" below means this local rank's GPU
        torch.cuda.set_device(
            local_cuda_device(
                int(os.environ.get("LOCAL_RANK", "0")),
                torch.cuda.device_count(),
                int(os.environ["LOCAL_WORLD_SIZE"]) if "LOCAL_WORLD_SIZE" in os.environ else None,
            )
        )
    timeout = dt.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    try:
        yield rank()
    finally:
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def rank_members(members: int) -> range:
    """The ensemble members this rank trains: m with m % world_size == rank."""
    return range(rank(), members, world_size())


def gather_members(mine: Sequence[MemberResult]) -> list[MemberResult]:
    """Every rank's trained members (weights + metadata), on every rank, ordered by member index."""
    if not dist.is_initialized():
        return sorted(mine, key=lambda r: r.index)
    everyone: list[list[MemberResult] | None] = [None] * world_size()
    dist.all_gather_object(everyone, list(mine))
    results = [r for part in everyone if part is not None for r in part]
    indices = [r.index for r in results]
    if len(set(indices)) != len(indices):
        raise RuntimeError(f"member trained twice across ranks: {sorted(indices)}")
    return sorted(results, key=lambda r: r.index)


def from_main(produce: Callable[[], T]) -> T:
    """Run `produce` on rank 0 only and hand its (picklable) result to every rank.

    The other ranks block until rank 0 is done: this is the barrier behind rank-0-only work.
    """
    if not dist.is_initialized():
        return produce()
    box: list[Any] = [produce() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return cast(T, box[0])


def save_on_main(obj: object, path: Path) -> None:
    """torch.save on rank 0 only: one writer per file, also when ranks share a filesystem."""
    if is_main():
        torch.save(obj, path)


def shard(perm: torch.Tensor) -> torch.Tensor:
    """This rank's part of an epoch's permutation (every rank draws the same one): `shard_of`."""
    return shard_of(perm, rank(), world_size())


def shard_of(perm: torch.Tensor, rank_index: int, world: int) -> torch.Tensor:
    """Rank `rank_index`'s part of `perm` among `world` ranks, like DistributedSampler.

    `perm` is padded by wrapping around to a multiple of `world`, then rank r takes positions
    r, r + W, r + 2W, ... All shards have the same length, so every rank takes the same number of
    optimiser steps (DDP needs that), and the k-th batches of `b` rows of all ranks together are
    rows [k·b·W, (k+1)·b·W) of the padded `perm`: with `local_batch_size`, the single-process batches.
    """
    if world == 1:
        return perm
    padded = -(-len(perm) // world) * world
    if padded > len(perm):  # wrap around (more than once if there are fewer rows than ranks)
        perm = perm.repeat(-(-padded // len(perm)))[:padded]
    return perm[rank_index::world]


def local_batch_size(batch_size: int) -> int:
    """Rows per rank per step: `batch_size` stays the global batch, whatever the world size."""
    return max(1, -(-batch_size // world_size()))


def data_parallel(net: nn.Module, device: torch.device) -> nn.Module:
    """Wrap in DistributedDataParallel under a process group; the module itself otherwise.

    Wrap after freezing parameters (DDP only reduces those that require grad) and re-wrap after
    changing the module's parameters (the Hydra student's head expansion).
    """
    if not dist.is_initialized():
        return net
    # The fused heads' weight gradient (from a matmul broadcast over heads) comes out transposed
    # against DDP's bucket layout; DDP copies it into the bucket (correct, a little slower) and warns.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(
        net,
        device_ids=[device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else None,
        # the only buffers are the input standardisation, fitted once on the training split: rank 0's
        # copy at wrap time is enough, no re-broadcast before every forward
        forward_sync_buffers=False,
    )


def mean_over_ranks(value: float) -> float:
    """The mean of a per-rank scalar (an epoch's loss) over ranks, identical on every rank."""
    if not dist.is_initialized():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item()) / world_size()
