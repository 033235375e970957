"""The pseudo-labeled images an RST learner draws from, held on the device like the training
split: a draw is an index, a cast and the same augmentation the labeled batches get."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from generalist.data import BatchAugment, to_float


def unlabeled_count(labeled: int, fraction: float) -> int:
    """How many pseudo-labeled images join ``labeled`` ones so they make up ``fraction``."""
    return round(labeled * fraction / (1.0 - fraction))


@dataclass(frozen=True)
class PseudoLabeledPool:
    images: torch.Tensor
    """uint8 (N, C, H, W), on the training device."""
    labels: torch.Tensor
    """int64 (N,): the labeler's predictions, on the training device."""
    augment: BatchAugment

    def __len__(self) -> int:
        return len(self.labels)

    def draw(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` distinct images, chosen uniformly and augmented with ``generator`` (the
        learner's own: a draw never shifts another learner's randomness, and resumes exactly)."""
        if count > len(self):
            raise ValueError(f"cannot draw {count} of {len(self)} pseudo-labeled images")
        chosen = torch.randperm(len(self), generator=generator, device=generator.device)[:count]
        chosen = chosen.to(self.images.device)
        return self.augment(to_float(self.images[chosen]), generator), self.labels[chosen]
