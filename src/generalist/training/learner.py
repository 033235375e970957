"""A base learner: one model, its own optimizer and learning-rate schedule, and its task.

"Task-aware" optimisation is the point of the Generalist: the natural learner may use a small
weight decay or Adam while the adversarial one uses SGD with a large weight decay, so each learner
owns its optimizer outright instead of sharing one over a parameter union.

A learner is built from plain values (:mod:`generalist.training.recipe` reads them off the
config); it knows no config itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import nn

from generalist.schedules import PiecewiseLinear
from generalist.training.tasks import AppliesGradients, Task


@dataclass
class Learner:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_schedule: PiecewiseLinear
    gamma: PiecewiseLinear
    task: Task
    generator: torch.Generator
    """Random starts of this learner's attacks, so adding a learner never shifts another's."""
    skip_nonfinite: bool = False
    """``checkpoint.on_nonfinite: skip``: a NaN/inf loss leaves the learner as it was (weights,
    BatchNorm statistics the forward pass touched, optimizer state), at the price of one more
    host sync per step."""
    gradient_sync: Callable[[nn.Module], None] | None = None
    """Called between the backward pass and the update: data-parallel replicas of this learner
    average their gradients there (see :mod:`generalist.training.distributed`)."""
    autocast: AbstractContextManager[object] = field(default_factory=contextlib.nullcontext)
    """The precision of the forward passes and the loss (the task's attack included), from
    :func:`generalist.devices.training_autocast`. The backward pass and the update run outside
    it: autocast only decides the forward ops' dtypes, and the update belongs in fp32."""

    def train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        position: float,
    ) -> torch.Tensor:
        """One optimizer step at ``position`` on the epoch axis (the epoch e itself, or per step
        e − 1 + batches done / batches per epoch: ``schedules.schedule_position``); returns the
        detached loss.

        The loss stays on the device (no ``.item()``); the loop checks all learners' losses
        for finiteness at once, with a single host sync per step. A task that edits the
        gradients or keeps state in step with the weights (CURE) takes the optimizer step
        itself.
        """
        lr = self.lr_schedule(position)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        buffers = [b.clone() for b in self.model.buffers()] if self.skip_nonfinite else []
        with self.autocast:
            loss = self.task.loss(self.model, x, y, self.generator, position).float()
        if self.skip_nonfinite and not bool(torch.isfinite(loss)):
            with torch.no_grad():
                for live, saved in zip(self.model.buffers(), buffers, strict=True):
                    live.copy_(saved)
            return loss.detach()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.gradient_sync is not None:
            self.gradient_sync(self.model)
        if isinstance(self.task, AppliesGradients):
            self.task.apply_gradients(self.model, self.optimizer)
        else:
            self.optimizer.step()
        return loss.detach()
