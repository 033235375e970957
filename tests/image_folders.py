"""Small real JPEG folders for the image-folder tests, built from the shared CIFAR-10 subset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from generalist.data import load_splits

CIFAR_DIR = Path("/work/shared/data/cifar10-subset")
CLASSES = ("airplane", "automobile", "bird", "cat")


def write_jpeg_folder(root: Path, per_class: int = 40, val_per_class: int = 10) -> Path:
    """``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``: CIFAR images of four
    classes, upscaled to 56 x 48 (not square, so crops and resizes are exercised)."""
    cifar = load_splits("cifar10", CIFAR_DIR, val_size=0)
    for split, data, count in (
        ("train", cifar.train, per_class),
        ("val", cifar.test, val_per_class),
    ):
        labels = data.labels.numpy()
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for number, index in enumerate(np.flatnonzero(labels == label)[:count]):
                pixels = data.images[index].permute(1, 2, 0).numpy()
                image = Image.fromarray(pixels).resize((56, 48), Image.Resampling.BICUBIC)
                image.save(folder / f"{number:04d}.jpg", quality=90)
    return root
