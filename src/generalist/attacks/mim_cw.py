"""MIM and CW-∞: PGD with momentum, and PGD on the Carlini-Wagner margin.

Both are :class:`~generalist.attacks.pgd.PGD` with different settings, so they share its
projection, its per-example "broken at any iterate" bookkeeping and its seeding.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from generalist.attacks.base import require_counts
from generalist.attacks.pgd import PGD
from generalist.attacks.threat import ThreatModel
from generalist.errors import ConfigError


class MIM(PGD):
    """Momentum Iterative Method (Dong et al., CVPR 2018): μ = 1, step ε/steps, clean start.

    The step ε/steps means the attack can just reach the border of the ball; momentum keeps
    it moving in a consistent direction instead of bouncing between the faces.
    """

    name = "mim"

    def __init__(
        self,
        threat: ThreatModel | str,
        steps: int = 20,
        step_size: float | None = None,
        *,
        decay: float = 1.0,
        random_start: bool = False,
        seed: int = 0,
    ) -> None:
        threat = ThreatModel.parse(threat)
        require_counts("mim", steps=steps)
        if decay <= 0:
            raise ConfigError(f"mim decay (momentum) must be positive, got {decay}")
        step = threat.eps / steps if step_size is None else step_size
        super().__init__(threat, steps, step, random_start=random_start, momentum=decay, seed=seed)


def cw_margin_loss(logits: torch.Tensor, y: torch.Tensor, kappa: float) -> torch.Tensor:
    """``min(max_{j≠y} z_j - z_y, κ)`` per example: positive once misclassified.

    Unlike cross-entropy it does not saturate through the softmax, and the cap κ stops the
    attack from spending its budget on points that are already far across the boundary.
    """
    logits = logits.float()
    true = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    other = logits.scatter(1, y.unsqueeze(1), -math.inf).amax(dim=1)
    return (other - true).clamp(max=kappa)


class CW(PGD):
    """CW-∞ as used in robustness papers: PGD ascending the capped CW margin (κ = 50)."""

    name = "cw"

    def __init__(
        self,
        threat: ThreatModel | str,
        steps: int = 20,
        step_size: float | None = None,
        *,
        kappa: float = 50.0,
        random_start: bool = True,
        seed: int = 0,
    ) -> None:
        require_counts("cw", steps=steps)
        if kappa <= 0:
            raise ConfigError(f"cw kappa (margin cap) must be positive, got {kappa}")
        super().__init__(
            threat,
            steps,
            step_size,
            random_start=random_start,
            loss_fn=functools.partial(cw_margin_loss, kappa=kappa),
            seed=seed,
        )
        self.kappa = kappa

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "loss": "cw_margin", "kappa": self.kappa}
