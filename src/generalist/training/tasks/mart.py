"""MART (Wang et al. 2020): boosted CE on x' + β·KL weighted by (1 − p_y(x)).

Misclassified clean examples get more weight in the consistency term; the adversarial part
also pushes down the most likely wrong class. Constants follow the official implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from generalist.training.tasks.base import TaskContext, TrainingAttack
from generalist.training.tasks.registry import register_task
from generalist.training.tasks.trades import TRADES_NORMS, check_beta, small_gaussian_start


@dataclass(frozen=True)
class MartParams:
    beta: float = 6.0
    """The weighted KL term's weight (the official β = 6)."""

    def check(self, key: str, epochs: int) -> None:
        check_beta(self.beta, key)


@register_task("mart", params=MartParams, norms=TRADES_NORMS)
@dataclass(frozen=True)
class MartTask:
    attack: TrainingAttack
    beta: float
    name: str = "mart"

    @classmethod
    def build(cls, params: MartParams, context: TaskContext) -> MartTask:
        return cls(context.require_attack("mart"), params.beta)

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        position: float,
    ) -> torch.Tensor:
        init = small_gaussian_start(x, generator)
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
