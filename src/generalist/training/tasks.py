"""Tasks: how a base learner turns a clean batch into the loss it descends.

A task is the only thing that differs between a natural learner, an ℓ∞-adversarial learner, a
TRADES, MART, FAT, CURE, IAT or RST learner; optimizers, schedules and the merge are shared
machinery.
Attacks are crafted with the learner's *own* current weights in eval mode (BatchNorm uses its
running statistics, as in the official code), then the loss is taken in train mode.

A task sees the training position on the epoch axis (the epoch e, or per step the fractional
epoch: ``schedule_granularity``) so that it can follow a schedule (FAT's τ, CURE's warm-up). A
task that must act on the gradients or after the update (CURE) also implements
:class:`AppliesGradients`; the learner then hands it the optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from generalist.attacks.base import LossFn
from generalist.attacks.friendly_pgd import friendly_pgd
from generalist.attacks.pgd import cross_entropy_per_example, pgd
from generalist.attacks.threat import ThreatModel
from generalist.config import (
    CURE_DEFAULTS,
    IAT_MIXUP_ALPHA,
    TaskConfig,
)
from generalist.inference import eval_mode
from generalist.schedules import PiecewiseLinear, build_schedule
from generalist.training import cure
from generalist.training.mixup import draw_mixup, interpolated_loss
from generalist.training.unlabeled_pool import (
    PseudoLabeledPool,
    unlabeled_count,
    unlabeled_fraction,
)

TRADES_INIT_SCALE = 0.001
"""TRADES/MART start their inner maximisation at x + 0.001·N(0, 1) (Zhang et al. 2019)."""


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
class NaturalTask:
    name: str = "natural"

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        position: float,
    ) -> torch.Tensor:
        return F.cross_entropy(model(x), y)


@dataclass(frozen=True)
class AdversarialTask:
    """PGD-AT (Madry et al. 2018): cross-entropy on PGD examples crafted against the learner."""

    attack: TrainingAttack
    name: str = "adversarial"

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        position: float,
    ) -> torch.Tensor:
        x_adv = self.attack.craft(model, x, y, generator)
        return F.cross_entropy(model(x_adv), y)


def _kl_to(clean_probs: torch.Tensor) -> LossFn:
    """Per-example KL(clean ‖ adv) as a function of the adversarial logits (TRADES' attack loss)."""

    def loss_fn(logits: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(logits.float(), dim=1), clean_probs, reduction="none").sum(1)

    return loss_fn


def _small_gaussian_start(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + TRADES_INIT_SCALE * noise


def trades_adversarial(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: TrainingAttack,
    generator: torch.Generator,
) -> torch.Tensor:
    """TRADES' inner maximisation: x' maximising KL(f(x) ‖ f(x')), crafted in eval mode."""
    with eval_mode(model), torch.no_grad():
        clean_probs = F.softmax(model(x).float(), dim=1)
    init = _small_gaussian_start(x, generator)
    return attack.craft(model, x, y, generator, loss_fn=_kl_to(clean_probs), init=init)


def trades_divergence(logits: torch.Tensor, adv_logits: torch.Tensor) -> torch.Tensor:
    """TRADES' robust term KL(f(x) ‖ f(x')), batch-averaged, differentiated through both."""
    return F.kl_div(
        F.log_softmax(adv_logits.float(), dim=1),
        F.softmax(logits.float(), dim=1),
        reduction="batchmean",
    )


def trades_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: TrainingAttack,
    beta: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """CE(f(x), y) + β·KL(f(x) ‖ f(x')), x' maximising the KL, every example weighing the same."""
    x_adv = trades_adversarial(model, x, y, attack, generator)
    logits = model(x)
    return F.cross_entropy(logits, y) + beta * trades_divergence(logits, model(x_adv))


@dataclass(frozen=True)
class TradesTask:
    """TRADES (Zhang et al. 2019): CE on clean inputs + β·KL(f(x) ‖ f(x')), x' maximising the KL."""

    attack: TrainingAttack
    beta: float
    name: str = "trades"

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        position: float,
    ) -> torch.Tensor:
        return trades_loss(model, x, y, self.attack, self.beta, generator)


@dataclass(frozen=True)
class InterpolatedAdversarialTask:
    """IAT (Lamb et al. 2019): the mean of a mixup loss on the clean batch and one on its PGD
    examples (crafted on the unmixed inputs).

    Each of the two mixups draws its own λ ~ Beta(α, α) and partner permutation, from the
    learner's generator after the attack's draws, so a run is reproducible and resumes exactly.
    """

    attack: TrainingAttack
    alpha: float
    name: str = "iat"

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        position: float,
    ) -> torch.Tensor:
        x_adv = self.attack.craft(model, x, y, generator)
        clean = draw_mixup(len(x), self.alpha, generator, x.device)
        adversarial = draw_mixup(len(x), self.alpha, generator, x.device)
        return interpolated_loss(model, x, x_adv, y, clean, adversarial)


@dataclass(frozen=True)
class RobustSelfTrainingTask:
    """RST (Carmon et al. 2019): TRADES on the labeled batch plus pseudo-labeled images.

    The batch the loop hands every learner stays the labeled one; this task adds
    :func:`unlabeled_count` images drawn (with the learner's generator, augmented like the labeled
    ones) from the pseudo-labeled pool, so that they make up ``fraction`` of what it trains on.
    Every image of the combined batch weighs the same in both TRADES terms, as in the paper.
    """

    attack: TrainingAttack
    beta: float
    fraction: float
    pool: PseudoLabeledPool
    name: str = "rst"

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        position: float,
    ) -> torch.Tensor:
        x_unlabeled, y_pseudo = self.pool.draw(unlabeled_count(len(x), self.fraction), generator)
        x_all = torch.cat([x, x_unlabeled.to(x.dtype)])
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            x_all = x_all.contiguous(memory_format=torch.channels_last)
        return trades_loss(
            model, x_all, torch.cat([y, y_pseudo]), self.attack, self.beta, generator
        )


