"""IAT (Lamb et al. 2019): the mean of a mixup loss on the clean batch and one on its PGD
examples (crafted on the unmixed inputs).

Each of the two mixups draws its own λ ~ Beta(α, α) and partner permutation, from the
learner's generator after the attack's draws, so a run is reproducible and resumes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from generalist.errors import ConfigError
from generalist.training.mixup import draw_mixup, interpolated_loss
from generalist.training.tasks.base import TaskContext, TrainingAttack
from generalist.training.tasks.registry import register_task


@dataclass(frozen=True)
class IatParams:
    mixup_alpha: float = 1.0
    """α of the Beta(α, α) mixing coefficient: the paper's input-mixup α = 1 (λ uniform)."""

    def check(self, key: str, epochs: int) -> None:
        if not self.mixup_alpha > 0:
            raise ConfigError(f"{key}.mixup_alpha: must be > 0, got {self.mixup_alpha:g}")


@register_task("iat", params=IatParams)
@dataclass(frozen=True)
class InterpolatedAdversarialTask:
    attack: TrainingAttack
    alpha: float
    name: str = "iat"

    @classmethod
    def build(cls, params: IatParams, context: TaskContext) -> InterpolatedAdversarialTask:
        return cls(context.require_attack("iat"), params.mixup_alpha)

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        position: float,
    ) -> torch.Tensor:
        x_adv = self.attack.craft(model, x, y, generator)
        clean = draw_mixup(len(x), self.alpha, generator, x.device)
        adversarial = draw_mixup(len(x), self.alpha, generator, x.device)
        return interpolated_loss(model, x, x_adv, y, clean, adversarial)
