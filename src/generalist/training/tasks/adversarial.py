"""PGD-AT (Madry et al. 2018): cross-entropy on PGD examples crafted against the learner."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from generalist.training.tasks.base import NoParams, TaskContext, TrainingAttack
from generalist.training.tasks.registry import register_task


@register_task("adversarial")
@dataclass(frozen=True)
class AdversarialTask:
    attack: TrainingAttack
    name: str = "adversarial"

    @classmethod
    def build(cls, params: NoParams, context: TaskContext) -> AdversarialTask:
        return cls(context.require_attack("adversarial"))

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        position: float,
    ) -> torch.Tensor:
        x_adv = self.attack.craft(model, x, y, generator)
        return F.cross_entropy(model(x_adv), y)
