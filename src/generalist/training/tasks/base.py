"""What every task is: a loss on a clean batch, its parameters, and what it can do.

A task is the only thing that differs between a natural learner, an ℓ∞-adversarial learner, a
TRADES, MART, FAT, CURE, IAT or RST learner; optimizers, schedules and the merge are shared
machinery. Each task lives in one file of this package and registers itself with
:func:`generalist.training.tasks.register_task`, carrying

* its **parameters**: a dataclass whose fields are the ``task.params`` keys of a config, with
  their defaults, and an optional ``check(key, epochs)`` that raises a one-line
  :class:`~generalist.errors.ConfigError` naming the key;
* its **capabilities** (:class:`Capabilities`): whether it crafts attacks and in which norms,
  whether its learner may be split into data-parallel replicas, whether it reads unlabeled
  data. The config check, the torchrun placement and the pseudo-labeling stage ask these
  instead of comparing type names;
* a ``build(params, context)`` classmethod turning plain values (:class:`TaskContext`) into the
  object whose :meth:`Task.loss` the learner descends. No task sees the run's config.

Attacks are crafted with the learner's *own* current weights in eval mode (BatchNorm uses its
running statistics, as in the official code), then the loss is taken in train mode.

A task sees the training position on the epoch axis (the epoch e, or per step the fractional
epoch: ``schedule_granularity``) so that it can follow a schedule (FAT's τ, CURE's warm-up). A
task that must act on the gradients or after the update (CURE) also implements
:class:`AppliesGradients`; the learner then hands it the optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from generalist.attacks.base import LossFn
from generalist.attacks.pgd import cross_entropy_per_example, pgd
from generalist.attacks.threat import NORMS, ThreatModel
from generalist.inference import eval_mode
from generalist.training.unlabeled_pool import PseudoLabeledPool


class Task(Protocol):
    name: str

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        position: float,
    ) -> torch.Tensor:
        """Scalar training loss at ``position`` (the epoch e, or per step e − 1 + the share of
        its batches done); ``model`` is in train mode on entry and on exit."""
        ...


@runtime_checkable
class AppliesGradients(Protocol):
    def apply_gradients(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Take the place of ``optimizer.step()`` after the loss's backward pass."""
        ...


@runtime_checkable
class DrawsUnlabeled(Protocol):
    """The parameters of a task that reads unlabeled data say how much of it a batch takes."""

    def unlabeled_per_batch(self, labeled: int) -> int:
        """Pseudo-labeled images added to a batch of ``labeled`` labeled ones."""
        ...


@dataclass(frozen=True)
class Capabilities:
    """What a task can do; the config check, torchrun and the pseudo-labeling stage ask this."""

    attack: bool = True
    """It trains on adversarial examples, so its config needs a norm, ε and steps."""
    norms: tuple[str, ...] = NORMS
    """The threat norms its attack and loss are defined for."""
    whole_batch: str | None = None
    """Why its learner cannot be split into data-parallel replicas (each training on a slice of
    the batch), or None when it can."""
    reads_unlabeled: bool = False
    """It draws from the run's pseudo-labeled images (``data.unlabeled``); its parameters then
    implement :class:`DrawsUnlabeled`."""


@dataclass(frozen=True)
class TrainingAttack:
    """The inner maximisation of an adversarial task: PGD against the learner's own weights.

    Not an :class:`generalist.attacks.base.Attack` (those score a finished model); this one
    crafts the examples a task trains on, from the learner's generator.
    """

    threat: ThreatModel
    steps: int
    step_size: float
    random_start: bool = True

    def describe(self) -> str:
        return f"PGD-{self.steps} {self.threat} step {self.step_size:.4g}"

    def craft(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        *,
        loss_fn: LossFn = cross_entropy_per_example,
        init: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """PGD examples maximising ``loss_fn``, crafted in eval mode; ``init`` replaces the
        random start (TRADES and MART start at x + 0.001·N(0, 1))."""
        with eval_mode(model):
            return pgd(
                model,
                x,
                y,
                self.threat,
                steps=self.steps,
                step_size=self.step_size,
                random_start=self.random_start,
                loss_fn=loss_fn,
                generator=generator,
                init=init,
            )


@dataclass(frozen=True)
class TaskContext:
    """The plain values a task is built from (the recipe step reads them off the config)."""

    attack: TrainingAttack | None = None
    """The learner's training attack; None for a task without ``capabilities.attack``."""
    model: nn.Module | None = None
    """The learner's own model (CURE keeps a revision copy of it)."""
    epochs: int = 1
    """The run's length E, over which a task lays its schedules (FAT's τ, CURE's warm-up)."""
    seed: int = 0
    """Seeds the task's own randomness (CURE's revision coin), never the attacks'."""
    pretrained: bool = False
    """The learners start from trained weights (``model.init_from``)."""
    key: str = "task"
    """The task's dotted config key, for messages (``learners.adv_linf.task``)."""
    pseudo_labeled: PseudoLabeledPool | None = None
    """The run's pseudo-labeled pool, for a task that ``reads_unlabeled``."""

    def require_attack(self, task: str) -> TrainingAttack:
        if self.attack is None:
            raise ValueError(f"{self.key}: task {task!r} needs an attack")
        return self.attack


@dataclass(frozen=True)
class NoParams:
    """The parameters of a task that has none (natural, PGD-AT)."""
