"""The Generalist merge: EMA teachers, the γ-weighted global EMA, and redistribution.

Exactly DESIGN §1. After every training step t (counted from 0 over the whole run):

1. each teacher θ̄_i ← d_t·θ̄_i + (1−d_t)·θ_i,
2. the global learner θ_g ← d_t·θ_g + (1−d_t)·Σ_i γ_i(e)·θ̄_i,

with d_t = min(d_max, (t+1)/(t+10)). "Parameters" here means every floating-point tensor of the
state dict, so BatchNorm running means and variances are averaged like weights; integer buffers
(``num_batches_tracked``) are counters and are copied, never averaged. Redistribution copies the
whole global state into every base learner; their optimizers keep their momentum.

All updates use the ``torch._foreach_*`` kernels: one fused launch per tensor list instead of
one per tensor, which matters for the hundreds of small tensors of a ResNet.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn


def state_tensors(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The model's state as (floating tensors, integer tensors), sharing storage with it.

    ``state_dict()`` returns detached views of the live parameters and buffers, so in-place
    updates on these lists update the model itself.
    """
    floats, ints = [], []
    for tensor in model.state_dict().values():
        (floats if tensor.is_floating_point() else ints).append(tensor)
    return floats, ints


def ema_decay(step: int, decay_max: float, warmup: bool) -> float:
    """d_t = min(d_max, (t+1)/(t+10)): early steps trust the new weights, later ones average."""
    return min(decay_max, (step + 1) / (step + 10)) if warmup else decay_max


class GeneralistMerge:
    """Owns the teachers θ̄_i and the global learner θ_g for a list of base-learner models."""

    def __init__(
        self,
        learners: Sequence[nn.Module],
        global_model: nn.Module,
        *,
        decay_max: float = 0.999,
        warmup: bool = True,
    ) -> None:
        self.learners = list(learners)
        self.teachers = [copy.deepcopy(m) for m in self.learners]
        for teacher in self.teachers:
            teacher.requires_grad_(False)
        self.global_model = global_model.requires_grad_(False)
        self.decay_max = decay_max
        self.warmup = warmup
        self._learner_state = [state_tensors(m) for m in self.learners]
        self._teacher_state = [state_tensors(m) for m in self.teachers]
        self._global_state = state_tensors(self.global_model)

    @torch.no_grad()
    def update(self, step: int, gammas: Sequence[float]) -> float:
        """Apply the teacher and global EMA updates for step ``step``; returns d_t."""
        if len(gammas) != len(self.learners):
            raise ValueError(f"expected {len(self.learners)} mixing weights, got {len(gammas)}")
        d = ema_decay(step, self.decay_max, self.warmup)
        for index in self.trained_here:
            l_float, l_int = self._learner_state[index]
            t_float, t_int = self._teacher_state[index]
            torch._foreach_lerp_(t_float, l_float, 1.0 - d)
            if t_int:
                torch._foreach_copy_(t_int, l_int)
        self._mix(gammas, d)
        return d

    @property
    def trained_here(self) -> Sequence[int]:
        """The learners this process trains, whose teachers it updates: all of them here."""
        return range(len(self.learners))

    def _mix(self, gammas: Sequence[float], d: float) -> None:
        """θ_g ← d·θ_g + (1−d)·Σ_i γ_i·θ̄_i; integer buffers from the first teacher."""
        g_float, g_int = self._global_state
        torch._foreach_mul_(g_float, d)
        for gamma, (t_float, _) in zip(gammas, self._teacher_state, strict=True):
            if gamma != 0.0:
                torch._foreach_add_(g_float, t_float, alpha=(1.0 - d) * gamma)
        if g_int:
            torch._foreach_copy_(g_int, self._teacher_state[0][1])

    @torch.no_grad()
    def redistribute(self) -> None:
        """Copy θ_g (weights and all buffers) into every base learner."""
        g_float, g_int = self._global_state
        for l_float, l_int in self._learner_state:
            torch._foreach_copy_(l_float, g_float)
            if l_int:
                torch._foreach_copy_(l_int, g_int)
