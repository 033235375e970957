"""The Python API: train a preset on your own data and model, in one call.

:func:`train` is what ``generalist train`` does, with Python objects where the command line
takes names: ``data`` may be arrays, tensors or torch Datasets, ``model`` an ``nn.Module``
instance, a class or a factory. Everything stays reproducible from the command line: arrays are
written into the run directory as ``data.npz`` (and the run's config points at it), and a model
is recorded by its import path and source file's SHA-256, so ``generalist eval RUN``,
``report`` and ``train --resume RUN`` work on a run started from Python.

:func:`~generalist.evaluation.api.evaluate` (re-exported here) is the evaluation counterpart.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from generalist.config import Config, build_config
from generalist.data.readers import NPZ_KEYS, as_array, train_test_from_arrays
from generalist.durable import write_durably
from generalist.errors import ConfigError, DataError, cut
from generalist.evaluation.api import EvalTable, evaluate
from generalist.plugins import load_object
from generalist.rundir import RunDir
from generalist.training.loop import TrainResult
from generalist.training.loop import train as train_config

ArrayLike = np.ndarray | torch.Tensor
Data = str | tuple[ArrayLike, ArrayLike, ArrayLike, ArrayLike] | tuple[Dataset, Dataset]
"""A dataset name or reader path, the four arrays, or (train, test) torch Datasets."""
ModelLike = str | nn.Module | Callable[..., nn.Module]
"""A model name or import path, an instance, a class or a factory."""
DATA_FILE = "data.npz"

__all__ = ["EvalTable", "TrainResult", "evaluate", "train"]


def train(
    preset: str | None = None,
    *,
    data: Data | None = None,
    model: ModelLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    config: str | Path | None = None,
    data_dir: str | Path | None = None,
    name: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``preset`` (``"generalist-d"``, ``"pgd-at"``, ... see ``generalist presets``).

    ``data``: a dataset name (``"digits"``, ``"cifar10"``, a reader ``"pkg.mod:read"``), the
    arrays ``(x_train, y_train, x_test, y_test)`` (images (N, C, H, W), uint8 or float in
    [0, 1]; labels the class indices 0..K-1), or ``(train_dataset, test_dataset)`` torch
    Datasets yielding ``(image, label)``. Default: the preset's dataset.

    ``model``: a registered name or ``"pkg.mod:Callable"``, or an ``nn.Module`` instance
    (every learner starts from a copy of its weights), a class or a factory function; the
    last three must be importable (defined at module level) so the run can rebuild them.
    It is given the keyword arguments it accepts of ``num_classes``, ``in_channels`` and
    ``image_size``; more go in ``overrides={"model.kwargs": {...}}``.

    ``overrides``: dotted config keys and Python values (``{"epochs": 30}``), applied last;
    ``config``: a YAML file layered over the preset; ``out``: the parent folder of the run
    directory (default ``runs``). Returns the run directory, test and validation accuracies
    and the final global ``model``.
    """
    values = dict(overrides or {})
    arrays = None
    if data is not None and not isinstance(data, str):
        arrays = _arrays(data)
    initial = None
    if model is not None:
        values["model.name"], initial = _model_name(model)
    for key, value in (("out_dir", out), ("name", name), ("data.data_dir", data_dir)):
        if value is not None:
            values[key] = str(value)
    if preset is None and config is None:
        raise ConfigError("preset: name one (see `generalist presets`) or give a config file")
    resolved = build_config(
        preset,
        dataset=data if isinstance(data, str) else ("npz" if arrays else None),
        user_yaml=config,
        values=values,
    )
    run = None
    if arrays is not None:
        run = _run_with_data(resolved, arrays)
    return train_config(resolved, run, progress=progress, echo=echo, initial_model=initial)


def _arrays(data: Any) -> dict[str, np.ndarray]:
    """The four npz arrays of ``data``, checked now, with ``data`` named in every error."""
    if not isinstance(data, tuple | list):
        raise DataError(
            f"data is a {type(data).__name__}; give a dataset name, (x_train, y_train, "
            "x_test, y_test) or (train_dataset, test_dataset)"
        )
    if len(data) == 2 and all(isinstance(part, Dataset) for part in data):
        (x_train, y_train), (x_test, y_test) = (
            _stack(part, f"data[{i}]") for i, part in enumerate(data)
        )
        values = [x_train, y_train, x_test, y_test]
    elif len(data) == len(NPZ_KEYS):
        values = [as_array(part, f"data[{i}]") for i, part in enumerate(data)]
    else:
        raise DataError(
            f"data has {len(data)} parts; give (x_train, y_train, x_test, y_test) or "
            "(train_dataset, test_dataset)"
        )
    arrays = dict(zip(NPZ_KEYS, values, strict=True))
    checked = train_test_from_arrays(arrays, "data", "npz")  # errors before any run exists
    return {
        "x_train": checked.train.images.numpy(),
        "y_train": checked.train.labels.numpy(),
        "x_test": checked.test.images.numpy(),
        "y_test": checked.test.labels.numpy(),
    }


def _stack(dataset: Dataset, where: str) -> tuple[np.ndarray, np.ndarray]:
    """All ``(image, label)`` pairs of a map-style Dataset as two arrays."""
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise DataError(f"{where} has no length; give a map-style Dataset") from None
    if n == 0:
        raise DataError(f"{where} is empty; give at least one example")
    images, labels = [], []
    for index in range(n):
        item = dataset[index]
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise DataError(f"{where}[{index}] is not an (image, label) pair")
        images.append(as_array(item[0], f"{where}[{index}] image"))
        labels.append(int(item[1]))
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise DataError(f"{where} holds images of shapes {cut(sorted(shapes))}; give one size")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _run_with_data(config: Config, arrays: dict[str, np.ndarray]) -> RunDir:
    """A fresh run directory holding ``data.npz``, which the config now reads: the run
    rebuilds from its own folder (eval, report, resume), as one from a named dataset does."""
    import io

    run = RunDir.create(config.out_dir, config.name)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path = (run.path / DATA_FILE).resolve()
    write_durably(path, buffer.getvalue())
    config.data.data_dir = str(path)
    return run


def _model_name(model: ModelLike) -> tuple[str, nn.Module | None]:
    """``model.name`` for ``model`` and, for an instance, the instance to start from."""
    if isinstance(model, str):
        return model, None
    instance = model if isinstance(model, nn.Module) else None
    target = type(model) if instance is not None else model
    if not callable(target):
        raise ConfigError(
            f"model is a {type(model).__name__}; give a name, an nn.Module, a class or a factory"
        )
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", "")
    if not module or "<" in qualname:
        raise ConfigError(
            f"model: {qualname or target!r} is defined inside a function (or is a lambda); define "
            "it at module level so the run can record and rebuild it"
        )
    path = f"{module}:{qualname}"
    if load_object(path, what="model") is not target:
        raise ConfigError(f"model: {path} does not import as the object given; define it once")
    if module == "__main__":
        warnings.warn(
            f"model {qualname} is defined in the script being run, so `generalist eval`, "
            "`report` and `train --resume` cannot import it later; put it in a module file",
            RuntimeWarning,
            stacklevel=3,
        )
    return path, instance
