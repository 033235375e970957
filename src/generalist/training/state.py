"""The complete training state as a flat table of tensors plus JSON, and back: exact resume.

"Complete" means everything the next step reads:

- per learner: weights and buffers, optimizer state, the attack generator, and the task's own
  state when the task has ``state_dict()``/``load_state_dict()`` (CURE's revision model);
- the merge: the EMA teachers and the global learner;
- the position: epoch, batches of it done, global step (the merge's t), the epoch's losses so
  far, the finished epochs' metric records and the latest validation;
- the model selected on validation so far (:class:`BestModel`), weights included, so a resumed
  run compares against, and ends with, exactly the best model the uninterrupted run would;
- randomness: the augmentation generator and the global RNGs (torch CPU, the run's own GPU
  on a CUDA run, numpy, python), which nothing in the loop draws from today but a model or task may.

The data order needs nothing: :class:`~generalist.data.EpochBatches` derives it from
(seed, epoch), so the batch index is the position. Schedules are functions of the position.
Tensors go to safetensors under ``learners/<i>/…``, ``global/…``, ``rng/…``; everything else is
plain JSON. Nothing is pickled, so a checkpoint someone sends cannot run code.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from generalist.errors import CheckpointError
from generalist.training.generalist import GeneralistMerge
from generalist.training.learner import Learner


@runtime_checkable
class StatefulTask(Protocol):
    """A task that keeps state between steps implements these two and is checkpointed."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


@dataclass
class BestModel:
    """The global model that scored highest on validation so far (``eval.select``)."""

    epoch: int
    score: float
    val: dict[str, float]
    """Its validation accuracies (%), as in metrics.jsonl."""
    weights: dict[str, torch.Tensor]
    """A copy of the global model's state dict at that epoch."""

    @classmethod
    def of(cls, model: nn.Module, epoch: int, score: float, val: dict[str, float]) -> BestModel:
        weights = {key: tensor.detach().clone() for key, tensor in model.state_dict().items()}
        return cls(epoch, score, dict(val), weights)

    def describe(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "score": self.score, "val": self.val}


@dataclass
class TrainingState:
    learners: list[Learner]
    merge: GeneralistMerge
    augment_generator: torch.Generator
    epoch_losses: torch.Tensor
    """(batches per epoch, learners) losses of the epoch in progress, on the device; a batch
    a learner skipped holds its non-finite loss."""
    epoch: int = 1
    """The epoch in progress (1-based); ``epochs + 1`` once training is done."""
    batch: int = 0
    """Batches of ``epoch`` already trained."""
    step: int = 0
    """Optimizer steps over the whole run: the merge's t."""
    metrics: list[dict[str, Any]] = field(default_factory=list)
    """One record per finished epoch, exactly as written to metrics.jsonl."""
    val: dict[str, dict[str, float]] = field(default_factory=dict)
    best: BestModel | None = None

    def offer_best(self, epoch: int, score: float | None, val: dict[str, float]) -> bool:
        """Keep the global model as the best if ``score`` beats the best so far (ties keep the
        earlier one); True if it was kept."""
        if score is None or (self.best is not None and score <= self.best.score):
            return False
        self.best = BestModel.of(self.merge.global_model, epoch, score, val)
        return True

    def record_step(self, losses: torch.Tensor) -> None:
        self.epoch_losses[self.batch] = losses
        self.batch += 1
        self.step += 1

    def finish_epoch(self, record: dict[str, Any]) -> None:
        self.metrics.append(record)
        self.epoch += 1
        self.batch = 0
        self.epoch_losses.zero_()


