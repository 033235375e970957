"""A look at a user's own images before anything is decoded: their size, channels and dtype.

``npz`` and ``imagefolder`` runs take their recipe (model, epochs, budgets) from the images'
resolution band and, for folders, decode at the images' own size; both must be known when the
config is built, before the data is read. So this reads only what is cheap: the ``.npy`` header
of ``x_train`` inside the ``.npz`` (no pixels), or the headers of a few dozen files of the
folder's training split (Pillow opens an image lazily). Anything it cannot read gives ``None``:
the reader proper then says what is wrong with the data, with its own one-line error.
"""

from __future__ import annotations

import os
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from generalist.data.folders import IMAGE_EXTENSIONS

_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
FOLDER_SAMPLE = 32
"""Files whose headers are read to size an image folder: a few classes' worth, in milliseconds."""


@dataclass(frozen=True)
class ImageProbe:
    """What the images of a dataset look like, from their headers."""

    channels: int
    side: int
    """The shorter side in pixels (for a folder: the most common one among the files read)."""
    sides: tuple[int, int]
    """The smallest and largest shorter side seen (equal for an ``.npz``)."""
    dtype: str
    """The stored pixel type: ``uint8``, ``float32``, ... (``file`` for an image folder)."""
    source: str
    """Where they were seen, for messages: ``x_train in d.npz``, ``DIR/train (32 files read)``."""


def probe_images(dataset: str, data_dir: str | Path | None) -> ImageProbe | None:
    """The images of an ``npz`` or ``imagefolder`` dataset at ``data_dir``, or None when there is
    nothing readable there (or the dataset is neither)."""
    if data_dir is None:
        return None
    path = Path(data_dir).expanduser()
    if dataset == "npz":
        return _probe_npz(path)
    if dataset == "imagefolder":
        return _probe_folder(path / "train")
    return None


def _probe_npz(path: Path) -> ImageProbe | None:
    try:
        with zipfile.ZipFile(path) as archive, archive.open("x_train.npy") as member:
            version = np.lib.format.read_magic(member)
            read_header = _HEADER_READERS.get(version)
            if read_header is None:
                return None
            shape, _, dtype = read_header(member)  # the header only, not the pixels
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    if len(shape) == 3:
        channels, height, width = 1, shape[1], shape[2]
    elif len(shape) == 4 and shape[1] in (1, 3):
        channels, height, width = shape[1], shape[2], shape[3]
    elif len(shape) == 4 and shape[3] in (1, 3):
        channels, height, width = shape[3], shape[1], shape[2]
    else:
        return None  # the reader names the shape it cannot use
    side = min(height, width)
    return ImageProbe(channels, side, (side, side), dtype.name, f"x_train in {path.name}")


def _probe_folder(train: Path) -> ImageProbe | None:
    from PIL import Image, UnidentifiedImageError

    sides: list[int] = []
    for path in _sample_files(train):
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except (OSError, UnidentifiedImageError, ValueError):
            continue  # the reader decides what an unreadable file means (data.bad_files)
    if not sides:
        return None
    side = Counter(sides).most_common(1)[0][0]
    where = f"{train} ({len(sides)} files read)"
    # Folders are always decoded to RGB, whatever the files hold.
    return ImageProbe(3, side, (min(sides), max(sides)), "file", where)


def _sample_files(train: Path) -> list[str]:
    """Up to :data:`FOLDER_SAMPLE` image files, a few from each class folder in sorted order."""
    try:
        classes = sorted(e.path for e in os.scandir(train) if e.is_dir())
    except OSError:
        return []
    per_class = max(1, FOLDER_SAMPLE // max(1, len(classes)))
    files: list[str] = []
    for folder in classes[:FOLDER_SAMPLE]:
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        images = [n for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
        files += [os.path.join(folder, name) for name in images[:per_class]]
    return files[:FOLDER_SAMPLE]
