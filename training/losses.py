"""Training and distillation losses (all return a scalar mean over the batch)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F


def gaussian_nll(mean: Tensor, variance: Tensor, target: Tensor) -> Tensor:
    """Negative log-likelihood of `target` under N(mean, variance), including the log(2π)/2 constant."""
    return (0.5 * (torch.log(variance) + (target - mean) ** 2 / variance + math.log(2 * math.pi))).mean()


def kd_loss(
    student_logits: Tensor, teacher_probs: Tensor, temperature: float, row_scale: Tensor | None = None
) -> Tensor:
    """Hinton knowledge distillation: T² · KL(teacher ‖ softmax(student / T)), mean over the batch.

    `teacher_probs` (batch, K) are already at the same temperature (for Hydra phase 1: the mean over
    the ensemble of softmax(z_m / T)). The T² factor keeps gradient magnitudes comparable across T.
    `row_scale` (batch,) multiplies the temperature per row (see `radial_scale`); T² stays the
    base temperature's, so a far row weighs as much as a near one.
    """
    t = temperature if row_scale is None else temperature * row_scale[:, None]
    log_student = F.log_softmax(student_logits / t, dim=-1)
    log_teacher = torch.log(teacher_probs.clamp_min(1e-30))
    kl = (teacher_probs * (log_teacher - log_student)).sum(dim=-1)
    return temperature**2 * kl.mean()


def hydra_kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, row_scale: Tensor | None = None
) -> Tensor:
    """Hydra phase 2: mean over heads of T² · KL(softmax(t_m/T) ‖ softmax(s_m/T)); (batch, M, K) each.
    `row_scale` as in `kd_loss`."""
    t = temperature if row_scale is None else temperature * row_scale[:, None, None]
    log_student = F.log_softmax(student_logits / t, dim=-1)
    log_teacher = F.log_softmax(teacher_logits / t, dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=-1)  # (batch, M)
    return temperature**2 * kl.mean()


def gaussian_kl(mean_p: Tensor, var_p: Tensor, mean_q: Tensor, var_q: Tensor) -> Tensor:
    """KL(N(mean_p, var_p) ‖ N(mean_q, var_q)), elementwise (not reduced)."""
    return 0.5 * (torch.log(var_q / var_p) + (var_p + (mean_p - mean_q) ** 2) / var_q - 1.0)


def spread_loss(student_means: Tensor, teacher_means: Tensor, floor_fraction: float = 0.1) -> Tensor:
    """Relative error of the heads' spread: Σ_m (d_s,m − d_t,m)² / (Σ_m d_t,m² + floor), mean over
    rows, where d_·,m is head m's mean minus the mean over heads ((batch, M) each).

    The per-head Gaussian KL weighs a head's mean error by 1 / its variance. Where the noise is
    large beside the teachers' disagreement (aleatoric variance 20x the epistemic on a small
    noisy table), errors that barely move the KL can halve the spread of the head means, and
    epistemic variance is that spread. This term measures the errors in the spread's own units.
    `floor` (`floor_fraction` × the batch's median Σ_m d_t,m²) keeps rows where the teachers
    agree from dividing by ~0."""
    d_s = student_means - student_means.mean(dim=1, keepdim=True)
    d_t = teacher_means - teacher_means.mean(dim=1, keepdim=True)
    spread = (d_t**2).sum(dim=1)
    floor = floor_fraction * spread.median().clamp_min(1e-12)
    return (((d_s - d_t) ** 2).sum(dim=1) / (spread + floor)).mean()


def ensemble_moments(means: Tensor, variances: Tensor) -> tuple[Tensor, Tensor]:
    """Moment-matched Gaussian of a uniform mixture over the last axis: (μ*, aleatoric + epistemic)."""
    mu = means.mean(dim=-1)
    var = variances.mean(dim=-1) + means.var(dim=-1, unbiased=False)
    return mu, var


def head_cosine_similarity(weight: Tensor) -> Tensor:
    """Mean pairwise cosine similarity between the flattened weights of M heads (M, in, out).

    Hydra+ (Ferianc & Rodrigues 2022) penalises this to keep heads apart. 0 for a single head.
    """
    heads = weight.shape[0]
    if heads < 2:
        return weight.new_zeros(())
    flat = F.normalize(weight.reshape(heads, -1), dim=1)
    sim = flat @ flat.T
    off_diagonal = sim.sum() - sim.diagonal().sum()
    return off_diagonal / (heads * (heads - 1))
