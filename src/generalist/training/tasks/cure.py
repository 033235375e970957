"""CURE (Gowda et al. 2024): TRADES + conserved gradients + a revision consistency term.

The loss is ``CE(f(x), y) + β·KL(f(x) ‖ f(x')) + γ·[KL(p_rev(x) ‖ p(x)) + KL(p_rev(x') ‖ p(x'))]``
with x' TRADES' adversarial example; ``L_nat`` is its first term and ``L_adv`` the TRADES KL,
whose separate gradients rank the weights (the mechanisms are :mod:`generalist.training.cure`).
The learner's backward pass fills the gradients of the whole loss; :meth:`CureTask.
apply_gradients` then zeroes the conserved entries, steps, and flips the revision coin. During
the natural warm-up neither happens, and the revision restarts from the model on the first CURE
step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from generalist.errors import ConfigError
from generalist.training import cure
from generalist.training.tasks.base import TaskContext, TrainingAttack
from generalist.training.tasks.registry import register_task
from generalist.training.tasks.trades import (
    TRADES_NORMS,
    check_beta,
    trades_adversarial,
    trades_divergence,
)


@dataclass(frozen=True)
class CureParams:
    """CURE's hyper-parameters; the defaults are its ResNet-18 values (p = 30 %, α = 0.1,
    γ = 1, r = 0.2, d = 0.999). CURE starts from a naturally trained model (the official code
    trains one first), so by default the first 10 % of the epochs are natural training;
    ``model.init_from`` skips that warm-up."""

    beta: float = 6.0
    """TRADES' β (the ``cure`` preset sets the official 5)."""
    mask_fraction: float = 0.3
    """p: share of each weight tensor's gradient entries (lowest prominence) zeroed every step."""
    prominence_alpha: float = 0.1
    """α: prominence = α·|∂L_nat/∂w| + (1−α)·|∂L_adv/∂w|."""
    consistency_weight: float = 1.0
    """γ: weight of the KL consistency to the revision model."""
    revision_rate: float = 0.2
    """r: probability that the revision model is updated after a step."""
    revision_decay: float = 0.999
    """d: EMA decay of the revision model."""
    natural_warmup: float = 0.1
    """Fraction of the epochs trained with natural CE before CURE starts (same budget)."""

    def check(self, key: str, epochs: int) -> None:
        check_beta(self.beta, key)
        ranges = {  # name: (low, high, high included)
            "mask_fraction": (0.0, 1.0, False),
            "prominence_alpha": (0.0, 1.0, True),
            "consistency_weight": (0.0, math.inf, False),
            "revision_rate": (0.0, 1.0, True),
            "revision_decay": (0.0, 1.0, False),
            "natural_warmup": (0.0, 1.0, False),
        }
        for name, (low, high, closed) in ranges.items():
            value = getattr(self, name)
            if not (low <= value <= high if closed else low <= value < high):
                bound = (
                    f"in [{low:g}, {high:g}{']' if closed else ')'}"
                    if math.isfinite(high)
                    else f">= {low:g}"
                )
                raise ConfigError(f"{key}.{name}: {value:g} is out of range; it must be {bound}")


@dataclass(frozen=True)
class CureSettings:
    """What the loss reads each step (the parameters, with the warm-up in epochs)."""

    beta: float
    mask_fraction: float
    prominence_alpha: float
    consistency_weight: float
    warmup_epochs: float
    """Natural cross-entropy only while the position is <= this (0 = CURE from the start)."""


@register_task(
    "cure",
    params=CureParams,
    norms=TRADES_NORMS,
    whole_batch="whose gradient masks need the whole batch",
)
class CureTask:
    name = "cure"

    def __init__(
        self, attack: TrainingAttack, settings: CureSettings, revision: cure.RevisionModel
    ) -> None:
        self.attack = attack
        self.settings = settings
        self.revision = revision
        self._prominence: list[torch.Tensor] | None = None

    @classmethod
    def build(cls, params: CureParams, context: TaskContext) -> CureTask:
        """A ``pretrained`` model (``model.init_from``) already is CURE's naturally trained
        start, so the natural warm-up is skipped then."""
        if context.model is None:
            raise ValueError(f"{context.key}: task 'cure' needs the learner's model")
        settings = CureSettings(
            beta=params.beta,
            mask_fraction=params.mask_fraction,
            prominence_alpha=params.prominence_alpha,
            consistency_weight=params.consistency_weight,
            warmup_epochs=0.0 if context.pretrained else params.natural_warmup * context.epochs,
        )
        revision = cure.RevisionModel(
            context.model,
            rate=params.revision_rate,
            decay=params.revision_decay,
            seed=context.seed,
        )
        return cls(context.require_attack("cure"), settings, revision)

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        position: float,
    ) -> torch.Tensor:
        s = self.settings
        self._prominence = None
        if position <= s.warmup_epochs:
            return F.cross_entropy(model(x), y)
        if self.revision.steps == 0:
            self.revision.restart_from(model)
        x_adv = trades_adversarial(model, x, y, self.attack, generator)
        logits, adv_logits = model(x), model(x_adv)
        natural = F.cross_entropy(logits, y)
        robust = trades_divergence(logits, adv_logits)
        revised = cure.consistency((self.revision(x), self.revision(x_adv)), (logits, adv_logits))
        params = cure.masked_parameters(model)
        natural_grads = torch.autograd.grad(natural, params, retain_graph=True)
        robust_grads = torch.autograd.grad(robust, params, retain_graph=True)
        self._prominence = cure.prominence(natural_grads, robust_grads, s.prominence_alpha)
        return natural + s.beta * robust + s.consistency_weight * revised

    def apply_gradients(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self._prominence is None:
            optimizer.step()
            return
        cure.conserve(cure.masked_parameters(model), self._prominence, self.settings.mask_fraction)
        self._prominence = None
        optimizer.step()
        self.revision.step(model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The revision model, its step counts and its coin's generator (flat tensors)."""
        return self.revision.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.revision.load_state_dict(state)
