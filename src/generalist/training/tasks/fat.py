"""FAT (Zhang et al. 2020): cross-entropy on early-stopped PGD examples (``friendly_pgd``).

``tau`` is a schedule over the epochs (FAT raises it as training goes on), read at the current
position and rounded to the nearest whole number of steps, halves up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from generalist.attacks.friendly_pgd import friendly_pgd
from generalist.inference import eval_mode
from generalist.schedules import PiecewiseLinear, build_schedule
from generalist.training.tasks.base import TaskContext, TrainingAttack
from generalist.training.tasks.registry import register_task


@dataclass(frozen=True)
class FatParams:
    tau: Any = 0
    """PGD steps still taken after an example is first misclassified: a number or a schedule
    ``{unit, points}`` (the ``fat`` preset raises it 0 → 2 as the official dynamic τ does)."""

    def check(self, key: str, epochs: int) -> None:
        build_schedule(self.tau, epochs, f"{key}.tau")


@register_task("fat", params=FatParams)
@dataclass(frozen=True)
class FriendlyAdversarialTask:
    attack: TrainingAttack
    tau: PiecewiseLinear
    name: str = "fat"

    @classmethod
    def build(cls, params: FatParams, context: TaskContext) -> FriendlyAdversarialTask:
        tau = build_schedule(params.tau, context.epochs, f"{context.key}.params.tau")
        return cls(context.require_attack("fat"), tau)

    def tau_at(self, position: float) -> int:
        return math.floor(self.tau(position) + 0.5)

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        position: float,
    ) -> torch.Tensor:
        a = self.attack
        with eval_mode(model):
            x_adv = friendly_pgd(
                model,
                x,
                y,
                a.threat,
                steps=a.steps,
                step_size=a.step_size,
                tau=self.tau_at(position),
                random_start=a.random_start,
                generator=generator,
            ).x_adv
        return F.cross_entropy(model(x_adv), y)
