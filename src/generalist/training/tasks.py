"""Tasks: how a base learner turns a clean batch into the loss it descends.

A task is the only thing that differs between a natural learner, an ℓ∞-adversarial learner, a
TRADES learner and a MART learner; optimizers, schedules and the merge are shared machinery.
Attacks are crafted with the learner's *own* current weights in eval mode (BatchNorm uses its
running statistics, as in the official code), then the loss is taken in train mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from generalist.attacks.pgd import LossFn, pgd
from generalist.attacks.threat import ThreatModel

TRADES_INIT_SCALE = 0.001
"""TRADES/MART start their inner maximisation at x + 0.001·N(0, 1) (Zhang et al. 2019)."""


class Task(Protocol):
    name: str

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Scalar training loss; ``model`` is in train mode on entry and on exit."""
        ...


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluate with running BN statistics, then restore the mode the caller had set."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class Attack:
    """The inner maximisation of an adversarial task."""

    threat: ThreatModel
    steps: int
    step_size: float
    random_start: bool = True

    def describe(self) -> str:
        return f"PGD-{self.steps} {self.threat} step {self.step_size:.4g}"


@dataclass(frozen=True)
class NaturalTask:
    name: str = "natural"

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        return F.cross_entropy(model(x), y)


@dataclass(frozen=True)
class AdversarialTask:
    """PGD-AT (Madry et al. 2018): cross-entropy on PGD examples crafted against the learner."""

    attack: Attack
    name: str = "adversarial"

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        a = self.attack
        with eval_mode(model):
            x_adv = pgd(
                model,
                x,
                y,
                a.threat,
                steps=a.steps,
                step_size=a.step_size,
                random_start=a.random_start,
                generator=generator,
            )
        return F.cross_entropy(model(x_adv), y)


def _kl_to(clean_probs: torch.Tensor) -> LossFn:
    """Per-example KL(clean ‖ adv) as a function of the adversarial logits (TRADES' attack loss)."""

    def loss_fn(logits: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(logits.float(), dim=1), clean_probs, reduction="none").sum(1)

    return loss_fn


def _small_gaussian_start(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + TRADES_INIT_SCALE * noise


@dataclass(frozen=True)
class TradesTask:
    """TRADES (Zhang et al. 2019): CE on clean inputs + β·KL(f(x) ‖ f(x')), x' maximising the KL."""

    attack: Attack
    beta: float
    name: str = "trades"

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        a = self.attack
        with eval_mode(model):
            with torch.no_grad():
                clean_probs = F.softmax(model(x).float(), dim=1)
            x_adv = pgd(
                model,
                x,
                y,
                a.threat,
                steps=a.steps,
                step_size=a.step_size,
                loss_fn=_kl_to(clean_probs),
                init=_small_gaussian_start(x, generator),
            )
        logits = model(x)
        robust = F.kl_div(
            F.log_softmax(model(x_adv).float(), dim=1),
            F.softmax(logits.float(), dim=1),
            reduction="batchmean",
        )
        return F.cross_entropy(logits, y) + self.beta * robust


@dataclass(frozen=True)
class MartTask:
    """MART (Wang et al. 2020): boosted CE on x' + β·KL weighted by (1 − p_y(x)).

    Misclassified clean examples get more weight in the consistency term; the adversarial part
    also pushes down the most likely wrong class. Constants follow the official implementation.
    """

    attack: Attack
    beta: float
    name: str = "mart"

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        a = self.attack
        with eval_mode(model):
            x_adv = pgd(
                model,
                x,
                y,
                a.threat,
                steps=a.steps,
                step_size=a.step_size,
                init=_small_gaussian_start(x, generator),
            )
        logits_nat = model(x).float()
        logits_adv = model(x_adv).float()
        adv_probs = F.softmax(logits_adv, dim=1)
        top2 = adv_probs.topk(2, dim=1).indices
        wrong = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])
        boosted_ce = F.cross_entropy(logits_adv, y) + F.nll_loss(
            torch.log(1.0001 - adv_probs + 1e-12), wrong
        )
        nat_probs = F.softmax(logits_nat, dim=1)
        true_probs = nat_probs.gather(1, y.unsqueeze(1)).squeeze(1)
        kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(1)
        return boosted_ce + self.beta * (kl * (1.0000001 - true_probs)).mean()


def build_task(kind: str, attack: Attack | None, beta: float) -> Task:
    if kind == "natural":
        return NaturalTask()
    if attack is None:
        raise ValueError(f"task {kind!r} needs an attack")
    if kind == "adversarial":
        return AdversarialTask(attack)
    if kind == "trades":
        return TradesTask(attack, beta)
    if kind == "mart":
        return MartTask(attack, beta)
    raise ValueError(f"unknown task {kind!r}")
