"""``load_splits``: a dataset's train/val/test splits, identical for every run with the same seed.

The validation split is carved from the training data *before* ``train_limit`` applies, so quick
runs with a small training budget are still validated on the same examples as full runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from generalist.data.dataset import DataSplits, ImageDataset
from generalist.data.folders import LAYOUT, FileImages, FolderOptions, list_split
from generalist.data.readers import FOLDER_READERS, READERS, read_plugin, require_dir
from generalist.errors import DataError
from generalist.plugins import is_import_path, source_record


def list_datasets() -> list[str]:
    """The built-in readers; ``package.module:function`` names a reader of your own."""
    return list(READERS)


def is_known_dataset(name: str) -> bool:
    """A built-in reader, or an import path naming something (a broken one raises its error)."""
    if is_import_path(name):
        dataset_source(name)
        return True
    return name in READERS


def dataset_source(name: str) -> dict[str, Any] | None:
    """What a run records about a reader of the user's own (import path, file SHA-256)."""
    return source_record(name, what="data.dataset") if is_import_path(name) else None


def load_splits(
    name: str,
    data_dir: str | Path | None = None,
    *,
    val_size: int | float = 0.1,
    split_seed: int = 0,
    train_limit: int | None = None,
    test_limit: int | None = None,
    folder: FolderOptions | None = None,
    echo: Callable[[str], None] = print,
) -> DataSplits:
    """Read ``name`` and split its training data into train/val with a ``split_seed`` permutation.

    ``val_size`` is a fraction in [0, 1) or a whole count (>= 1) of training examples. The limits
    keep a seeded random subset (in the dataset's order) of train and test, for quick runs.
    Image folders are read with ``folder`` options and say through ``echo`` how they are held.
    """
    if is_import_path(name):
        train_all, test, info = read_plugin(name, data_dir)
    elif name not in READERS:
        raise DataError(
            f"unknown dataset {name!r}; choose one of {', '.join(READERS)} or name a reader of "
            "your own as 'package.module:function'"
        )
    elif name in FOLDER_READERS:
        train_all, test, info = READERS[name](data_dir, folder or FolderOptions(), echo)
    else:
        train_all, test, info = READERS[name](data_dir)
    for split, data in (("train", train_all), ("test", test)):
        _check_labels(data, info.num_classes, f"{name} {split}")
    order = _permutation(len(train_all), split_seed)
    n_val = _val_count(val_size, len(train_all))
    val = train_all.subset(order[:n_val].sort().values)
    train = train_all.subset(_limited(order[n_val:], train_limit, "train_limit"))
    test = test.subset(_limited(_permutation(len(test), split_seed), test_limit, "test_limit"))
    val, test = (_checked(part, echo) for part in (val, test))
    if len(train) == 0:
        raise DataError(
            f"{name} leaves no training examples after a validation split of {n_val}; "
            "lower data.val_size"
        )
    return DataSplits(train, val, test, info)


def training_split_size(
    name: str,
    data_dir: str | Path | None = None,
    *,
    val_size: int | float = 0.1,
    train_limit: int | None = None,
    folder: FolderOptions | None = None,
) -> int:
    """How many examples :func:`load_splits` with the same arguments puts in the training split,
    for a plan made before training (``train --dry-run``): an image folder is listed, not
    decoded, so its unreadable files still count; other datasets are read as training reads
    them."""
    if name not in READERS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(READERS)}")
    if name in FOLDER_READERS:
        root = require_dir(data_dir, name, LAYOUT)
        total = len(list_split(root / "train", (folder or FolderOptions()).bad_files).files)
    else:
        total = len(READERS[name](data_dir).train)
    left = total - _val_count(val_size, total)
    return left if train_limit is None else min(train_limit, left)


def _checked(part: ImageDataset | FileImages, echo: Callable[[str], None]):
    return part.checked(echo) if isinstance(part, FileImages) else part


def unused_training_examples(
    name: str,
    data_dir: str | Path | None = None,
    *,
    val_size: int | float,
    split_seed: int,
    train_limit: int,
) -> ImageDataset:
    """The training examples that :func:`load_splits` with the same arguments puts in neither
    split: the ones ``train_limit`` leaves out (RST's "unlabeled rest" in experiments).

    Their labels are kept so that an experiment can score pseudo-labels; training never
    reads them.
    """
    if name in FOLDER_READERS:
        raise DataError(
            f"data.unlabeled: rest needs an in-memory dataset, not the {name} folder; put the "
            "unlabeled images in a folder of their own and pass that"
        )
    reader = (lambda d: read_plugin(name, d)) if is_import_path(name) else READERS[name]
    train_all = reader(data_dir).train
    order = _permutation(len(train_all), split_seed)  # the order load_splits draws from
    return train_all.subset(
        order[_val_count(val_size, len(train_all)) + train_limit :].sort().values
    )


def _permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _limited(order: torch.Tensor, limit: int | None, what: str) -> torch.Tensor:
    if limit is None:
        return order.sort().values
    if limit < 1:
        raise DataError(f"data.{what} is {limit}; use a positive example count or leave it unset")
    return order[:limit].sort().values


def _val_count(val_size: int | float, n: int) -> int:
    if 0 <= val_size < 1:
        return round(val_size * n)
    if val_size >= 1 and float(val_size).is_integer():
        if val_size >= n:
            raise DataError(
                f"data.val_size {int(val_size)} is not smaller than the {n} training examples; "
                "lower it"
            )
        return int(val_size)
    raise DataError(
        f"data.val_size {val_size} is invalid; use a fraction in [0, 1) or a whole example count"
    )


def _check_labels(data: ImageDataset, num_classes: int, where: str) -> None:
    bad = ((data.labels < 0) | (data.labels >= num_classes)).nonzero()
    if len(bad):
        index = int(bad[0])
        raise DataError(
            f"{where} label at index {index} is {int(data.labels[index])}, outside "
            f"[0, {num_classes}); fix the labels file"
        )
