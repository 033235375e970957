"""One reader per on-disk format, each returning the dataset's own train and test sets.

Readers only parse and validate files; splitting, limits and label checks live in
:mod:`generalist.data.splits` so every format gets them identically.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from generalist.data.dataset import DatasetInfo, ImageDataset, channel_stats
from generalist.data.folders import LAYOUT, FileImages, FolderOptions, read_folder_splits
from generalist.data.safe_pickle import safe_load_pickle
from generalist.errors import DataError

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
MNIST_URL = "http://yann.lecun.com/exdb/mnist/ (or any mirror of the four IDX files)"


class TrainTest(NamedTuple):
    train: ImageDataset | FileImages
    test: ImageDataset | FileImages
    info: DatasetInfo


def _dataset(images: np.ndarray, labels: np.ndarray) -> ImageDataset:
    images = np.ascontiguousarray(images, dtype=np.uint8)
    if not images.flags.writeable:  # np.frombuffer views; torch wants memory it may write
        images = images.copy()
    return ImageDataset(
        torch.from_numpy(images), torch.from_numpy(np.asarray(labels, dtype=np.int64).reshape(-1))
    )


def _info(name: str, train: ImageDataset, classes: tuple[str, ...], **kwargs) -> DatasetInfo:
    """Info whose mean/std come from ``kwargs`` (published values) or else the training images."""
    if "mean" not in kwargs:
        kwargs["mean"], kwargs["std"] = channel_stats(train.images)
    c, h, w = train.images.shape[1:]
    return DatasetInfo(name, len(classes), (c, h, w), classes, **kwargs)


def require_dir(data_dir: str | Path | None, name: str, how: str) -> Path:
    if data_dir is None:
        raise DataError(f"{name} needs a data directory; {how} and pass --data-dir")
    return Path(data_dir).expanduser()


# --- digits ---------------------------------------------------------------------------------


def read_digits(data_dir: str | Path | None = None) -> TrainTest:
    """scikit-learn's 8x8 digits (ships with it, so no download): a fixed 80/20 train/test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.data.reshape(-1, 1, 8, 8) * (255 / 16))
    everything = _dataset(images, bunch.target)
    order = torch.randperm(len(everything), generator=torch.Generator().manual_seed(0))
    n_test = round(0.2 * len(everything))
    test = everything.subset(order[:n_test].sort().values)
    train = everything.subset(order[n_test:].sort().values)
    classes = tuple(str(int(c)) for c in bunch.target_names)
    return TrainTest(
        train, test, _info("digits", train, classes, default_crop_padding=0, default_flip=False)
    )


# --- MNIST (IDX) ----------------------------------------------------------------------------

