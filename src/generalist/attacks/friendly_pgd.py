"""Early-stopped ("friendly") PGD, the inner step of FAT (Zhang et al., ICML 2020).

Plain PGD pushes every example as far up the loss as the ε-ball allows, long after it has
crossed the decision boundary. FAT trains on the *least* adversarial points that are still
misclassified instead: each example is attacked only until its current iterate is misclassified,
then for ``tau`` more steps (misclassified iterates each spend one unit of ``tau``, as in the
official ``earlystop``), and is frozen from then on. With ``tau >= steps`` nothing ever
stops and the result is exactly :func:`generalist.attacks.pgd.pgd`'s.

On a CPU, frozen examples leave the batch, so a mostly-broken batch costs a fraction of a full
PGD step; this is safe because the caller attacks in eval mode, where examples do not interact.
On a GPU they stay in the batch, masked: shrinking it needs the host to read the mask every
step, a stall that costs more than the rows it saves on a device that is rarely full.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from generalist.attacks.base import batch_view
from generalist.attacks.pgd import ascent_step_for, cross_entropy_per_example
from generalist.attacks.threat import ThreatModel


class FriendlyPGDResult(NamedTuple):
    x_adv: torch.Tensor
    steps_taken: torch.Tensor
    """Per example, how many PGD steps moved it (int64, shape [B])."""


def friendly_pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel,
    *,
    steps: int,
    step_size: float,
    tau: int,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    shrink_batch: bool | None = None,
) -> FriendlyPGDResult:
    """Early-stopped PGD-``steps`` with cross-entropy; ``tau`` extra steps after the first miss.

    The iterate that is checked and found misclassified with no ``tau`` left is returned as is;
    every returned point lies in ``threat``'s ball around ``x`` and in [0,1]. ``shrink_batch``
    (default: on a CPU) drops frozen examples from the batch instead of masking them.
    """
    if steps < 0:
        raise ValueError(f"PGD steps must be >= 0, got {steps}")
    if tau < 0:
        raise ValueError(f"FAT's tau must be >= 0, got {tau}")
    x = x.detach()
    x_adv = threat.random_start(x, generator) if random_start else x.clone()
    n = x.shape[0]
    budget = torch.full((n,), tau, dtype=torch.int64, device=x.device)
    steps_taken = torch.zeros(n, dtype=torch.int64, device=x.device)
    moving = torch.ones(n, dtype=torch.bool, device=x.device)
    active = torch.arange(n, device=x.device)
    shrink = x.device.type == "cpu" if shrink_batch is None else shrink_batch
    ascent_step = ascent_step_for(model, threat)
    for _ in range(steps):
        current = x_adv[active].requires_grad_(True)
        logits = model(current)
        target = y[active]
        fooled = logits.detach().argmax(dim=1) != target
        left = budget[active]
        still = moving[active] & ~(fooled & (left == 0))
        budget[active] = left - (fooled & still).long()
        (grad,) = torch.autograd.grad(cross_entropy_per_example(logits, target).sum(), current)
        stepped = ascent_step(x[active], current, grad, step_size)
        x_adv[active] = torch.where(batch_view(still, current), stepped, current.detach())
        steps_taken[active] += still.long()
        moving[active] = still
        if shrink:  # the host reads the mask (free on a CPU) and drops the frozen rows
            active = active[still]
            if active.numel() == 0:
                break
    return FriendlyPGDResult(x_adv.detach(), steps_taken)
