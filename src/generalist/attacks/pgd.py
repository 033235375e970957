"""Projected gradient ascent (Madry et al., 2018), with momentum for MIM (Dong et al., 2018).

One function serves training and evaluation: the training tasks call :func:`pgd` with their
own loss (cross-entropy for PGD-AT, KL to the clean prediction for TRADES), evaluation wraps it
in :class:`PGD` with ``keep_best`` so that an example broken at any iterate counts as broken.
The attack never switches the model between train and eval mode: whoever calls it decides.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from generalist.attacks.base import LossFn, batch_view, threat_fields
from generalist.attacks.threat import ThreatModel
from generalist.compiling import compiled, is_compiled

VERSION = "1"


def cross_entropy_per_example(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y, reduction="none")


def _projected_step(
    threat: ThreatModel, x: torch.Tensor, x_adv: torch.Tensor, grad: torch.Tensor, step: float
) -> torch.Tensor:
    return threat.ascent_step(x, x_adv, grad, step)


def ascent_step_for(
    model: nn.Module, threat: ThreatModel
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]:
    """``threat.ascent_step``, compiled when ``model`` is: a compiled model's attacks run their
    projection as one fused kernel per step instead of half a dozen."""
    if is_compiled(model):
        return functools.partial(compiled(_projected_step), threat)
    return threat.ascent_step


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel,
    *,
    steps: int,
    step_size: float | None = None,
    random_start: bool = True,
    loss_fn: LossFn = cross_entropy_per_example,
    momentum: float = 0.0,
    keep_best: bool = False,
    generator: torch.Generator | None = None,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return adversarial examples inside ``threat``'s ball around ``x`` and inside [0,1].

    ``steps`` is honoured exactly (the official Generalist code's "PGD-20" ran 10 steps; ours
    does not). ``momentum > 0`` gives MIM: the gradient, normalised per example in ℓ1, is
    accumulated before taking the steepest-ascent direction. ``keep_best`` (evaluation) returns,
    per example, the first iterate that was misclassified instead of the last iterate; it needs
    ``y`` to be class labels. ``init`` replaces the random start with a given point (projected
    into the ball): TRADES and MART start from ``x + 0.001·N(0, 1)``.
    """
    if steps < 0:
        raise ValueError(f"PGD steps must be >= 0, got {steps}")
    step = threat.default_step_size(steps) if step_size is None else step_size
    x = x.detach()
    if init is not None:
        x_adv = threat.clip(x, init.detach())
    else:
        x_adv = threat.random_start(x, generator) if random_start else x.clone()
    best = x_adv.clone() if keep_best else None
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device) if keep_best else None
    velocity = torch.zeros_like(x) if momentum > 0 else None
    ascent_step = ascent_step_for(model, threat)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        logits = model(x_adv)
        if keep_best:
            best, fooled = _remember_fooled(logits, y, x_adv, best, fooled)
        (grad,) = torch.autograd.grad(loss_fn(logits, y).sum(), x_adv)
        if velocity is not None:
            l1 = grad.abs().flatten(1).sum(dim=1).clamp_min(1e-12)
            velocity = momentum * velocity + grad / l1.view(-1, *([1] * (x.dim() - 1)))
            grad = velocity
        x_adv = ascent_step(x, x_adv, grad, step)
    if not keep_best:
        return x_adv.detach()
    with torch.no_grad():
        best, fooled = _remember_fooled(model(x_adv), y, x_adv, best, fooled)
    return torch.where(batch_view(fooled, x), best, x_adv).detach()


def _remember_fooled(
    logits: torch.Tensor,
    y: torch.Tensor,
    x_adv: torch.Tensor,
    best: torch.Tensor,
    fooled: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(best, fooled)`` with the iterates that newly fool the model stored; an example once
    fooled stays fooled. Written with ``torch.where``, not a boolean-mask assignment, which
    would make the host wait for the GPU twice per step."""
    newly = (logits.detach().argmax(dim=1) != y) & ~fooled
    return torch.where(batch_view(newly, best), x_adv.detach(), best), fooled | newly


class PGD:
    """PGD-k as an attack object: ``PGD(threat, steps=20)(model, x, y) -> x_adv``."""

    name = "pgd"

    def __init__(
        self,
        threat: ThreatModel | str,
        steps: int = 20,
        step_size: float | None = None,
        *,
        random_start: bool = True,
        momentum: float = 0.0,
        loss_fn: LossFn = cross_entropy_per_example,
        seed: int = 0,
    ) -> None:
        self.threat = ThreatModel.parse(threat)
        self.steps = steps
        self.step_size = self.threat.default_step_size(steps) if step_size is None else step_size
        self.random_start = random_start
        self.momentum = momentum
        self.loss_fn = loss_fn
        self.seed = seed

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": VERSION,
            **threat_fields(self.threat),
            "steps": self.steps,
            "step_size": self.step_size,
            "random_start": self.random_start,
            "momentum": self.momentum,
            "loss": getattr(self.loss_fn, "__name__", type(self.loss_fn).__name__),
            "seed": self.seed,
        }

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        return pgd(
            model,
            x,
            y,
            self.threat,
            steps=self.steps,
            step_size=self.step_size,
            random_start=self.random_start,
            loss_fn=self.loss_fn,
            momentum=self.momentum,
            keep_best=True,
            generator=generator,
        )
