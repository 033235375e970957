"""Readers of the published corruption sets: CIFAR-10-C / CIFAR-100-C and ImageNet-C folders.

CIFAR-C (Zenodo records 2535967 and 3555552): ``<corruption>.npy`` holds the 10,000 test
images at severity 1, then at 2, ... 5 (50,000 × 32 × 32 × 3 uint8) and ``labels.npy`` their
labels, repeated per severity. Arrays are memory-mapped, so a cell costs only what it reads.

ImageNet-C: ``<corruption>/<severity>/<class>/<image>`` (224-px JPEGs, already cropped), read
as files, so nothing but the current batch is in memory. Classes are the sorted folder names,
as for any image folder here; a cell's images are its files sorted by class, then name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from generalist.data.corruptions import CORRUPTIONS, SEVERITIES
from generalist.data.folders import IMAGE_EXTENSIONS
from generalist.errors import DataError

CIFAR_C_LAYOUT = "<corruption>.npy for each of the 15 corruptions and labels.npy"
IMAGENET_C_LAYOUT = "<corruption>/<severity 1-5>/<class>/<image>"


@dataclass
class CifarC:
    """A CIFAR-10-C / CIFAR-100-C folder; :meth:`cell` gives one severity's images."""

    folder: Path
    per_severity: int
    labels: np.ndarray
    """int64, the labels of one severity block (identical in every block)."""

    def cell(self, corruption: str, severity: int, start: int, stop: int) -> torch.Tensor:
        """uint8 (stop - start, C, H, W): images ``start:stop`` of one corruption and severity."""
        images = np.load(self.folder / f"{corruption}.npy", mmap_mode="r")
        offset = (severity - 1) * self.per_severity
        block = np.array(images[offset + start : offset + stop])  # a copy: the map is read-only
        return torch.from_numpy(block).permute(0, 3, 1, 2).contiguous()


def read_cifar_c(folder: str | Path) -> CifarC:
    """Check the layout and shapes (headers only) and return the folder's reader."""
    folder = Path(folder).expanduser()
    if not (folder / "labels.npy").is_file():
        raise DataError(f"{folder} has no labels.npy; a CIFAR-C folder holds {CIFAR_C_LAYOUT}")
    labels = np.load(folder / "labels.npy", mmap_mode="r")
    if labels.ndim != 1 or len(labels) == 0 or len(labels) % len(SEVERITIES):
        raise DataError(
            f"{folder / 'labels.npy'} has shape {labels.shape}; expected one label per image, "
            "5 severity blocks (50,000 for CIFAR-10-C); fetch the folder again"
        )
    per_severity = len(labels) // len(SEVERITIES)
    missing = [name for name in CORRUPTIONS if not (folder / f"{name}.npy").is_file()]
    if missing:
        raise DataError(
            f"{folder} lacks {', '.join(f'{m}.npy' for m in missing)}; the reference mean needs "
            "all 15 corruptions: fetch it again with `generalist data fetch cifar10-c DIR`"
        )
    for name in CORRUPTIONS:
        images = np.load(folder / f"{name}.npy", mmap_mode="r")
        if images.dtype != np.uint8 or images.shape[0] != len(labels) or images.ndim != 4:
            raise DataError(
                f"{folder / name}.npy holds {images.dtype} {images.shape}; expected uint8 "
                f"({len(labels)}, H, W, C) like labels.npy; fetch the folder again"
            )
    block = np.asarray(labels[:per_severity], dtype=np.int64)
    return CifarC(folder, per_severity, block)


@dataclass
class ImageNetC:
    """An ImageNet-C-style folder; :meth:`cell_files` lists one cell, :meth:`decode` reads."""

    folder: Path
    corruptions: tuple[str, ...]
    classes: tuple[str, ...]
    _listings: dict[tuple[str, int], tuple[list[str], list[int]]] = field(default_factory=dict)

    def cell_files(self, corruption: str, severity: int) -> tuple[list[str], list[int]]:
        """The cell's files sorted by (class, name), and their labels (cached)."""
        key = (corruption, severity)
        if key not in self._listings:
            root = self.folder / corruption / str(severity)
            files, labels = [], []
            for label, name in enumerate(self.classes):
                found = (
                    sorted(
                        entry.path
                        for entry in os.scandir(root / name)
                        if entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS
                    )
                    if (root / name).is_dir()
                    else []
                )
                files += found
                labels += [label] * len(found)
            self._listings[key] = (files, labels)
        return self._listings[key]

    def decode(self, files: list[str], channels: int, size: int) -> torch.Tensor:
        """uint8 (N, channels, size, size): each file as RGB (or grey), resized (not cropped:
        the published images are already the 224-px centre crops) only when its size differs."""
        out = torch.empty((len(files), channels, size, size), dtype=torch.uint8)
        for row, path in enumerate(files):
            try:
                with Image.open(path) as image:
                    image = image.convert("L" if channels == 1 else "RGB")
                    if image.size != (size, size):
                        image = image.resize((size, size), Image.Resampling.BILINEAR)
                    pixels = np.asarray(image, dtype=np.uint8).reshape(size, size, channels)
                    out[row] = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
            except (OSError, ValueError, SyntaxError) as error:
                raise DataError(f"cannot read {path} ({error}); replace or delete it") from None
        return out


def read_imagenet_c(folder: str | Path) -> ImageNetC:
    """The corruptions present (each with severity folders 1-5) and the class names."""
    folder = Path(folder).expanduser()
    present = tuple(name for name in CORRUPTIONS if (folder / name).is_dir())
    if not present:
        raise DataError(f"{folder} holds none of the 15 corruption folders; {IMAGENET_C_LAYOUT}")
    for name in present:
        lacking = [s for s in SEVERITIES if not (folder / name / str(s)).is_dir()]
        if lacking:
            raise DataError(
                f"{folder / name} lacks severity folders {lacking}; expected {IMAGENET_C_LAYOUT}"
            )
    first = folder / present[0] / "1"
    classes = tuple(sorted(entry.name for entry in os.scandir(first) if entry.is_dir()))
    if not classes:
        raise DataError(f"{first} has no class folders; expected {IMAGENET_C_LAYOUT}")
    return ImageNetC(folder, present, classes)


def corruption_set_kind(folder: str | Path) -> str:
    """``cifar-c`` (a ``labels.npy`` there) or ``imagenet-c`` (corruption folders there)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"--corruptions {folder}: no such folder; pass a CIFAR-10-C/-100-C folder "
            f"({CIFAR_C_LAYOUT}), an ImageNet-C folder ({IMAGENET_C_LAYOUT}) or `generated`"
        )
    if (folder / "labels.npy").is_file():
        return "cifar-c"
    if any((folder / name).is_dir() for name in CORRUPTIONS):
        return "imagenet-c"
    raise DataError(
        f"--corruptions {folder} is neither a CIFAR-C folder ({CIFAR_C_LAYOUT}) nor an "
        f"ImageNet-C folder ({IMAGENET_C_LAYOUT})"
    )
