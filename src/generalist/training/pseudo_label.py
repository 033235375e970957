"""RST's first stage: pseudo-label the unlabeled images once per run, durably and resumably.

The labeler is, in order: ``pseudo_labels.model``, else ``model.init_from`` (``--init-from``),
else a ``standard`` model trained first on the labeled data, as a run of its own in
``RUN/pseudo-labeler/`` (same data, model, seed and checkpointing as the run): a kill while it
trains is resumed by resuming the run. Its predictions are written once, atomically, to
``RUN/pseudo_labels.safetensors`` together with a record of where they came from (the labeler's
path and SHA-256, its accuracy on the labeled validation split, the unlabeled images' source and
fingerprint), which also goes into the manifest. A resumed run reads that file back instead of
labeling again, and refuses unlabeled images that changed since.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from generalist.config.building import build_config
from generalist.config.schema import Config
from generalist.data import DataSplits, load_splits, to_float
from generalist.data.folders import FolderOptions
from generalist.data.splits import unused_training_examples
from generalist.data.unlabeled import UnlabeledImages, read_unlabeled
from generalist.devices import resolve_device
from generalist.durable import write_durably
from generalist.errors import CheckpointError, ConfigError, DataError
from generalist.evaluation.accuracy import accuracies
from generalist.inference import eval_mode
from generalist.rundir import RunDir
from generalist.torchrun import world_size
from generalist.training.recipe import unlabeled_per_batch
from generalist.training.signals import TrainingInterrupted, resume_hint
from generalist.weights import WEIGHTS_FILE, load_model, sha256_file

LABELS_FILE = "pseudo_labels.safetensors"
LABELER_DIR = "pseudo-labeler"
LABELER_PRESET = "standard"

TrainLabeler = Callable[[Config, RunDir, bool], None]
"""``(config, run directory, resume)``: trains the labeler run to its end (the loop's train)."""


@dataclass(frozen=True)
class PseudoLabeled:
    """What the run trains on besides its labeled split: the images and their pseudo-labels."""

    unlabeled: UnlabeledImages
    labels: torch.Tensor
    """int64 (N,), on the CPU."""
    record: dict[str, Any]
    """Where the labels came from; written into the manifest."""


def labeler_config(config: Config) -> Config:
    """The ``standard`` recipe on the run's labeled data, model, seed, device and saving."""
    labeler = build_config(LABELER_PRESET, dataset=config.data.dataset)
    labeler.name = LABELER_DIR
    for same in ("seed", "device", "precision", "deterministic", "threads"):
        setattr(labeler, same, getattr(config, same))
    labeler.epochs = config.pseudo_labels.epochs or config.epochs
    labeler.data = dataclasses.replace(config.data, unlabeled=None)
    labeler.model = dataclasses.replace(config.model, init_from=None)
    labeler.budgets = config.budgets
    labeler.eval = dataclasses.replace(config.eval, learners=False)
    labeler.checkpoint, labeler.logging = config.checkpoint, config.logging
    return labeler


def prepare_pseudo_labels(
    config: Config, run: RunDir | None, *, train_labeler: TrainLabeler, echo: Any
) -> tuple[RunDir, PseudoLabeled]:
    """The run (created here if None, once the unlabeled images passed their checks) and its
    pseudo-labeled images: read back from the run, or made now (see the module)."""
    if world_size() > 1:
        raise ConfigError(
            "data.unlabeled: RST's pseudo-labeling and unlabeled draws run in one process; "
            "start this run without torchrun or --nproc"
        )
    splits = load_splits(
        **_split_arguments(config),
        test_limit=config.data.test_limit,
        folder=FolderOptions.from_settings(config.data),
        echo=echo,
    )
    unlabeled = read_unlabeled(
        config.data.unlabeled,
        splits.info.image_shape,
        lambda: unused_training_examples(**_split_arguments(config)),
    )
    _check_pool_size(config, len(unlabeled))
    run = run or RunDir.create(config.out_dir, config.name)
    run.write_config(config)  # from here on, `--resume RUN` continues this run
    saved = run.path / LABELS_FILE
    if saved.is_file():
        labels, record = _read_labels(saved, unlabeled)
        echo(f"pseudo-labels: {len(labels)} read back from {saved}")
        return run, PseudoLabeled(unlabeled, labels, record)
    labels, record = _label(config, splits, unlabeled, _labeler(config, run, train_labeler, echo))
    metadata = {"record": json.dumps(record)}
    write_durably(saved, safetensors.torch.save({"labels": labels}, metadata=metadata))
    echo(
        f"pseudo-labels: {len(labels)} images labeled by {record['source']['model']} "
        f"(val accuracy {_percent(record['labeler_val_accuracy'])}); saved {saved}"
    )
    return run, PseudoLabeled(unlabeled, labels, record)


def _label(
    config: Config, splits: DataSplits, unlabeled: UnlabeledImages, source: Path
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The labeler's predictions on ``unlabeled`` and the record of where they came from."""
    weights = source / WEIGHTS_FILE if source.is_dir() else source
    model, spec = load_model(weights)
    _check_labeler(spec, splits, weights)
    device = resolve_device(config.device)
    model.to(device)
    batch = config.data.eval_batch_size
    labels = predict(model, unlabeled.images, batch, device)
    record = {
        "source": {"model": str(weights.resolve()), "sha256": sha256_file(weights)},
        "labeler_val_accuracy": accuracies(
            model, splits.val, [], steps=0, batch_size=batch, device=device
        ).get("clean"),
        "unlabeled": {
            "source": unlabeled.source,
            "examples": len(unlabeled),
            "fingerprint": unlabeled.fingerprint(),
        },
        "labels_sha256": _labels_digest(labels),
        "class_counts": torch.bincount(labels, minlength=splits.info.num_classes).tolist(),
    }
    if unlabeled.true_labels is not None:  # `rest`: the held-back labels score the labeler
        agree = (labels == unlabeled.true_labels).double().mean().item()
        record["agreement_with_true_labels"] = 100.0 * agree
    return labels, record


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    """The model's top class for each uint8 image, in eval mode, on the CPU."""
    with eval_mode(model):
        return torch.cat(
            [
                model(to_float(chunk.to(device))).argmax(1).cpu()
                for chunk in images.split(batch_size)
            ]
        )


def _split_arguments(config: Config) -> dict[str, Any]:
    """What decides the labeled split, so that "the rest" is exactly what it leaves out."""
    data = config.data
    return {
        "name": data.dataset,
        "data_dir": data.data_dir,
        "val_size": data.val_size,
        "split_seed": data.split_seed,
        "train_limit": data.train_limit,
    }


def _check_pool_size(config: Config, available: int) -> None:
    for name, wanted in unlabeled_per_batch(config).items():
        if wanted > available:
            raise DataError(
                f"data.unlabeled: {available} unlabeled images, but every batch of learner "
                f"{name} takes {wanted}; add unlabeled images or lower the unlabeled share in "
                f"learners.{name}.task.params"
            )


def _labeler(config: Config, run: RunDir, train_labeler: TrainLabeler, echo: Any) -> Path:
    """The labeler's weights: given, or trained in ``RUN/pseudo-labeler`` (resumed if begun)."""
    given = config.pseudo_labels.model or config.model.init_from
    if given is not None:
        return Path(given)
    labeler_run = RunDir(run.path / LABELER_DIR)
    if labeler_run.summary_path.is_file():
        return labeler_run.path
    begun = labeler_run.config_path.is_file()
    labeler_run.path.mkdir(exist_ok=True)
    echo(f"pseudo-labels: {'resuming' if begun else 'training'} the labeler in {labeler_run.path}")
    try:
        train_labeler(labeler_config(config), labeler_run, begun)
    except TrainingInterrupted as stop:  # the user resumes the run, not its labeler
        raise TrainingInterrupted(
            f"stopped by {signal.Signals(stop.signum).name} while training the pseudo-labeler; "
            f"saved {stop.checkpoint}; {resume_hint(run.path)}",
            signum=stop.signum,
            run=run.path,
            checkpoint=stop.checkpoint,
        ) from None
    return labeler_run.path


def _check_labeler(spec: dict[str, Any], splits: DataSplits, weights: Path) -> None:
    info = splits.info
    saved = spec.get("model", {})
    wanted = {
        "num_classes": info.num_classes,
        "in_channels": info.image_shape[0],
        "image_size": info.image_shape[1],
    }
    differing = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
    if differing:
        what = ", ".join(f"{k} {old!r} vs {new!r}" for k, (old, new) in differing.items())
        raise ConfigError(
            f"pseudo_labels.model: {weights} does not fit this run's data ({what}); "
            "give a labeler trained on the same dataset"
        )


def _read_labels(path: Path, unlabeled: UnlabeledImages) -> tuple[torch.Tensor, dict[str, Any]]:
    try:
        with safetensors.safe_open(str(path), "pt") as handle:
            record = json.loads(handle.metadata()["record"])
            labels = handle.get_tensor("labels")
    except Exception as error:  # a torn or foreign file: nothing in it can be trusted
        raise CheckpointError(
            f"{path} is unreadable ({type(error).__name__}); delete it to pseudo-label again"
        ) from None
    if _labels_digest(labels) != record.get("labels_sha256"):
        raise CheckpointError(
            f"{path} was changed after it was written; delete it to pseudo-label again"
        )
    if record["unlabeled"]["fingerprint"] != unlabeled.fingerprint():
        raise DataError(
            f"data.unlabeled: the images at {unlabeled.source} changed since this run "
            "pseudo-labeled them (SHA-256 differs); restore them, or start a new run"
        )
    return labels, record


def _labels_digest(labels: torch.Tensor) -> str:
    return hashlib.sha256(labels.contiguous().numpy().tobytes()).hexdigest()


def _percent(value: float | None) -> str:
    return "n/a (no validation split)" if value is None else f"{value:.2f}%"
