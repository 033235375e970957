"""RST (Carmon et al. 2019): TRADES on the labeled batch plus pseudo-labeled images.

The batch the loop hands every learner stays the labeled one; this task adds
:meth:`RstParams.unlabeled_per_batch` images drawn (with the learner's generator, augmented
like the labeled ones) from the pseudo-labeled pool, so that they make up ``unlabeled_fraction``
of what it trains on. Every image of the combined batch weighs the same in both TRADES terms,
as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from generalist.errors import ConfigError
from generalist.training.tasks.base import TaskContext, TrainingAttack
from generalist.training.tasks.registry import register_task
from generalist.training.tasks.trades import TRADES_NORMS, check_beta, trades_loss
from generalist.training.unlabeled_pool import PseudoLabeledPool, unlabeled_count


@dataclass(frozen=True)
class RstParams:
    beta: float = 6.0
    """TRADES' β (the paper's 6)."""
    unlabeled_fraction: float = 0.5
    """Share of each batch that is pseudo-labeled, in (0, 1) (the paper's half). The labeled
    batch keeps ``data.batch_size``; the pseudo-labeled images come on top."""

    def check(self, key: str, epochs: int) -> None:
        check_beta(self.beta, key)
        if not 0 < self.unlabeled_fraction < 1:
            raise ConfigError(
                f"{key}.unlabeled_fraction: {self.unlabeled_fraction:g} must be in (0, 1)"
            )

    def unlabeled_per_batch(self, labeled: int) -> int:
        return unlabeled_count(labeled, self.unlabeled_fraction)


@register_task("rst", params=RstParams, norms=TRADES_NORMS, reads_unlabeled=True)
@dataclass(frozen=True)
class RobustSelfTrainingTask:
    attack: TrainingAttack
    beta: float
    fraction: float
    pool: PseudoLabeledPool
    name: str = "rst"

    @classmethod
    def build(cls, params: RstParams, context: TaskContext) -> RobustSelfTrainingTask:
        if context.pseudo_labeled is None:
            raise ValueError(f"{context.key}: task 'rst' needs the run's pseudo-labeled images")
        attack = context.require_attack("rst")
        return cls(attack, params.beta, params.unlabeled_fraction, context.pseudo_labeled)

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
