"""Shuffled mini-batch indices that depend only on (seed, epoch), so resuming is exact.

Each epoch's order is derived from its own seed rather than from an RNG carried across epochs,
so a run resumed at epoch e, batch b sees exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

from generalist.errors import DataError


class EpochBatches:
    def __init__(self, num_examples: int, batch_size: int, seed: int, drop_last: bool = False):
        if num_examples < 1:
            raise DataError("the training split is empty; lower data.val_size or raise train_limit")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last

    @property
    def num_batches(self) -> int:
        if self.drop_last:
            return self.num_examples // self.batch_size
        return -(-self.num_examples // self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def indices(
        self, epoch: int, start_batch: int = 0, device: torch.device | str = "cpu"
    ) -> Iterator[torch.Tensor]:
        """int64 index tensors on ``device`` for batches ``start_batch..`` of ``epoch``.

        The order is drawn on the CPU (the same on every device) and moved to ``device`` once
        per epoch: indexing GPU data with a CPU index would copy it, and wait, every batch.
        """
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch must be in [0, {self.num_batches}], got {start_batch}")
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        order = torch.randperm(self.num_examples, generator=generator).to(device)
        for b in range(start_batch, self.num_batches):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]


def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"generalist-batches:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)