def capture(state: TrainingState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)``: the state as a safetensors-ready table and JSON-ready scalars."""
    tensors: dict[str, torch.Tensor] = {}
    learners = []
    for i in range(len(state.learners)):
        learner_tensors, entry = capture_learner(state, i)
        tensors.update(learner_tensors)
        learners.append(entry)
    tensors.update(_prefixed("global", state.merge.global_model.state_dict()))
    if state.best is not None:
        tensors.update(_prefixed("best", state.best.weights))
    tensors["augment/generator"] = state.augment_generator.get_state()
    tensors["epoch/losses"] = state.epoch_losses
    tensors["rng/torch"] = torch.get_rng_state()
    device = state.augment_generator.device
    if device.type == "cuda":  # never asked in a CPU run: it would initialise CUDA (no forks after)
        tensors["rng/cuda"] = torch.cuda.get_rng_state(device)
    numpy_state = np.random.get_state()
    meta = {
        "position": {"epoch": state.epoch, "batch": state.batch, "step": state.step},
        "learners": learners,
        "generator_device": state.augment_generator.device.type,
        "metrics": state.metrics,
        "val": state.val,
        "best": None if state.best is None else state.best.describe(),
        "rng": {
            "python": random.getstate(),
            "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        },
    }
    return tensors, meta


def restore(
    state: TrainingState,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    only: Collection[int] | None = None,
) -> None:
    """Load a captured state into the live objects in place (the merge keeps views of them).

    A checkpoint that does not fit (other learners, another architecture, another device
    type) raises :class:`CheckpointError`; nothing here can make a partial load look fine.
    ``only`` restores just those learners (a distributed rank's own, whose tensors are all
    ``tensors`` holds of the learners).
    """
    names = [learner.name for learner in state.learners]
    saved = [entry["name"] for entry in meta["learners"]]
    if saved != names:
        raise CheckpointError(f"the checkpoint has learners {saved}, this run has {names}")
    device = state.augment_generator.device.type
    if meta["generator_device"] != device:
        raise CheckpointError(
            f"the checkpoint was written on {meta['generator_device']} and this run is on "
            f"{device}; resume with --device {meta['generator_device']} to continue exactly"
        )
    remaining = dict(tensors)
    for i, entry in enumerate(meta["learners"]):
        if only is None or i in only:
            restore_learner(state, i, remaining, entry)
    _load_module(state.merge.global_model, _take(remaining, "global"), "global model")
    best = meta.get("best")  # absent in checkpoints written before model selection
    best_weights = _take(remaining, "best")
    state.best = (
        None
        if best is None
        else BestModel(best["epoch"], best["score"], best["val"], _like(best_weights, state))
    )
    state.augment_generator.set_state(_pop(remaining, "augment/generator"))
    losses = _pop(remaining, "epoch/losses")
    if losses.shape != state.epoch_losses.shape:
        raise CheckpointError(
            f"the checkpoint has {losses.shape[0]} batches per epoch, this run "
            f"{state.epoch_losses.shape[0]}; resume with the batch size and data it was run with"
        )
    state.epoch_losses.copy_(losses)
    torch.set_rng_state(_pop(remaining, "rng/torch"))
    _restore_cuda_rng(state.augment_generator.device, remaining)
    if remaining:
        raise CheckpointError(
            f"the checkpoint holds state this run has no place for: {sorted(remaining)[:3]}"
        )
    python_state = meta["rng"]["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    name, keys, *rest = meta["rng"]["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    position = meta["position"]
    state.epoch, state.batch, state.step = position["epoch"], position["batch"], position["step"]
    state.metrics = list(meta["metrics"])
    state.val = meta["val"]


def _restore_cuda_rng(device: torch.device, tensors: dict[str, torch.Tensor]) -> None:
    """Restore the run's own GPU's global RNG, removing the entries from ``tensors``.

    Older checkpoints kept one state per visible GPU (``rng/cuda/<index>``), CPU runs too;
    those entries are read for the run's GPU and otherwise dropped, so such checkpoints still
    resume.
    """
    saved = tensors.pop("rng/cuda", None)
    per_gpu = _take(tensors, "rng/cuda")
    if device.type != "cuda":
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    saved = per_gpu.get(str(index)) if saved is None else saved
    if saved is not None:
        torch.cuda.set_rng_state(saved, device)


def capture_learner(
    state: TrainingState, index: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One learner's part of :func:`capture`: what a distributed rank sends to rank 0."""
    learner, teacher = state.learners[index], state.merge.teachers[index]
    prefix = f"learners/{index}"
    tensors = {
        **_prefixed(f"{prefix}/model", learner.model.state_dict()),
        **_prefixed(f"{prefix}/teacher", teacher.state_dict()),
    }
    optimizer_tensors, optimizer_meta = _split_optimizer_state(learner.optimizer)
    tensors.update(_prefixed(f"{prefix}/optimizer", optimizer_tensors))
    tensors[f"{prefix}/generator"] = learner.generator.get_state()
    if isinstance(learner.task, StatefulTask):
        tensors.update(_prefixed(f"{prefix}/task", learner.task.state_dict()))
    return tensors, {"name": learner.name, "task": learner.task.name, "optimizer": optimizer_meta}


def restore_learner(
    state: TrainingState, index: int, tensors: dict[str, torch.Tensor], entry: dict[str, Any]
) -> None:
    """Load learner ``index`` from :func:`capture_learner`'s output, removing what it used."""
    learner, teacher = state.learners[index], state.merge.teachers[index]
    prefix = f"learners/{index}"
    _load_module(learner.model, _take(tensors, f"{prefix}/model"), f"{learner.name} model")
    _load_module(teacher, _take(tensors, f"{prefix}/teacher"), f"{learner.name} teacher")
    _load_optimizer(learner.optimizer, _take(tensors, f"{prefix}/optimizer"), entry["optimizer"])
    learner.generator.set_state(_pop(tensors, f"{prefix}/generator"))
    if isinstance(learner.task, StatefulTask):
        learner.task.load_state_dict(_take(tensors, f"{prefix}/task"))


def _like(tensors: dict[str, torch.Tensor], state: TrainingState) -> dict[str, torch.Tensor]:
    """``tensors`` on the global model's device, where the live best copy is kept."""
    live = state.merge.global_model.state_dict()
    if set(tensors) != set(live):
        raise CheckpointError("the checkpoint's best model does not fit this run's global model")
    return {key: tensor.to(live[key].device) for key, tensor in tensors.items()}


def _prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{key}": value for key, value in tensors.items()}


def _take(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove and return the entries under ``prefix/``, with the prefix stripped."""
    keys = [key for key in tensors if key.startswith(prefix + "/")]
    return {key[len(prefix) + 1 :]: tensors.pop(key) for key in keys}


def _pop(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    try:
        return tensors.pop(key)
    except KeyError:
        raise CheckpointError(
            f"the checkpoint lacks {key!r}; it was not written by this run"
        ) from None


def _load_module(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise CheckpointError(f"the checkpoint does not fit this run's {what}: {first}") from None


def _split_optimizer_state(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as ``<param index>/<key>`` tensors plus JSON hyper-parameters."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        scalars[str(index)] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}/{key}"] = value
            else:
                scalars[str(index)][key] = value
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}
        for group in state_dict["param_groups"]
    ]
    return tensors, {"param_groups": groups, "state": scalars}


def _load_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["state"].items()}
    for name, value in tensors.items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    current = optimizer.state_dict()["param_groups"]
    if len(current) != len(meta["param_groups"]):
        raise CheckpointError("the checkpoint's optimizer has other parameter groups than this run")
    groups = [  # JSON turned tuples (Adam's betas) into lists; give them back their type
        {k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in saved.items()}
        for saved, now in zip(meta["param_groups"], current, strict=True)
    ]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"the checkpoint's optimizer state does not fit: {exc}") from None
