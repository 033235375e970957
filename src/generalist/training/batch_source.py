"""The training loop's batches: one interface over held-in-memory and streamed datasets.

``training_batches(...)`` returns an object with ``len()`` (batches per epoch) and
``epoch(epoch, start_batch)`` yielding :class:`~generalist.data.streaming.TrainBatch` es. Small
datasets stay on the device as one uint8 tensor and are augmented there (the airbench-style
default); image folders over the memory budget stream from disk (:mod:`generalist.data.streaming`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from generalist.config import Config
from generalist.data import BatchAugment, DatasetInfo, DataSplits, EpochBatches, to_float
from generalist.data.folders import FileImages
from generalist.data.streaming import BatchShare, StreamingBatches, TrainBatch
from generalist.training.distributed import LearnerParallel, SingleProcess


class MemoryBatches:
    """Batches indexed out of the training split held on ``device``, augmented there."""

    def __init__(
        self,
        splits: DataSplits,
        batches: EpochBatches,
        augment: BatchAugment,
        generator: torch.Generator,
        device: torch.device,
    ) -> None:
        self.batches = batches
        self.augment = augment
        self.generator = generator
        self.x = splits.train.images.to(device)
        self.y = splits.train.labels.to(device)

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[TrainBatch]:
        # the epoch's order moves to the device once: a CPU index would copy and wait each batch
        for index in self.batches.indices(epoch, start_batch, device=self.x.device):
            x = self.augment(to_float(self.x[index]), self.generator)
            yield TrainBatch(x, self.y[index], len(index), shared=False)


def training_batches(
    config: Config,
    splits: DataSplits,
    batches: EpochBatches,
    generator: torch.Generator,
    parallel: SingleProcess,
    echo: Callable[[str], None],
) -> MemoryBatches | StreamingBatches:
    """The source of this process's training batches (``generator`` drives in-memory
    augmentation; streamed samples seed their own)."""
    if isinstance(splits.train, FileImages):
        return StreamingBatches(splits.train, batches, parallel.device, batch_share(parallel), echo)
    augment = batch_augment(config, splits.info)
    return MemoryBatches(splits, batches, augment, generator, parallel.device)


def batch_augment(config: Config, info: DatasetInfo) -> BatchAugment:
    """The dataset's standard crop and flip unless the config overrides them (also what RST's
    pseudo-labeled images get, so both halves of its batches are augmented alike)."""
    data = config.data
    padding = info.default_crop_padding if data.crop_padding is None else data.crop_padding
    return BatchAugment(padding, info.default_flip if data.flip is None else data.flip)


def batch_share(parallel: SingleProcess) -> BatchShare:
    """This process's :class:`BatchShare`: its replica's slice, and one decode peer per learner.

    Every rank creates every peer group, in the same order, as ``new_group`` requires.
    """
    if not isinstance(parallel, LearnerParallel):
        return BatchShare()
    learners, replicas = len(parallel.names), parallel.replicas
    group = None
    if learners > 1:
        for replica in range(replicas):
            ranks = [learner * replicas + replica for learner in range(learners)]
            created = dist.new_group(ranks)
            if replica == parallel.replica:
                group = created
    return BatchShare(parallel.replica, replicas, parallel.learner, learners, group)
