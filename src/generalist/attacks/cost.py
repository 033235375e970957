"""Counting what an attack costs, in the unit attack papers compare at: passes over points.

A forward pass over a batch of B points counts B forwards; a backward pass through the model's
output over B points counts B backwards (adv-lib counts the same way). Counting at the model,
not inside each attack, means nothing an attack does can escape the count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PassCount:
    forward: int = 0
    backward: int = 0


class CountingModel(nn.Module):
    """``model`` with a running :class:`PassCount`; outputs and gradients are the model's own."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.count = PassCount()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        points = x.shape[0]
        self.count.forward += points
        if out.requires_grad:
            out.register_hook(lambda grad: self._backward(points))
        return out

    def _backward(self, points: int) -> None:
        self.count.backward += points
