"""TRADES (Zhang et al. 2019): CE on clean inputs + β·KL(f(x) ‖ f(x')), x' maximising the KL.

Its pieces (:func:`trades_adversarial`, :func:`trades_divergence`, :func:`trades_loss`) are
shared by the tasks built on TRADES: RST, CURE, and MART's start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from generalist.attacks.base import LossFn
from generalist.errors import ConfigError
from generalist.inference import eval_mode
from generalist.training.tasks.base import TaskContext, TrainingAttack
from generalist.training.tasks.registry import register_task

TRADES_INIT_SCALE = 0.001
"""TRADES/MART start their inner maximisation at x + 0.001·N(0, 1) (Zhang et al. 2019)."""
TRADES_NORMS = ("Linf", "L2")
"""The KL attack and its small Gaussian start are defined for these norms (as in the paper)."""


def check_beta(beta: float, key: str) -> None:
    if beta < 0:
        raise ConfigError(f"{key}.beta: must be >= 0, got {beta:g}")


@dataclass(frozen=True)
class TradesParams:
    beta: float = 6.0
    """The robust term's weight (β = 6 for CIFAR in the paper, 1 for MNIST)."""

    def check(self, key: str, epochs: int) -> None:
        check_beta(self.beta, key)


def _kl_to(clean_probs: torch.Tensor) -> LossFn:
    """Per-example KL(clean ‖ adv) as a function of the adversarial logits (TRADES' attack loss)."""

    def loss_fn(logits: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(logits.float(), dim=1), clean_probs, reduction="none").sum(1)

    return loss_fn


def small_gaussian_start(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
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
    init = small_gaussian_start(x, generator)
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


@register_task("trades", params=TradesParams, norms=TRADES_NORMS)
@dataclass(frozen=True)
class TradesTask:
    attack: TrainingAttack
    beta: float
    name: str = "trades"

    @classmethod
    def build(cls, params: TradesParams, context: TaskContext) -> TradesTask:
        return cls(context.require_attack("trades"), params.beta)

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        position: float,
    ) -> torch.Tensor:
        return trades_loss(model, x, y, self.attack, self.beta, generator)