_IDX_UBYTE = 0x08


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (gzipped or raw), checking header and size."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"cannot read {path} ({error}); replace it with a fresh download") from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:2] != b"\0\0" or raw[2] != _IDX_UBYTE or raw[3] != ndim:
        raise DataError(
            f"{path} is not a {ndim}-d unsigned-byte IDX file (bad magic number); "
            "replace it with the original MNIST file"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(
            f"{path} holds {len(raw)} bytes but its header {shape} needs {expected}; the file is "
            "truncated or corrupt, so replace it with a fresh download"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"no {stem}[.gz] in {folder}; download the four MNIST IDX files from {MNIST_URL} "
        "and pass --data-dir pointing at the folder holding them"
    )


def _mnist_folder(root: Path) -> Path:
    for folder in (root, root / "MNIST" / "raw"):  # plain folder, or torchvision's layout
        if any(folder.glob("train-images-idx3-ubyte*")):
            return folder
    return root


def read_mnist(data_dir: str | Path | None) -> TrainTest:
    root = require_dir(data_dir, "mnist", f"download the four IDX files from {MNIST_URL}")
    folder = _mnist_folder(root)
    parts = []
    for prefix in ("train", "t10k"):
        images = _read_idx(_idx_file(folder, f"{prefix}-images-idx3-ubyte"), ndim=3)
        labels = _read_idx(_idx_file(folder, f"{prefix}-labels-idx1-ubyte"), ndim=1)
        if len(images) != len(labels):
            raise DataError(
                f"{folder}: {len(images)} {prefix} images but {len(labels)} labels; "
                "the IDX files come from different downloads, so fetch all four again"
            )
        parts.append(_dataset(images[:, None], labels))
    train, test = parts
    classes = tuple(str(i) for i in range(10))
    info = _info(
        "mnist",
        train,
        classes,
        mean=(0.1307,),
        std=(0.3081,),
        default_crop_padding=0,
        default_flip=False,
    )
    return TrainTest(train, test, info)


# --- CIFAR-10 / CIFAR-100 (python pickles) --------------------------------------------------


def _cifar_folder(data_dir: str | Path | None, folder_name: str, marker: str) -> Path:
    how = f"download the python version from {CIFAR_URL}"
    root = require_dir(data_dir, folder_name, how)
    for folder in (root, root / folder_name):
        if (folder / marker).is_file():
            return folder
    raise DataError(
        f"no {folder_name}/{marker} in {root}; {how} and pass --data-dir pointing at the folder "
        f"containing {folder_name}"
    )


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = safe_load_pickle(path)
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        raise DataError(
            f"{path} lacks the 'data' and '{label_key}' entries of a CIFAR batch; "
            "replace it with a fresh copy from the official archive"
        )
    data, labels = batch["data"], np.asarray(batch[label_key])
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == 3 * 32 * 32
        and len(labels) == len(data)
    ):
        raise DataError(
            f"{path} does not hold N x 3072 uint8 images with one label each; "
            "replace it with a fresh copy from the official archive"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_classes(path: Path, key: str, num_classes: int) -> tuple[str, ...]:
    """Class names from the archive's meta file; numbers if it is absent or unexpected."""
    meta = safe_load_pickle(path) if path.is_file() else {}
    names = meta.get(key) if isinstance(meta, dict) else None
    if isinstance(names, list) and len(names) == num_classes:
        return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return tuple(str(i) for i in range(num_classes))


def _read_cifar(
    name: str,
    train_files: list[Path],
    test_file: Path,
    label_key: str,
    meta: tuple[Path, str],
    num_classes: int,
    stats: tuple[tuple[float, ...], tuple[float, ...]],
) -> TrainTest:
    batches = [_cifar_batch(path, label_key) for path in train_files]
    images, labels = zip(*batches, strict=True)
    train = _dataset(np.concatenate(images), np.concatenate(labels))
    test = _dataset(*_cifar_batch(test_file, label_key))
    classes = _cifar_classes(*meta, num_classes)
    info = _info(
        name, train, classes, mean=stats[0], std=stats[1], default_crop_padding=4, default_flip=True
    )
    return TrainTest(train, test, info)


def _batch_number(path: Path) -> int:
    suffix = path.name.rsplit("_", 1)[-1]
    return int(suffix) if suffix.isdigit() else 0


def read_cifar10(data_dir: str | Path | None) -> TrainTest:
    """The official batches; any non-empty subset of data_batch_1..5 is accepted (tests use one)."""
    folder = _cifar_folder(data_dir, "cifar-10-batches-py", "test_batch")
    train_files = sorted(folder.glob("data_batch_*"), key=_batch_number)
    if not train_files:
        raise DataError(
            f"no data_batch_* files in {folder}; download the python version from {CIFAR_URL} "
            "and extract it there"
        )
    stats = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    return _read_cifar(
        "cifar10",
        train_files,
        folder / "test_batch",
        "labels",
        (folder / "batches.meta", "label_names"),
        10,
        stats,
    )


def read_cifar100(data_dir: str | Path | None) -> TrainTest:
    """CIFAR-100 with its 100 fine labels."""
    folder = _cifar_folder(data_dir, "cifar-100-python", "test")
    if not (folder / "train").is_file():
        raise DataError(
            f"no train file in {folder}; download the python version from {CIFAR_URL} "
            "and extract it there"
        )
    stats = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    return _read_cifar(
        "cifar100",
        [folder / "train"],
        folder / "test",
        "fine_labels",
        (folder / "meta", "fine_label_names"),
        100,
        stats,
    )


# --- .npz -----------------------------------------------------------------------------------

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _npz_images(x: np.ndarray, where: str) -> np.ndarray:
    """NCHW uint8 from NHWC/NCHW/NHW, uint8 or float in [0, 1]."""
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or not (x.shape[1] in (1, 3) or x.shape[3] in (1, 3)):
        raise DataError(
            f"{where} has shape {x.shape}; store images as (N, H, W), (N, C, H, W) or "
            "(N, H, W, C) with 1 or 3 channels"
        )
    if x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{where} has dtype {x.dtype}; store uint8 pixels or floats in [0, 1]")
    outside = ~((x >= 0) & (x <= 1))  # NaN compares false, so it counts as outside
    if outside.any():
        index = int(outside.reshape(len(x), -1).any(axis=1).argmax())
        values = x[index][outside[index]]
        raise DataError(
            f"{where}[{index}] holds {values[0]:.3g}, outside [0, 1] (NaN and inf included); "
            "scale images to [0, 1] or store uint8 pixels"
        )
    return np.rint(x * 255)


def _npz_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
    if y.ndim == 2 and len(y) == n:
        raise DataError(
            f"{where} has shape {y.shape}: one-hot or soft labels? store class indices, "
            "e.g. y.argmax(axis=1)"
        )
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{where} must hold {n} integer class indices, got dtype {y.dtype} shape {y.shape}"
        )
    return y


