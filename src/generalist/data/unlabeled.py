"""Unlabeled images for robust self-training (RST): where they come from and how they are read.

Three sources, named by ``data.unlabeled``:

* ``rest`` — the training examples ``data.train_limit`` leaves out, labels hidden: the
  controlled experiment "few labels, many unlabeled images of the same distribution";
* an ``.npz`` file holding an array ``x_unlabeled`` (shaped and typed like the ``npz``
  dataset's images), read without pickle support;
* a folder of image files (searched recursively, read in sorted path order so the pool is the
  same on every machine), decoded with Pillow.

The images must have the labeled data's shape: they are pseudo-labeled by, and trained into,
a model of that input size. Every problem is one :class:`~generalist.errors.DataError` line
that names the file and says what to do.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from generalist.data.dataset import ImageDataset
from generalist.data.readers import _npz_images
from generalist.errors import DataError

UNLABELED_NPZ_KEY = "x_unlabeled"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
REST = "rest"


@dataclass(frozen=True)
class UnlabeledImages:
    images: torch.Tensor
    """uint8 (N, C, H, W), the labeled data's (C, H, W)."""
    source: str
    true_labels: torch.Tensor | None = None
    """Known only for ``rest`` (held back from training): lets a run score its pseudo-labels."""

    def __len__(self) -> int:
        return len(self.images)

    def fingerprint(self) -> str:
        """SHA-256 of the shape and pixels: which unlabeled images a run saw, to the bit."""
        digest = hashlib.sha256(repr(tuple(self.images.shape)).encode())
        digest.update(self.images.contiguous().numpy().data)
        return digest.hexdigest()


def read_unlabeled(
    source: str, image_shape: tuple[int, int, int], rest: Callable[[], ImageDataset]
) -> UnlabeledImages:
    """The images ``source`` names, checked against the labeled ``image_shape`` (C, H, W);
    ``rest`` gives the training examples the labeled split leaves out."""
    if source == REST:
        left_out = rest()
        if len(left_out) == 0:
            raise DataError(
                "data.unlabeled: rest is empty, data.train_limit keeps every training example; "
                "lower data.train_limit"
            )
        return UnlabeledImages(left_out.images, source, left_out.labels)
    path = Path(source).expanduser()
    if path.is_dir():
        images = _read_folder(path, image_shape)
    elif path.is_file():
        images = _read_npz(path)
    else:
        raise DataError(
            f"data.unlabeled: {path} does not exist; pass {REST!r}, an .npz holding "
            f"{UNLABELED_NPZ_KEY}, or a folder of images"
        )
    if tuple(images.shape[1:]) != tuple(image_shape):
        raise DataError(
            f"data.unlabeled: {path} holds images of shape {tuple(images.shape[1:])} (C, H, W) "
            f"but the labeled images are {tuple(image_shape)}; convert them to that shape"
        )
    return UnlabeledImages(images, str(path))


def _read_npz(path: Path) -> torch.Tensor:
    how = f"save the images as {UNLABELED_NPZ_KEY} with numpy.savez"
    if not zipfile.is_zipfile(path):  # np.load would try it as a .npy or a pickle instead
        raise DataError(f"data.unlabeled: {path} is not an .npz archive; {how}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if UNLABELED_NPZ_KEY not in archive.files:
                has = ", ".join(archive.files) or "nothing"
                raise DataError(
                    f"data.unlabeled: {path} has no {UNLABELED_NPZ_KEY} (has {has}); {how}"
                )
            array = archive[UNLABELED_NPZ_KEY]
    except DataError:
        raise
    except Exception as error:  # zip, format and object-array errors all mean an unusable file
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"data.unlabeled: cannot read {path} as .npz ({first}); {how}") from None
    images = _npz_images(array, f"data.unlabeled: {path}:{UNLABELED_NPZ_KEY}")
    if len(images) == 0:
        raise DataError(f"data.unlabeled: {path}:{UNLABELED_NPZ_KEY} holds no images; {how}")
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))


def _read_folder(folder: Path, image_shape: tuple[int, int, int]) -> torch.Tensor:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DataError(
            "data.unlabeled: reading a folder of images needs Pillow; "
            "pip install 'generalist-at[imagefolder]'"
        ) from None
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise DataError(
            f"data.unlabeled: {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})"
        )
    channels, height, width = image_shape
    mode = "L" if channels == 1 else "RGB"
    images = np.empty((len(files), height, width, channels), dtype=np.uint8)
    for index, file in enumerate(files):
        try:
            with Image.open(file) as image:
                pixels = np.asarray(image.convert(mode))
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise DataError(
                f"data.unlabeled: cannot decode {file} ({error}); remove or replace it"
            ) from None
        if pixels.shape[:2] != (height, width):
            raise DataError(
                f"data.unlabeled: {file} is {pixels.shape[1]}x{pixels.shape[0]} but the labeled "
                f"images are {width}x{height}; resize the unlabeled images to match"
            )
        images[index] = pixels.reshape(height, width, channels)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
