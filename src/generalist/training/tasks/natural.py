"""Natural training: cross-entropy on the clean batch, no attack."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from generalist.training.tasks.base import NoParams, TaskContext
from generalist.training.tasks.registry import register_task


@register_task("natural", attack=False)
@dataclass(frozen=True)
class NaturalTask:
    name: str = "natural"

    @classmethod
    def build(cls, params: NoParams, context: TaskContext) -> NaturalTask:
        return cls()

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        position: float,
    ) -> torch.Tensor:
        return F.cross_entropy(model(x), y)