def _npz_num_classes(y_train: np.ndarray, y_test: np.ndarray, path: Path | str) -> int:
    """K = largest label + 1, provided every class below it occurs somewhere.

    Without a class list the labels must be 0..K-1; a gap means a stray value (an "ignore"
    label such as 255, a typo) that would otherwise silently create hundreds of empty classes.
    Negative labels are left to the split's range check, which names their index.
    """
    num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    present = np.zeros(num_classes, dtype=bool)
    for y in (y_train, y_test):
        present[y[y >= 0]] = True
    if present.all():
        return num_classes
    missing = int(present.argmin())  # below the largest label, so some label lies above it
    name, y = ("y_train", y_train) if (y_train > missing).any() else ("y_test", y_test)
    index = int(np.argmax(y > missing))
    raise DataError(
        f"{path}:{name}[{index}] is {int(y[index])}, but no example has label {missing}; "
        "labels must be the class indices 0..K-1, so renumber them"
    )


def read_npz(data_dir: str | Path | None) -> TrainTest:
    """One .npz with x_train, y_train, x_test, y_test; read without pickle support."""
    how = f"save arrays {', '.join(NPZ_KEYS)} with numpy.savez"
    path = require_dir(data_dir, "npz", how)
    if not path.is_file():
        raise DataError(f"no .npz file at {path}; {how} and pass --data-dir pointing at the file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in NPZ_KEYS if key not in archive.files]
            if missing:
                raise DataError(
                    f"{path} lacks {', '.join(missing)} (has {', '.join(archive.files)}); {how}"
                )
            arrays = {key: archive[key] for key in NPZ_KEYS}
        raw = [key for key, value in arrays.items() if not isinstance(value, np.ndarray)]
        if raw:  # a zip member without the .npy suffix comes back as raw bytes
            raise DataError(f"{path}: {', '.join(raw)} are not .npy arrays in the zip; {how}")
    except DataError:
        raise
    except ValueError as error:
        if "allow_pickle" not in str(error):
            raise DataError(f"cannot read {path} as .npz ({error}); {how}") from None
        raise DataError(
            f"{path} holds an object array (images of different sizes, or Python objects), "
            f"which would need pickle to read; refusing it: {how} as plain numeric arrays"
        ) from None
    except Exception as error:  # zip and format errors all mean an unusable file
        raise DataError(f"cannot read {path} as .npz ({error}); {how}") from None
    return train_test_from_arrays(arrays, str(path), "npz")


def train_test_from_arrays(arrays: dict[str, np.ndarray], where: str, name: str) -> TrainTest:
    """Train and test sets from the four arrays ``NPZ_KEYS`` names, checked as an npz file is:
    images (N, C, H, W), (N, H, W, C) or (N, H, W), uint8 or float in [0, 1]; labels the
    class indices 0..K-1. ``where`` prefixes every error (a file, a reader's import path)."""
    x_train = _npz_images(arrays["x_train"], f"{where}:x_train")
    x_test = _npz_images(arrays["x_test"], f"{where}:x_test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{where}: train images are {x_train.shape[1:]} but test images {x_test.shape[1:]}; "
            "store both at the same (C, H, W)"
        )
    y_train = _npz_labels(arrays["y_train"], len(x_train), f"{where}:y_train")
    y_test = _npz_labels(arrays["y_test"], len(x_test), f"{where}:y_test")
    train, test = _dataset(x_train, y_train), _dataset(x_test, y_test)
    num_classes = _npz_num_classes(y_train, y_test, where)
    classes = tuple(str(i) for i in range(num_classes))
    return TrainTest(
        train, test, _info(name, train, classes, default_crop_padding=0, default_flip=False)
    )


# --- a reader of your own, by import path -------------------------------------------------


def as_array(value: object, where: str) -> np.ndarray:
    """A NumPy view of a NumPy array, a torch tensor (any device) or a nested list."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, list | tuple):
        return np.asarray(value)
    raise DataError(f"{where} is a {type(value).__name__}; give a NumPy array or a torch tensor")


def read_plugin(path: str, data_dir: str | Path | None) -> TrainTest:
    """Call the reader ``package.module:function`` with ``data_dir`` (None when unset).

    Its contract: return ``(x_train, y_train, x_test, y_test)`` (or a mapping with those keys),
    NumPy arrays or torch tensors, images uint8 or float in [0, 1] as (N, C, H, W) (or
    (N, H, W, C), (N, H, W)), labels the class indices 0..K-1. They are checked like an npz
    file's, and such a run starts from the dataset profile an npz run gets.
    """
    from generalist.plugins import load_object

    reader = load_object(path, what="data.dataset")
    how = f"a reader returns ({', '.join(NPZ_KEYS)}) or a mapping with those keys"
    try:
        returned = reader(None if data_dir is None else str(data_dir))
    except DataError:
        raise
    except Exception as exc:  # the user's reader may fail any way; one line, with its reason
        raise DataError(
            f"data.dataset {path}: the reader raised {type(exc).__name__}: {str(exc)[:200]}"
        ) from None
    if isinstance(returned, dict):
        missing = [key for key in NPZ_KEYS if key not in returned]
        if missing:
            raise DataError(f"data.dataset {path} returned no {', '.join(missing)}; {how}")
        values = [returned[key] for key in NPZ_KEYS]
    elif isinstance(returned, tuple | list) and len(returned) == len(NPZ_KEYS):
        values = list(returned)
    else:
        raise DataError(f"data.dataset {path} returned a {type(returned).__name__}; {how}")
    arrays = {key: as_array(v, f"{path}:{key}") for key, v in zip(NPZ_KEYS, values, strict=True)}
    return train_test_from_arrays(arrays, path, path)


# --- image folders --------------------------------------------------------------------------


def _read_folder(
    name: str,
    data_dir: str | Path | None,
    options: FolderOptions,
    echo: Callable[[str], None],
    **stats,
) -> TrainTest:
    root = require_dir(data_dir, name, LAYOUT)
    classes, train, test = read_folder_splits(root, options, echo)
    if not stats:
        stats["mean"], stats["std"] = channel_stats(_stats_sample(train))
    info = DatasetInfo(
        name,
        len(classes),
        (3, options.image_size, options.image_size),
        tuple(classes),
        default_crop_padding=0,
        default_flip=True,
        **stats,
    )
    return TrainTest(train, test, info)


def _stats_sample(train: ImageDataset | FileImages) -> torch.Tensor:
    """The images to take channel statistics from: all in memory, else a seeded 1,000 of them
    (enough for three means and deviations)."""
    if isinstance(train, ImageDataset):
        return train.images
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    return train.images[order[:1000].sort().values]


DEFAULT_FOLDER = FolderOptions()


def read_imagefolder(
    data_dir: str | Path | None,
    options: FolderOptions = DEFAULT_FOLDER,
    echo: Callable[[str], None] = print,
) -> TrainTest:
    """``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*`` (val is the test split);
    normalisation statistics are measured on the training images."""
    return _read_folder("imagefolder", data_dir, options, echo)


def read_imagenet(
    data_dir: str | Path | None,
    options: FolderOptions = DEFAULT_FOLDER,
    echo: Callable[[str], None] = print,
) -> TrainTest:
    """ILSVRC-2012 laid out as an image folder (``generalist data fetch imagenet`` says how),
    with its published channel statistics."""
    return _read_folder("imagenet", data_dir, options, echo, mean=IMAGENET_MEAN, std=IMAGENET_STD)


FOLDER_READERS = ("imagefolder", "imagenet")
"""Readers that take :class:`FolderOptions` and report their storage choice."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


READERS: dict[str, Callable[..., TrainTest]] = {
    "digits": read_digits,
    "mnist": read_mnist,
    "cifar10": read_cifar10,
    "cifar100": read_cifar100,
    "npz": read_npz,
    "imagefolder": read_imagefolder,
    "imagenet": read_imagenet,
}
