"""Decoding one image file into a fixed-size uint8 array, with Pillow only.

Two geometric transforms, both done in one Pillow ``resize(box=...)`` call (crop and resize
together, antialiased) after a JPEG *draft* that lets libjpeg decode at 1/2, 1/4 or 1/8 scale
when the crop is that much larger than the output, which is most of an ImageNet decode's cost:

* evaluation: shorter side to ``size / EVAL_CROP_FRACTION`` then the centre ``size`` square
  (ImageNet's usual Resize(256) + CenterCrop(224));
* training: RandomResizedCrop (area 8-100 %, aspect 3/4-4/3, ten tries then a centre crop, as in
  Szegedy et al. 2015 and torchvision) and a p=0.5 horizontal flip, drawn from a ``random.Random``
  seeded by (seed, epoch, sample index): the same sample gets the same pixels whichever process
  or loader worker decodes it, so results do not depend on the number of workers or processes.

Files that cannot be decoded raise :class:`BadImage`, which names the file; the callers decide
whether that stops the run or skips the file.
"""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

EVAL_CROP_FRACTION = 0.875
"""The centre crop's share of the resized shorter side (224 of 256)."""
CROP_AREA = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG must fail, not decode grey


class BadImage(Exception):
    """``path`` is not a readable image; ``reason`` says why (Pillow's words)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self) -> tuple:  # loader workers send these to the main process
        return BadImage, (self.path, self.reason)


Box = tuple[float, float, float, float]
"""(left, top, right, bottom) in the original image's pixels."""


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of training sample ``index`` in ``epoch``: a hash, so nearby
    (epoch, index) pairs get unrelated streams."""
    digest = hashlib.blake2b(f"generalist-augment:{seed}:{epoch}:{index}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big")


def random_resized_crop(width: int, height: int, rng: random.Random) -> Box:
    """RandomResizedCrop's box for a ``width`` x ``height`` image."""
    area = width * height
    log_low, log_high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*CROP_AREA)
        aspect = math.exp(rng.uniform(log_low, log_high))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, left + w, top + h
    ratio = width / height  # fallback: the largest centre crop with an allowed aspect ratio
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def centre_crop(width: int, height: int, size: int) -> Box:
    """The region that Resize(size / EVAL_CROP_FRACTION) + CenterCrop(size) keeps."""
    side = min(width, height) * EVAL_CROP_FRACTION
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def decode(path: str | Path, size: int, train_seed: int | None = None) -> np.ndarray:
    """``path`` as a (size, size, 3) uint8 RGB array: the training transform drawn from
    ``train_seed``, or the evaluation transform when it is None."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if train_seed is None:
                box, flip = centre_crop(width, height, size), False
            else:
                rng = random.Random(train_seed)
                box = random_resized_crop(width, height, rng)
                flip = rng.random() < 0.5
            image.draft("RGB", _draft_size(width, height, box, size))
            sx, sy = image.size[0] / width, image.size[1] / height  # the draft's scale
            scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
            out = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR, box=scaled)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        raise BadImage(path, str(error) or type(error).__name__) from None
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


def _draft_size(width: int, height: int, box: Box, size: int) -> tuple[int, int]:
    """The smallest whole-image size at which the crop still has ``size`` pixels a side."""
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    return (math.ceil(width * size / crop_w), math.ceil(height * size / crop_h))
