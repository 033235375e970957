"""Image folders (``train/<class>/*``, ``val/<class>/*``): listing, checks and lazy datasets.

A listed folder is a :class:`FileImages`: paths and labels, with pixels decoded only when a
slice of ``images`` is read (evaluation transform, decoded by a thread pool: Pillow releases the
GIL). It quacks like :class:`~generalist.data.ImageDataset` where the code reads datasets
(``len``, ``labels``, ``images[a:b]``, ``subset``, ``fingerprint``), so splits, evaluation and
attacks work on a folder too big for memory without knowing it. Training batches come from
:mod:`generalist.data.streaming`, which decodes with the training transform in loader workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import get_worker_info

from generalist.data.dataset import ImageDataset
from generalist.data.images import BadImage, decode
from generalist.errors import DataError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
)
LAYOUT = "arrange images as train/<class>/<image> and val/<class>/<image>"
BAD_FILE_HINT = "replace or delete it, or skip unreadable files with --set data.bad_files=skip"


@dataclass(frozen=True)
class FolderOptions:
    """How an image folder is read; the ``data.*`` config keys of the same names."""

    image_size: int = 224
    storage: str = "auto"
    """``auto`` (memory if the decoded splits fit ``memory_budget_gb``), ``memory``, ``stream``."""
    memory_budget_gb: float = 4.0
    workers: int = 4
    """Loader processes that decode training batches when streaming (0: in the main process)."""
    bad_files: str = "error"
    """``error``: stop at the first unreadable file, naming it; ``skip``: leave it out, counted."""

    @classmethod
    def from_settings(cls, settings: object, **overrides: object) -> FolderOptions:
        """The options from a config's ``data`` section, which has keys of the same names."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{**{name: getattr(settings, name) for name in names}, **overrides})


@dataclass
class Listing:
    classes: list[str]
    files: list[str]
    labels: list[int]
    skipped: list[str]
    """Files left out with ``bad_files: skip`` (not images by their extension)."""


def list_split(folder: Path, bad_files: str) -> Listing:
    """Every image under ``folder/<class>/`` (recursively, sorted), with its class index.

    Hidden files (``.DS_Store``) are ignored; any other file without an image extension is a
    bad file, as is a class folder without images: with ``skip`` the former is left out and the
    latter keeps its class index (the other split may hold its images), both reported.
    """
    if not folder.is_dir():
        raise DataError(f"no {folder.name} folder in {folder.parent}; {LAYOUT}")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise DataError(f"{folder} has no class folders; {LAYOUT}")
    listing = Listing(classes, [], [], [])
    for label, name in enumerate(classes):
        found = 0
        for parent, dirs, names in os.walk(folder / name, followlinks=True):
            dirs.sort()
            for file in sorted(names):
                if file.startswith("."):
                    continue
                path = os.path.join(parent, file)
                if os.path.splitext(file)[1].lower() not in IMAGE_EXTENSIONS:
                    if bad_files != "skip":
                        raise DataError(
                            f"{path} is not an image (by its extension); {BAD_FILE_HINT}"
                        )
                    listing.skipped.append(path)
                    continue
                listing.files.append(path)
                listing.labels.append(label)
                found += 1
        if not found:
            if bad_files != "skip":
                raise DataError(
                    f"class folder {folder / name} holds no images; add images or remove it "
                    "(or keep it as an empty class with --set data.bad_files=skip)"
                )
            listing.skipped.append(str(folder / name))
    return listing


class LazyImages:
    """The decoded (N, 3, S, S) uint8 images of a :class:`FileImages`, read when indexed."""

    dtype = torch.uint8
    device = torch.device("cpu")

    def __init__(self, owner: FileImages) -> None:
        self.owner = owner

    @property
    def shape(self) -> torch.Size:
        size = self.owner.options.image_size
        return torch.Size((len(self.owner), 3, size, size))

    def __len__(self) -> int:
        return len(self.owner)

    def __getitem__(self, index: slice | torch.Tensor | Sequence[int]) -> torch.Tensor:
        positions = range(len(self.owner))[index] if isinstance(index, slice) else index
        return self.owner.decode([int(i) for i in positions])[0]

    def cpu(self) -> torch.Tensor:
        """Every image, decoded (for evaluations that hold their examples in memory)."""
        return self[:]

    def to(self, device: torch.device | str) -> torch.Tensor:
        return self.cpu().to(device)


