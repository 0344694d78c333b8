"""Deep-ensemble teachers.

`train_member` trains ONE member from (config, data, member index, seed) and returns its weights:
members are independent, so a launcher can spread them over processes or torchrun ranks
(member m on rank m % world_size) and gather the state dicts; `pipeline.stage_teachers` is the
loop over members (this rank's share of them under torchrun).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from training.config import ArchConfig, RunConfig
from training.data import TaskData
from training.losses import gaussian_nll
from training.models import HydraNet, input_scaling, regression_outputs


@dataclass
class MemberResult:
    index: int
    seed: int
    state_dict: dict[str, Tensor]
    best_epoch: int
    best_val_loss: float
    epochs_run: int


def member_seed(seed: int, member: int) -> int:
    """Distinct, reproducible seed per member (init and data order both differ)."""
    return seed * 1000 + member


def student_arch(cfg: RunConfig) -> ArchConfig:
    """The student's shape: the teachers', dense widths × `distil.student_width`, or exactly
    `distil.student_hidden` when set (one body must carry what M teachers compute separately; the
    heads stay light)."""
    if cfg.distil.student_hidden:
        return replace(cfg.arch, hidden=tuple(cfg.distil.student_hidden))
    width = cfg.distil.student_width
    return replace(cfg.arch, hidden=tuple(max(1, round(h * width)) for h in cfg.arch.hidden))


def build_network(cfg: RunConfig, data: TaskData, heads: int, student: bool = False) -> HydraNet:
    """A teacher (`student=False`) or the Hydra / KD student network for this run."""
    x_train = torch.from_numpy(data.train.x)
    mean, std = input_scaling(x_train, data.kind)
    out_dim = data.num_classes if data.task == "classification" else 2
    arch = student_arch(cfg) if student else cfg.arch
    return HydraNet(arch, data.row_shape, out_dim, heads, mean, std, data.image_hw)


def target_scaling(data: TaskData) -> tuple[float, float]:
    """(mean, std) of regression targets on the training split; (0, 1) for classification."""
    if data.task != "regression":
        return 0.0, 1.0
    y = data.train.y.astype(np.float64)
    return float(y.mean()), float(max(y.std(), 1e-6))


def supervised_loss(net: HydraNet, x: Tensor, y: Tensor, task: str) -> Tensor:
    raw = net(x)[:, 0, :]  # a teacher has one head
    if task == "classification":
        return torch.nn.functional.cross_entropy(raw, y)
    mean, variance = regression_outputs(raw[:, None, :])
    return gaussian_nll(mean[:, 0], variance[:, 0], y)


def _targets(data: TaskData, split: str, device: torch.device) -> tuple[Tensor, Tensor]:
    part = getattr(data, split)
    x = torch.from_numpy(part.x).to(device)
    if data.task == "classification":
        return x, torch.from_numpy(part.y.astype(np.int64)).to(device)
    y_mean, y_std = target_scaling(data)
    y = (part.y.astype(np.float32) - y_mean) / y_std
    return x, torch.from_numpy(y.astype(np.float32)).to(device)


def train_member(
    cfg: RunConfig,
    data: TaskData,
    member: int,
    seed: int,
    device: torch.device,
    on_epoch: Callable[[int, float], None] | None = None,
) -> MemberResult:
    """Train ensemble member `member`; early stopping on validation loss keeps its best weights."""
    s = member_seed(seed, member)
    torch.manual_seed(s)
    net = build_network(cfg, data, heads=1).to(device)
    tc = cfg.teacher
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    x, y = _targets(data, "train", device)
    xv, yv = _targets(data, "val", device)
    order = torch.Generator().manual_seed(s)  # this member's data order
    best_loss, best_epoch, best_state = float("inf"), -1, copy.deepcopy(net.state_dict())
    epoch = 0
    for epoch in range(tc.epochs):
        net.train()
        perm = torch.randperm(len(x), generator=order).to(device)
        for start in range(0, len(x), tc.batch_size):
            idx = perm[start : start + tc.batch_size]
            loss = supervised_loss(net, x[idx], y[idx], data.task)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            val_loss = float(supervised_loss(net, xv, yv, data.task))
        if on_epoch is not None:
            on_epoch(epoch, val_loss)
        if val_loss < best_loss - 1e-4:
            best_loss, best_epoch, best_state = val_loss, epoch, copy.deepcopy(net.state_dict())
        elif epoch - best_epoch >= tc.patience:
            break
    return MemberResult(
        index=member,
        seed=s,
        state_dict={k: v.detach().cpu() for k, v in best_state.items()},
        best_epoch=best_epoch,
        best_val_loss=best_loss,
        epochs_run=epoch + 1,
    )


def load_members(cfg: RunConfig, data: TaskData, states: list[dict[str, Tensor]]) -> list[HydraNet]:
    members = []
    for state in states:
        net = build_network(cfg, data, heads=1)
        net.load_state_dict(state)
        net.eval()
        members.append(net)
    return members
