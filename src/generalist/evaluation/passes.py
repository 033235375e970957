"""Counting a model's forward and backward passes, per point, the way adv-lib does.

An evaluation's cost is the model work it spent: a forward pass of a batch of B images counts B
forward passes, and a gradient flowing back through those B outputs counts B backward passes,
whatever asked for it (an attack step, AutoAttack's check of an attack's output, a restart, an
EoT sample). Counting at the model, not inside each attack, makes every attack and every
version comparable at equal cost, and needs nothing from the attacks themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Passes:
    """Forward and backward passes over single points."""

    forward: int = 0
    backward: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"forward": self.forward, "backward": self.backward}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Passes:
        data = data or {}
        return cls(int(data.get("forward", 0)), int(data.get("backward", 0)))

    def __add__(self, other: Passes) -> Passes:
        return Passes(self.forward + other.forward, self.backward + other.backward)

    def __sub__(self, other: Passes) -> Passes:
        return Passes(self.forward - other.forward, self.backward - other.backward)


class PassCounter(nn.Module):
    """``model`` with a tally of its passes: give this to the attacks instead of the model.

    Backward passes are counted by a hook on the output, which fires once per gradient that
    reaches it (``loss.backward()`` and ``torch.autograd.grad`` alike). The wrapper holds no
    state of its own in the model's sense (no parameters, no mode), so attacks see the same
    model; the inner model may be compiled, the count stays outside the compiled graph.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.passes = Passes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        points = int(x.shape[0])
        self.passes.forward += points
        if out.requires_grad:
            out.register_hook(lambda grad: self._backward(points))
        return out

    def _backward(self, points: int) -> None:
        self.passes.backward += points

    def read(self) -> Passes:
        """The tally so far (a copy: later passes do not change it)."""
        return Passes(self.passes.forward, self.passes.backward)
