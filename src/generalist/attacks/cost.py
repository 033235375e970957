"""Counting what an attack costs, in the unit attack papers compare at: passes over points.

A forward pass over a batch of B points counts B forwards; a backward pass through the model's
output over B points counts B backwards (adv-lib counts the same way). Counting at the model,
not inside each attack, means nothing an attack does can escape the count.

:class:`RecordingModel` also keeps which calls they were (input shape, memory layout, with or
without a graph), so that a benchmark can replay the passes alone and time an attack's floor:
what its forward and backward passes cost without anything else the attack does.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class ModelCall:
    """One kind of model call: the input's shape, strides (its memory layout: an attack may pass
    channels_last images, which changes what a pass costs) and dtype, and whether the output
    carried a graph to backpropagate through."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    grad: bool

    @property
    def points(self) -> int:
        return self.shape[0]


@dataclass
class CallTally:
    """How many forward passes of each kind of call were made, and how many backward passes went
    through their outputs (an attack may backpropagate several times through one output)."""

    forward: Counter[ModelCall] = field(default_factory=Counter)
    backward: Counter[ModelCall] = field(default_factory=Counter)

    def add(self, other: CallTally) -> None:
        self.forward.update(other.forward)
        self.backward.update(other.backward)

    def passes(self) -> PassCount:
        """The passes over points these calls make, as :class:`CountingModel` counts them."""
        return PassCount(
            forward=sum(call.points * n for call, n in self.forward.items()),
            backward=sum(call.points * n for call, n in self.backward.items()),
        )


class RecordingModel(CountingModel):
    """A :class:`CountingModel` that also tallies its calls by kind (:class:`ModelCall`) until
    :meth:`take` hands the tally over and starts a new one."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.calls = CallTally()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        call = ModelCall(tuple(x.shape), tuple(x.stride()), x.dtype, out.requires_grad)
        self.calls.forward[call] += 1
        if out.requires_grad:
            out.register_hook(lambda grad: self._backward_call(call))
        return out

    def _backward_call(self, call: ModelCall) -> None:
        self.calls.backward[call] += 1

    def take(self) -> CallTally:
        """The calls since the last ``take`` (or since construction)."""
        calls, self.calls = self.calls, CallTally()
        return calls