@dataclass(frozen=True)
class MartTask:
    """MART (Wang et al. 2020): boosted CE on x' + β·KL weighted by (1 − p_y(x)).

    Misclassified clean examples get more weight in the consistency term; the adversarial part
    also pushes down the most likely wrong class. Constants follow the official implementation.
    """

    attack: TrainingAttack
    beta: float
    name: str = "mart"

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        position: float,
    ) -> torch.Tensor:
        init = _small_gaussian_start(x, generator)
        x_adv = self.attack.craft(model, x, y, generator, init=init)
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


@dataclass(frozen=True)
class FriendlyAdversarialTask:
    """FAT (Zhang et al. 2020): CE on early-stopped PGD examples (see ``friendly_pgd``).

    ``tau`` is a schedule over the epochs (FAT raises it as training goes on), read at the
    current position and rounded to the nearest whole number of steps, halves up.
    """

    attack: TrainingAttack
    tau: PiecewiseLinear
    name: str = "fat"

    def tau_at(self, position: float) -> int:
        return math.floor(self.tau(position) + 0.5)

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        position: float,
    ) -> torch.Tensor:
        a = self.attack
        with eval_mode(model):
            x_adv = friendly_pgd(
                model,
                x,
                y,
                a.threat,
                steps=a.steps,
                step_size=a.step_size,
                tau=self.tau_at(position),
                random_start=a.random_start,
                generator=generator,
            ).x_adv
        return F.cross_entropy(model(x_adv), y)


@dataclass(frozen=True)
class CureSettings:
    """CURE's hyper-parameters (ResNet-18 defaults in ``presets/methods/cure.yaml``)."""

    beta: float
    mask_fraction: float
    prominence_alpha: float
    consistency_weight: float
    warmup_epochs: float
    """Natural cross-entropy only while the position is <= this (0 = CURE from the start)."""


class CureTask:
    """CURE (Gowda et al. 2024): TRADES + conserved gradients + a revision consistency term.

    The loss is ``CE(f(x), y) + β·KL(f(x) ‖ f(x')) + γ·[KL(p_rev(x) ‖ p(x)) +
    KL(p_rev(x') ‖ p(x'))]`` with x' TRADES' adversarial example; ``L_nat`` is its first term
    and ``L_adv`` the TRADES KL, whose separate gradients rank the weights (see
    :mod:`generalist.training.cure`). The learner's backward pass fills the gradients of the
    whole loss; :meth:`apply_gradients` then zeroes the conserved entries, steps, and flips the
    revision coin. During the natural warm-up neither happens, and the revision restarts from
    the model on the first CURE step.
    """

    name = "cure"

    def __init__(
        self, attack: TrainingAttack, settings: CureSettings, revision: cure.RevisionModel
    ) -> None:
        self.attack = attack
        self.settings = settings
        self.revision = revision
        self._prominence: list[torch.Tensor] | None = None

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


def build_task(kind: str, attack: TrainingAttack | None, beta: float) -> Task:
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


def task_from_config(
    config: TaskConfig,
    attack: TrainingAttack | None,
    model: nn.Module,
    *,
    epochs: int,
    seed: int,
    pretrained: bool = False,
    key: str = "task",
    pseudo_labeled: PseudoLabeledPool | None = None,
) -> Task:
    """Build the task a learner's config asks for; ``model`` is the learner's own model.

    ``seed`` seeds the task's own randomness (CURE's revision coin); FAT's τ schedule and CURE's
    warm-up are laid over ``epochs`` like every other schedule. A ``pretrained`` model (one
    loaded with ``model.init_from``) already is CURE's naturally trained start, so CURE skips its
    natural warm-up then. ``pseudo_labeled`` is the run's pseudo-labeled pool (RST reads it).
    """
    if config.type in ("iat", "rst") and attack is None:
        raise ValueError(f"task {config.type!r} needs an attack")
    if config.type == "iat":
        alpha = IAT_MIXUP_ALPHA if config.mixup_alpha is None else config.mixup_alpha
        return InterpolatedAdversarialTask(attack, alpha)
    if config.type == "rst":
        if pseudo_labeled is None:
            raise ValueError(f"{key}: task 'rst' needs the run's pseudo-labeled images")
        fraction = unlabeled_fraction(config)
        return RobustSelfTrainingTask(attack, config.beta, fraction, pseudo_labeled)
    if config.type == "fat":
        if attack is None:
            raise ValueError("task 'fat' needs an attack")
        tau = build_schedule(0 if config.tau is None else config.tau, epochs, f"{key}.tau")
        return FriendlyAdversarialTask(attack, tau)
    if config.type == "cure":
        if attack is None:
            raise ValueError("task 'cure' needs an attack")
        value = {
            name: default if getattr(config, name) is None else getattr(config, name)
            for name, default in CURE_DEFAULTS.items()
        }
        settings = CureSettings(
            beta=config.beta,
            mask_fraction=value["mask_fraction"],
            prominence_alpha=value["prominence_alpha"],
            consistency_weight=value["consistency_weight"],
            warmup_epochs=0.0 if pretrained else value["natural_warmup"] * epochs,
        )
        revision = cure.RevisionModel(
            model, rate=value["revision_rate"], decay=value["revision_decay"], seed=seed
        )
        return CureTask(attack, settings, revision)
    return build_task(config.type, attack, config.beta)
