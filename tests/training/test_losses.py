"""Loss math against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import (
    ensemble_moments,
    gaussian_kl,
    gaussian_nll,
    head_cosine_similarity,
    hydra_kd_loss,
    kd_loss,
    spread_loss,
)


def test_kd_loss_is_t_squared_kl() -> None:
    # student logits (0, 0) -> softmax((0, 0) / T) = (0.5, 0.5); teacher (0.75, 0.25)
    student = torch.zeros(1, 2)
    teacher = torch.tensor([[0.75, 0.25]])
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(kd_loss(student, teacher, temperature=2.0)) == pytest.approx(4.0 * kl, rel=1e-6)
    assert float(kd_loss(student, teacher, temperature=1.0)) == pytest.approx(kl, rel=1e-6)


def test_kd_loss_temperature_softens_the_student() -> None:
    # student logits (2 ln 3, 0) at T = 2 -> softmax((ln 3, 0)) = (0.75, 0.25): a perfect match
    student = torch.tensor([[2 * math.log(3.0), 0.0]])
    assert float(kd_loss(student, torch.tensor([[0.75, 0.25]]), temperature=2.0)) == pytest.approx(
        0.0, abs=1e-6
    )


def test_hydra_kd_loss_is_mean_per_head_kl() -> None:
    # two heads, T = 2: head 0 matches its teacher exactly, head 1 is uniform vs teacher (0.75, 0.25)
    teacher = torch.tensor([[[2 * math.log(3.0), 0.0], [2 * math.log(3.0), 0.0]]])
    student = torch.tensor([[[2 * math.log(3.0), 0.0], [0.0, 0.0]]])
    kl_head1 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    expected = 4.0 * (0.0 + kl_head1) / 2
    assert float(hydra_kd_loss(student, teacher, temperature=2.0)) == pytest.approx(expected, rel=1e-5)


def test_gaussian_kl_hand_computed() -> None:
    # KL(N(0, 1) ‖ N(1, 2)) = ½ (ln 2 + (1 + 1)/2 − 1) = ½ ln 2
    kl = gaussian_kl(torch.tensor(0.0), torch.tensor(1.0), torch.tensor(1.0), torch.tensor(2.0))
    assert float(kl) == pytest.approx(0.5 * math.log(2.0), rel=1e-6)
    same = gaussian_kl(torch.tensor(3.0), torch.tensor(0.5), torch.tensor(3.0), torch.tensor(0.5))
    assert float(same) == pytest.approx(0.0, abs=1e-7)
    # asymmetric: KL(N(1, 2) ‖ N(0, 1)) = ½ (ln ½ + 2 + 1 − 1)
    back = gaussian_kl(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(0.0), torch.tensor(1.0))
    assert float(back) == pytest.approx(0.5 * (math.log(0.5) + 2.0), rel=1e-6)


def test_gaussian_nll_hand_computed() -> None:
    nll = gaussian_nll(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 4.0]), torch.tensor([0.0, 3.0]))
    expected = (0.5 * math.log(2 * math.pi) + 0.5 * (math.log(4.0) + 1.0 + math.log(2 * math.pi))) / 2
    assert float(nll) == pytest.approx(expected, rel=1e-6)


def test_ensemble_moments_of_a_mixture() -> None:
    mu, var = ensemble_moments(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 3.0]]))
    assert float(mu[0]) == 1.0
    assert float(var[0]) == pytest.approx(2.0 + 1.0)  # mean variance + variance of means


def test_head_cosine_similarity() -> None:
    same = torch.ones(3, 2, 2)
    assert float(head_cosine_similarity(same)) == pytest.approx(1.0)
    orthogonal = torch.stack([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])])
    assert float(head_cosine_similarity(orthogonal)) == pytest.approx(0.0)
    assert float(head_cosine_similarity(torch.ones(1, 4, 4))) == 0.0


def test_spread_loss_measures_the_heads_spread_in_its_own_units() -> None:
    teacher = torch.tensor([[1.0, 3.0], [10.0, 10.0]])  # row 1 spread: deviations -1, +1; row 2 none
    # a common offset of every head leaves the spread, and so the loss, untouched
    assert spread_loss(teacher + 5.0, teacher).item() == pytest.approx(0.0, abs=1e-12)
    # heads collapsed onto their mean: row 1 misses Σd² = 2 of its 2 (+ floor); row 2 misses nothing
    collapsed = torch.tensor([[2.0, 2.0], [10.0, 10.0]])
    floor = 0.1 * 1e-12  # 0.1 × the median Σd² over rows: torch's lower median of (2, 0) is 0, clamped
    expected = (2.0 / (2.0 + floor) + 0.0) / 2
    assert spread_loss(collapsed, teacher).item() == pytest.approx(expected)
