"""A base learner: one model, its own optimizer and learning-rate schedule, and its task.

"Task-aware" optimisation is the point of the Generalist: the natural learner may use a small
weight decay or Adam while the adversarial one uses SGD with a large weight decay, so each learner
owns its optimizer outright instead of sharing one over a parameter union.

A learner is built from plain values (:mod:`generalist.training.recipe` reads them off the
config); it knows no config itself. Its state (``state_dict``/``load_state_dict``) is what a
checkpoint keeps of it: weights, its optimizer's own state dict (whatever the optimizer), its
attack generator and its task's state when the task keeps one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from generalist.errors import CheckpointError, cut
from generalist.schedules import PiecewiseLinear
from generalist.training.stateful import (
    Stateful,
    check_entries,
    describe_layout,
    load_generator,
    load_module,
)
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

    def state_dict(self) -> dict[str, Any]:
        """What the next step reads of this learner (its teacher belongs to the merge, its
        position on the schedules to the training state); tensors are the live ones."""
        state: dict[str, Any] = {
            "name": self.name,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
        }
        if isinstance(self.task, Stateful):
            state["task"] = self.task.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output in place, as read back from a checkpoint's JSON;
        :class:`CheckpointError` names the first thing that does not fit."""
        if not isinstance(state, dict) or state.get("name") != self.name:
            found = state.get("name") if isinstance(state, dict) else None
            raise CheckpointError(f"has learner {cut(found)} where this run has {self.name}")
        stateful = isinstance(self.task, Stateful)
        required = {"name", "model", "optimizer", "generator"} | ({"task"} if stateful else set())
        check_entries(state, required, f"learner {self.name}")
        load_module(self.model, state["model"], f"{self.name} model")
        load_optimizer(self.optimizer, state["optimizer"], self.name)
        load_generator(self.generator, state["generator"], f"{self.name}'s generator")
        if stateful:
            try:
                self.task.load_state_dict(state["task"])
            except (RuntimeError, KeyError, TypeError, ValueError) as exc:
                reason = str(exc).strip().splitlines()[-1][:160] if str(exc) else type(exc).__name__
                raise CheckpointError(
                    f"has a state of {self.name}'s {self.task.name} task that does not fit it "
                    f"({reason})"
                ) from None


def load_optimizer(optimizer: torch.optim.Optimizer, state: Any, owner: str) -> None:
    """``optimizer.load_state_dict`` of its own state dict as read back from JSON (parameter
    indices became strings, tuples such as Adam's betas lists).

    Torch checks the parameter groups but neither a buffer's shape nor its dtype (it casts), so
    every tensor of a parameter's state must have that parameter's shape and dtype or be a
    scalar (a step count): this holds for every per-parameter optimizer in ``torch.optim``.
    """
    check_entries(state, {"state", "param_groups"}, f"{owner}'s optimizer")
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    per_parameter: dict[int, dict[str, Any]] = {}
    for key, entry in state["state"].items():
        index = str(key)  # a string once read back from JSON
        if not (index.isdigit() and int(index) < len(parameters) and isinstance(entry, dict)):
            raise CheckpointError(
                f"has optimizer state for parameter {index[:40]} of {owner}, "
                f"which has {len(parameters)}"
            )
        parameter = parameters[int(index)]
        for name, value in entry.items():
            misfit = isinstance(value, torch.Tensor) and value.dim() > 0
            if misfit and (value.shape, value.dtype) != (parameter.shape, parameter.dtype):
                raise CheckpointError(
                    f"holds {owner}'s optimizer {name[:40]} of parameter {index} as "
                    f"{describe_layout(value)} where {describe_layout(parameter)} is expected"
                )
        per_parameter[int(index)] = dict(entry)
    current = optimizer.state_dict()["param_groups"]
    saved = state["param_groups"]
    if not isinstance(saved, list) or len(saved) != len(current):
        raise CheckpointError(f"has other parameter groups than {owner}'s optimizer")
    groups = [  # JSON turned tuples (Adam's betas) into lists; give them back their type
        {k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in group.items()}
        for group, now in zip(saved, current, strict=True)
    ]
    try:
        optimizer.load_state_dict({"state": per_parameter, "param_groups": groups})
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"has an optimizer state that does not fit {owner}'s ({exc})"
        ) from None
