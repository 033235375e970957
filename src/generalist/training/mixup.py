"""Mixup (Zhang et al. 2018) as Interpolated Adversarial Training uses it (Lamb et al. 2019).

A mixup of a batch (x, y) trains on x̃ = λ·x + (1 − λ)·x[π] with the loss
λ·CE(f(x̃), y) + (1 − λ)·CE(f(x̃), y[π]), for one λ ~ Beta(α, α) and one permutation π per
batch. IAT takes the mean of that loss on the clean batch and on its adversarial batch, each
with its own (λ, π).

torch samples Beta distributions only from the global RNG, so a draw takes one 62-bit seed from
the learner's own generator (on its device) and samples λ and π from a numpy generator seeded
with it: the learner's generator state alone decides the draw, which keeps runs reproducible
and resumes exact, and costs one host sync per draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SEED_BITS = 62


@dataclass(frozen=True)
class MixupDraw:
    lam: float
    """λ: the weight of each example itself; 1 − λ goes to its partner."""
    partners: torch.Tensor
    """π: the index of each example's partner in the batch (a permutation, int64)."""


def draw_mixup(
    size: int, alpha: float, generator: torch.Generator, device: torch.device
) -> MixupDraw:
    """λ ~ Beta(α, α) and a random permutation of ``size`` partners, from ``generator``."""
    seed = torch.randint(2**SEED_BITS, (1,), generator=generator, device=generator.device)
    rng = np.random.default_rng(int(seed))
    lam = float(rng.beta(alpha, alpha))
    return MixupDraw(lam, torch.from_numpy(rng.permutation(size)).to(device))


def mixup_cross_entropy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, draw: MixupDraw
) -> torch.Tensor:
    """λ·CE(f(x̃), y) + (1 − λ)·CE(f(x̃), y[π]) with x̃ = λ·x + (1 − λ)·x[π], batch-averaged."""
    lam, partners = draw.lam, draw.partners
    logits = model(lam * x + (1.0 - lam) * x[partners])
    return lam * F.cross_entropy(logits, y) + (1.0 - lam) * F.cross_entropy(logits, y[partners])


def interpolated_loss(
    model: nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    clean: MixupDraw,
    adversarial: MixupDraw,
) -> torch.Tensor:
    """IAT's loss: the mean of the clean batch's and the adversarial batch's mixup losses."""
    return 0.5 * (
        mixup_cross_entropy(model, x, y, clean) + mixup_cross_entropy(model, x_adv, y, adversarial)
    )
