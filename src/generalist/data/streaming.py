"""Training batches from an image folder too big for memory, decoded as they are needed.

The batch order is :class:`~generalist.data.EpochBatches`' (seed, epoch) permutation and each
sample's crop and flip come from (seed, epoch, sample index) (see :mod:`generalist.data.images`),
so batch b of epoch e holds the same pixels whether it is decoded by 0 or 16 loader workers, by
one process or split over many, and a run resumed at (e, b) continues exactly.

Decoding runs in ``torch.utils.data`` worker processes, one batch (part) per task, in order;
uint8 batches are pinned and copied to the GPU without blocking, and become floats there.

Under torchrun each process decodes only its share of a batch (see :class:`BatchShare`):
data-parallel replicas of a learner take disjoint contiguous slices, and the processes of
different learners, which train on the same slice, each decode a 1/K of it and all-gather the
uint8 pixels, so every image is decoded once per epoch over the whole job.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from generalist.data.batches import EpochBatches
from generalist.data.dataset import to_float
from generalist.data.folders import FileImages
from generalist.data.images import BadImage, sample_seed


class TrainBatch(NamedTuple):
    x: torch.Tensor
    """float images in [0, 1] on the training device."""
    y: torch.Tensor
    whole: int
    """Examples in the whole batch that ``x`` is (a share of)."""
    shared: bool
    """Whether ``x`` is already this process's share of the batch, not the whole of it."""


@dataclass(frozen=True)
class BatchShare:
    """Which part of each batch this process trains on and decodes.

    It trains on slice ``part`` of ``parts`` (data-parallel replicas); of that slice it decodes
    sub-slice ``peer`` of ``peers`` and all-gathers the rest over ``group`` from the processes
    that train other learners on the same slice.
    """

    part: int = 0
    parts: int = 1
    peer: int = 0
    peers: int = 1
    group: dist.ProcessGroup | None = None


class StreamingBatches:
    """Epochs of :class:`TrainBatch` decoded from ``data`` with the training transform."""

    def __init__(
        self,
        data: FileImages,
        batches: EpochBatches,
        device: torch.device,
        share: BatchShare = BatchShare(),
        echo: Callable[[str], None] = print,
    ) -> None:
        self.data = data
        self.batches = batches
        self.device = device
        self.share = share
        self.echo = echo
        if device.type == "cpu":
            _fix_glibc_mmap_threshold()

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[TrainBatch]:
        share = self.share
        batches = list(self.batches.indices(epoch, start_batch))
        jobs = [
            index.tensor_split(share.parts)[share.part].tensor_split(share.peers)[share.peer]
            for index in batches
        ]
        workers = self.data.options.workers
        loader = DataLoader(
            _DecodeJobs(self.data, self.batches.seed, epoch),
            batch_size=None,
            sampler=jobs,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if workers else None,
        )
        skipped_before = len(self.data.skipped)
        for index, (images, labels, bad) in zip(batches, loader, strict=True):
            self.data.apply_bad_files_policy(bad)
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if share.peers > 1:
                images, labels = _gather(images, labels, share)
            yield TrainBatch(to_float(images), labels, len(index), shared=share.parts > 1)
        skipped = len(self.data.skipped) - skipped_before
        if skipped:
            self.echo(
                f"data: skipped {skipped} unreadable training images in epoch {epoch} "
                f"({len(self.data.skipped)} so far, e.g. {min(self.data.skipped)})"
            )


def _fix_glibc_mmap_threshold() -> None:
    """Keep glibc from moving big allocations into its heap (Linux/glibc only).

    On the CPU every streamed step allocates a fresh float batch (12.6 MB for 256 images of
    64 px). glibc raises its mmap threshold to the size of each such block freed, after which
    the blocks come from the heap, which fragmented and grew by ~12 MB per batch in our
    benchmark (BENCHMARKS.md) instead of returning them. A fixed threshold (glibc's default
    128 KiB) turns the dynamic adjustment off, and memory stays flat. GPU batches live in
    PyTorch's caching allocator and are unaffected.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)


M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter number for the mmap threshold (malloc.h)."""


class _DecodeJobs(Dataset):
    """Item ``indices`` (a batch share): its decoded images, labels and unreadable files."""

    def __init__(self, data: FileImages, seed: int, epoch: int) -> None:
        self.data = data
        self.seed = seed
        self.epoch = epoch

    def __getitem__(
        self, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[BadImage]]:
        positions = indices.tolist()
        seeds = [sample_seed(self.seed, self.epoch, i) for i in positions]
        return self.data.decode_some(positions, seeds, threads=1)


def _gather(
    images: torch.Tensor, labels: torch.Tensor, share: BatchShare
) -> tuple[torch.Tensor, torch.Tensor]:
    """The peers' decoded sub-slices, concatenated in peer order (padded to one length for
    ``all_gather``, which needs equal sizes; a skipped file makes them differ)."""
    count = torch.tensor([len(labels)], device=images.device)
    counts = [torch.zeros_like(count) for _ in range(share.peers)]
    dist.all_gather(counts, count, group=share.group)
    sizes = [int(c) for c in counts]
    longest = max(sizes)
    padded_images = images.new_zeros((longest, *images.shape[1:]))
    padded_images[: len(images)] = images
    padded_labels = labels.new_zeros(longest)
    padded_labels[: len(labels)] = labels
    all_images = [torch.empty_like(padded_images) for _ in sizes]
    all_labels = [torch.empty_like(padded_labels) for _ in sizes]
    dist.all_gather(all_images, padded_images, group=share.group)
    dist.all_gather(all_labels, padded_labels, group=share.group)
    return (
        torch.cat([part[:n] for part, n in zip(all_images, sizes, strict=True)]),
        torch.cat([part[:n] for part, n in zip(all_labels, sizes, strict=True)]),
    )
