"""In-memory image datasets: uint8 NCHW images and int64 labels, one tensor each.

Whole datasets fit in (GPU) memory for everything this project trains, so a dataset is just two
tensors: batches are an index away and there are no loader processes whose RNG could drift.
Images stay uint8 until :func:`to_float` so a CIFAR training set costs 150 MB, not 600 MB.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from generalist.errors import DataError

if TYPE_CHECKING:
    from generalist.data.folders import FileImages


@dataclass
class ImageDataset:
    images: torch.Tensor
    """uint8, shape (N, C, H, W)."""
    labels: torch.Tensor
    """int64, shape (N,)."""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(
                f"images must be a uint8 (N, C, H, W) tensor, got {self.images.dtype} with shape "
                f"{tuple(self.images.shape)}; convert with (x * 255).round().to(torch.uint8)"
            )
        if self.labels.dtype != torch.int64 or self.labels.ndim != 1:
            raise DataError(
                f"labels must be an int64 (N,) tensor, got {self.labels.dtype} with shape "
                f"{tuple(self.labels.shape)}; convert with labels.long().flatten()"
            )
        if len(self.images) != len(self.labels):
            raise DataError(
                f"{len(self.images)} images but {len(self.labels)} labels; give one label per image"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> ImageDataset:
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return ImageDataset(
            self.images[indices.to(self.images.device)], self.labels[indices.to(self.labels.device)]
        )

    def to(self, device: torch.device | str) -> ImageDataset:
        return ImageDataset(self.images.to(device), self.labels.to(device))

    def fingerprint(self) -> str:
        """SHA-256 of shapes, pixels and labels: records exactly which data a run saw."""
        digest = hashlib.sha256()
        digest.update(repr((tuple(self.images.shape), tuple(self.labels.shape))).encode())
        digest.update(self.images.detach().cpu().contiguous().numpy().data)
        digest.update(self.labels.detach().cpu().contiguous().numpy().data)
        return digest.hexdigest()


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    """(C, H, W)."""
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    """Per-channel mean of the [0, 1] training images, for models that normalise inside."""
    std: tuple[float, ...]
    default_crop_padding: int
    """The dataset's standard random-crop padding (4 on CIFAR, 0 where crops hurt, e.g. digits)."""
    default_flip: bool
    """Whether horizontal flips preserve the label (natural images yes, digits no)."""


@dataclass
class DataSplits:
    train: ImageDataset | FileImages
    """In memory, or (a big image folder) files decoded as they are read."""
    val: ImageDataset | FileImages
    """Carved from the training data; length 0 when ``val_size`` is 0."""
    test: ImageDataset | FileImages
    """The dataset's own test set, never seen by training or model selection."""
    info: DatasetInfo


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to float32 in [0, 1], the range every model and attack works in."""
    if images.dtype != torch.uint8:
        raise DataError(f"to_float expects uint8 images, got {images.dtype}; pass dataset.images")
    return images.to(torch.float32).div_(255)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images in [0, 1] units, in chunks to bound memory."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64).div_(255)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    count = max(1, images.numel() // images.shape[1])
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())
