"""Datasets held in memory as uint8 tensors, deterministic splits and device-side augmentation."""

from __future__ import annotations

from generalist.data.augment import BatchAugment
from generalist.data.batches import EpochBatches
from generalist.data.dataset import DatasetInfo, DataSplits, ImageDataset, to_float
from generalist.data.safe_pickle import safe_load_pickle
from generalist.data.splits import dataset_source, is_known_dataset, list_datasets, load_splits

__all__ = [
    "BatchAugment",
    "DataSplits",
    "DatasetInfo",
    "EpochBatches",
    "ImageDataset",
    "dataset_source",
    "is_known_dataset",
    "list_datasets",
    "load_splits",
    "safe_load_pickle",
    "to_float",
]
