"""The training loop's batches: one interface over held-in-memory and streamed datasets.

``training_batches(...)`` returns an object with ``len()`` (batches per epoch) and
``epoch(epoch, start_batch)`` yielding :class:`~generalist.data.streaming.TrainBatch` es. Small
datasets stay on the device as one uint8 tensor and are augmented there (the airbench-style
default); image folders over the memory budget stream from disk (:mod:`generalist.data.streaming`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from generalist.config import Config
from generalist.data import BatchAugment, DatasetInfo, DataSplits, EpochBatches, to_float
from generalist.data.folders import FileImages
from generalist.data.streaming import StreamingBatches, TrainBatch
from generalist.training.placement import Placement


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
    place: Placement,
    echo: Callable[[str], None],
) -> MemoryBatches | StreamingBatches:
    """The source of this process's training batches (``generator`` drives in-memory
    augmentation; streamed samples seed their own, and each replica decodes its share)."""
    if isinstance(splits.train, FileImages):
        return StreamingBatches(splits.train, batches, place.device, place.decode_share(), echo)
    augment = batch_augment(config, splits.info)
    return MemoryBatches(splits, batches, augment, generator, place.device)


def batch_augment(config: Config, info: DatasetInfo) -> BatchAugment:
    """The dataset's standard crop and flip unless the config overrides them (also what RST's
    pseudo-labeled images get, so both halves of its batches are augmented alike)."""
    data = config.data
    padding = info.default_crop_padding if data.crop_padding is None else data.crop_padding
    return BatchAugment(padding, info.default_flip if data.flip is None else data.flip)