class FileImages:
    """A split as image files and int64 labels; see the module docstring."""

    def __init__(self, files: Sequence[str], labels: torch.Tensor, options: FolderOptions) -> None:
        self.files = list(files)
        self.labels = labels
        self.options = options
        self.images = LazyImages(self)
        self.skipped: set[str] = set()
        """Files found unreadable so far and left out (``bad_files: skip``)."""

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, indices: torch.Tensor) -> FileImages:
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return FileImages(
            [self.files[i] for i in indices.tolist()], self.labels[indices], self.options
        )

    def fingerprint(self) -> str:
        """SHA-256 of every file's path, size and label: which files a run saw (hashing the
        pixels would mean reading the whole dataset at every start)."""
        digest = hashlib.sha256(f"files:{self.options.image_size}".encode())
        for path, label in zip(self.files, self.labels.tolist(), strict=True):
            digest.update(f"{path}\0{os.path.getsize(path)}\0{label}\n".encode())
        return digest.hexdigest()

    def decode(
        self, indices: Sequence[int], train_seeds: Sequence[int] | None = None, threads: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` of ``indices``, evaluation transform unless ``train_seeds``
        (one per index) are given; unreadable files raise :class:`DataError` or, with
        ``bad_files: skip``, are left out of both (and added to ``skipped``)."""
        images, labels, bad = self.decode_some(indices, train_seeds, threads)
        self.apply_bad_files_policy(bad)
        return images, labels

    def decode_some(
        self, indices: Sequence[int], train_seeds: Sequence[int] | None = None, threads: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, list[BadImage]]:
        """Like :meth:`decode`, but unreadable files are only left out and returned, whatever
        the policy: loader workers hand them to the main process, which applies it."""
        size = self.options.image_size
        seeds = train_seeds if train_seeds is not None else [None] * len(indices)
        jobs = [(self.files[i], seed) for i, seed in zip(indices, seeds, strict=True)]
        threads = threads or min(self.options.workers, len(jobs))
        if threads > 1:
            with ThreadPoolExecutor(threads) as pool:
                arrays = list(pool.map(lambda job: _try_decode(job[0], size, job[1]), jobs))
        else:
            arrays = [_try_decode(path, size, seed) for path, seed in jobs]
        kept = [p for p, array in enumerate(arrays) if not isinstance(array, BadImage)]
        bad = [array for array in arrays if isinstance(array, BadImage)]
        images = torch.empty((len(kept), 3, size, size), dtype=torch.uint8)
        if get_worker_info() is not None:
            # In a loader worker, decode straight into the shared memory the batch travels
            # in: no per-batch heap buffer, whose reuse let glibc's heap grow over an epoch.
            images.share_memory_()
        pixels = images.numpy()  # a view: filled in place, HWC arrays into CHW rows
        for row, position in enumerate(kept):
            pixels[row] = arrays[position].transpose(2, 0, 1)
        labels = self.labels[torch.as_tensor([indices[p] for p in kept], dtype=torch.int64)]
        return images, labels, bad

    def checked(self, echo: Callable[[str], None]) -> FileImages:
        """This evaluated split with every file decoded once, now rather than at the end of
        training: an unreadable one stops the run naming it, or with ``bad_files: skip`` is
        left out here. (Evaluation slices images and labels separately, so it cannot drop a
        file when it meets it, as training batches do.)"""
        keep = []
        for start in range(0, len(self), 256):
            chunk = range(start, min(start + 256, len(self)))
            _, _, bad = self.decode_some(chunk)
            self.apply_bad_files_policy(bad)
            unreadable = {b.path for b in bad}
            keep += [i for i in chunk if self.files[i] not in unreadable]
        if len(keep) == len(self):
            return self
        echo(
            f"data: skipped {len(self) - len(keep)} unreadable images of an evaluation split, "
            f"e.g. {min(self.skipped)}"
        )
        return self.subset(torch.tensor(keep, dtype=torch.int64))

    def apply_bad_files_policy(self, bad: Sequence[BadImage]) -> None:
        """Stop at the first unreadable file (``bad_files: error``) or note them as skipped."""
        if bad and self.options.bad_files != "skip":
            raise DataError(f"cannot decode {bad[0].path} ({bad[0].reason}); {BAD_FILE_HINT}")
        self.skipped.update(b.path for b in bad)


def _try_decode(path: str, size: int, seed: int | None) -> np.ndarray | BadImage:
    try:
        return decode(path, size, seed)
    except BadImage as bad:
        return bad


def read_folder_splits(
    root: Path, options: FolderOptions, echo: Callable[[str], None]
) -> tuple[list[str], ImageDataset | FileImages, ImageDataset | FileImages]:
    """``(classes, train, val)`` of the folder at ``root``: decoded into memory when
    ``options`` allow it (see :func:`choose_storage`), else lazy :class:`FileImages`."""
    train_list, val_list = (
        list_split(root / "train", options.bad_files),
        list_split(root / "val", options.bad_files),
    )
    if train_list.classes != val_list.classes:
        only = sorted(set(train_list.classes) ^ set(val_list.classes))
        raise DataError(
            f"{root}: train and val have different class folders (e.g. {only[0]!r} is in only "
            "one of them); use the same class names in both"
        )
    skipped = train_list.skipped + val_list.skipped
    if skipped:
        echo(
            f"data: skipped {len(skipped)} non-image files or empty class folders, "
            f"e.g. {skipped[0]}"
        )
    splits = [
        FileImages(listing.files, torch.tensor(listing.labels, dtype=torch.int64), options)
        for listing in (train_list, val_list)
    ]
    in_memory, reason = choose_storage(sum(map(len, splits)), options)
    echo(f"data: {root} {reason}")
    if in_memory:
        threads = max(1, os.cpu_count() or 1)
        kept = [ImageDataset(*split.decode(range(len(split)), threads=threads)) for split in splits]
    else:
        kept = splits
    unreadable = sorted(set().union(*(split.skipped for split in splits)))
    if unreadable:
        echo(f"data: skipped {len(unreadable)} unreadable images, e.g. {unreadable[0]}")
    return train_list.classes, kept[0], kept[1]


def choose_storage(num_images: int, options: FolderOptions) -> tuple[bool, str]:
    """Whether to decode everything into memory, and the sentence saying why."""
    size = options.image_size
    need = num_images * 3 * size * size
    budget = options.memory_budget_gb * 1e9
    what = f"{num_images:,} images are {need / 1e9:.2f} GB as uint8 at {size} px"
    if options.storage == "memory" or (options.storage == "auto" and need <= budget):
        why = (
            "data.storage=memory"
            if options.storage == "memory"
            else (f"within data.memory_budget_gb={options.memory_budget_gb:g}")
        )
        return True, f"{what}: held in memory ({why}; data.storage=stream streams instead)"
    why = (
        "data.storage=stream"
        if options.storage == "stream"
        else (f"over data.memory_budget_gb={options.memory_budget_gb:g}")
    )
    return False, (
        f"{what}: streamed from disk by {options.workers} loader workers ({why}; "
        "data.storage=memory holds them in memory instead)"
    )
