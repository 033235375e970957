"""Saying early that a learner is not learning: its training loss still at chance level.

A recipe that does not fit a model (CIFAR's lr 0.1 on the BatchNorm-free ``small-cnn`` under
PGD) can leave the loss at ln K, a uniform guess over K classes, for many epochs; the run then
looks busy and trains nothing. After the first epoch each learner whose loss over the epoch's
last quarter is still within :data:`CHANCE_MARGIN` of ln K, and whose clean validation accuracy
(when the epoch was validated) is no better than :data:`CHANCE_ACCURACY_FACTOR` times a guess,
is named, with what to try. The accuracy matters for adversarial learners: their loss on PGD
examples can sit near ln K for the first epoch of a run that is learning (clean accuracy well
above chance). The run goes on: some recipes do leave chance level later, and the user decides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

CHANCE_MARGIN = 0.01
"""Relative distance to ln K still counted as chance level (2.280 or more for 10 classes)."""
CHANCE_ACCURACY_FACTOR = 1.5
"""Clean validation accuracy up to 1.5 × 100/K % (15 % for 10 classes) counts as guessing."""


def chance_level_warnings(
    losses: torch.Tensor,
    names: Sequence[str],
    num_classes: int,
    model: str,
    clean: dict[str, float] | None = None,
) -> list[str]:
    """One line per learner at chance level. ``losses`` is the epoch's (batches, learners) loss
    table; ``clean`` each validated learner's clean accuracy (%), if the epoch was validated."""
    if num_classes < 2 or len(losses) == 0:
        return []
    chance = math.log(num_classes)
    tail = losses[-max(1, len(losses) // 4) :].double()
    finite = torch.isfinite(tail)
    counts = finite.sum(dim=0)
    means = torch.where(finite, tail, 0).sum(dim=0) / counts.clamp(min=1)
    lines = []
    for index, name in enumerate(names):
        if counts[index] == 0 or means[index] < chance * (1 - CHANCE_MARGIN):
            continue
        accuracy = (clean or {}).get(name)
        if accuracy is not None and accuracy > CHANCE_ACCURACY_FACTOR * 100 / num_classes:
            continue
        lines.append(
            f"warning: learner {name}'s training loss is {float(means[index]):.3f} at the end of "
            f"epoch 1, chance level for {num_classes} classes (ln {num_classes} = {chance:.3f}): "
            f"it is not learning yet. If it stays there, try a lower learning rate "
            f"(learners.{name}.optimizer.lr), another model (model.name, now "
            f"{model}) or a warm-up (an lr schedule that starts low); the run goes on"
        )
    return lines
