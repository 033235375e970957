"""Clean and PGD accuracy on a split: the quick check run every epoch and at the end of training.

This is deliberately not the full robustness suite (AutoAttack lives in ``generalist eval``):
it is what model *selection* and the training log need, cheap enough to run each epoch on the
validation split. Only points the model gets right are attacked, since a wrong clean prediction
already counts as a robust failure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from generalist import backends
from generalist.attacks.pgd import PGD
from generalist.attacks.threat import ThreatModel
from generalist.data import ImageDataset, to_float
from generalist.inference import eval_mode, predicts_correctly


def accuracies(
    model: nn.Module, data: ImageDataset, threats: Sequence[ThreatModel], **options: Any
) -> dict[str, float]:
    """``{"clean": acc, "<threat>": PGD-``steps`` accuracy, ...}`` in percent, in eval mode;
    ``options`` are :func:`correct_counts`' (steps, batch_size, device, seed)."""
    if len(data) == 0:
        return {}
    return percentages(correct_counts(model, data, threats, **options), len(data))


def percentages(counts: dict[str, int], total: int) -> dict[str, float]:
    return {name: 100.0 * count / total for name, count in counts.items()}


def correct_counts(
    model: nn.Module,
    data: ImageDataset,
    threats: Sequence[ThreatModel],
    *,
    steps: int,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> dict[str, int]:
    """Points right clean and under each attack, over the batches ``shard = (i, n)`` owns.

    Shard i of n takes batches i, i + n, ... of the unsharded order. Batch boundaries stay
    where one process puts them and every attack reseeds per batch, so the shards' counts
    add up to exactly the single-process counts.
    """
    index, count = shard
    attacks = [PGD(threat, steps=steps, seed=seed) for threat in threats]
    correct = {"clean": 0, **{str(t): 0 for t in threats}}
    images, labels = data.images, data.labels
    if device.type == "cuda" and images.device.type == "cpu":  # copies that do not stall
        images, labels = images.pin_memory(), labels.pin_memory()
    # IEEE fp32 whatever the flags say (a validation or test figure is never TF32's), and no
    # autotuning: only the points still right are attacked, so the batch sizes vary.
    with eval_mode(model), backends.for_evaluation():
        for start in range(index * batch_size, len(data), count * batch_size):
            x = to_float(images[start : start + batch_size].to(device, non_blocking=True))
            y = labels[start : start + batch_size].to(device, non_blocking=True)
            right = predicts_correctly(model, x, y)
            correct["clean"] += int(right.sum())
            if not right.any():
                continue
            for threat, attack in zip(threats, attacks, strict=True):
                x_adv = attack(model, x[right], y[right])
                correct[str(threat)] += int(predicts_correctly(model, x_adv, y[right]).sum())
    return correct


def summed_accuracies(
    models: dict[str, nn.Module],
    data: ImageDataset,
    threats: Sequence[ThreatModel],
    *,
    shard_of: Callable[[str], tuple[int, int] | None],
    sum_counts: Callable[[torch.Tensor], None],
    device: torch.device,
    **options: Any,
) -> dict[str, dict[str, float]]:
    """:func:`accuracies` of several models, each counted on the shard of ``data`` that
    ``shard_of(name)`` gives this process (None: not held here), then the counts summed over
    the processes by ``sum_counts`` (one process: shard (0, 1), nothing to sum)."""
    if len(data) == 0:
        return {name: {} for name in models}
    metrics = ["clean", *map(str, threats)]
    counts = torch.zeros(len(models), len(metrics), dtype=torch.int64, device=device)
    for row, (name, model) in enumerate(models.items()):
        shard = shard_of(name)
        if shard is not None:
            found = correct_counts(model, data, threats, shard=shard, device=device, **options)
            counts[row] = torch.tensor([found[m] for m in metrics])
    sum_counts(counts)
    return {
        name: percentages(dict(zip(metrics, row, strict=True)), len(data))
        for name, row in zip(models, counts.tolist(), strict=True)
    }
