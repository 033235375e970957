"""The complete training state, described once as its objects' state dicts: exact resume.

"Complete" means everything the next step reads:

- per learner (:meth:`Learner.state_dict`): weights and buffers, its optimizer's own state
  dict, the attack generator and the task's own state when the task keeps one (CURE's
  revision model); beside it, its EMA teacher from the merge;
- the merge's global learner;
- the position: epoch, batches of it done, global step (the merge's t; the lr, γ and task
  schedules are functions of it), the epoch's losses so far, the finished epochs' metric
  records and the latest validation;
- the model selected on validation so far (:class:`BestModel`), weights included, so a resumed
  run compares against, and ends with, exactly the best model the uninterrupted run would;
- randomness: the augmentation generator and the global RNGs (:class:`GlobalRandomness`).

The data order needs nothing: :class:`~generalist.data.EpochBatches` derives it from
(seed, epoch), so the batch index is the position. RST's pseudo-labels are no state either:
they are written once before training and checked by hash on resume. A checkpoint is
:meth:`TrainingState.state_dict` flattened (:mod:`generalist.training.stateful`: tensors to
safetensors under their path, ``learners/<i>/…``, ``global/…``, ``rng/…``, the rest JSON), and
whether a checkpoint fits is whether :func:`restore` takes it.
"""

from __future__ import annotations

import numbers
import random
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from generalist.errors import CheckpointError, cut
from generalist.training.generalist import GeneralistMerge
from generalist.training.learner import Learner
from generalist.training.stateful import (
    check_entries,
    check_same_layout,
    flatten,
    load_generator,
    load_module,
    unflatten,
)

LAYOUT = 2
"""The version of :meth:`TrainingState.state_dict`'s tree, kept in a checkpoint's JSON
(``layout``). Checkpoints without it were written before the state was its objects' state
dicts; :func:`_from_layout_1` reads them."""
_MALFORMED = (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError)
"""What reading a hand-edited JSON value as the state it should be raises."""


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

    def state_dict(self) -> dict[str, Any]:
        return {**self.describe(), "weights": self.weights}

    @classmethod
    def from_state(cls, state: Any, like: nn.Module) -> BestModel:
        """The best model a checkpoint holds, its weights on ``like``'s device (the global
        model's, where the live copy is kept)."""
        check_entries(state, {"epoch", "score", "val", "weights"}, "the best model")
        epoch, score, val = state["epoch"], state["score"], state["val"]
        if not (_is_int(epoch) and isinstance(score, numbers.Real) and isinstance(val, dict)):
            raise CheckpointError("has a malformed best-model record")
        live = like.state_dict()
        check_same_layout(live, state["weights"], "has a best model that does not fit this run")
        weights = {key: tensor.to(live[key].device) for key, tensor in state["weights"].items()}
        return cls(epoch, score, val, weights)


@dataclass
class GlobalRandomness:
    """The process-wide generators a model or task may draw from (nothing in the loop does
    today): torch's CPU one, the run's own GPU's on a CUDA run, NumPy's and Python's."""

    device: torch.device

    def state_dict(self) -> dict[str, Any]:
        numpy_state = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        }
        if self.device.type == "cuda":  # never asked on a CPU run: it would initialise CUDA
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_entries(state, {"torch", "python", "numpy"}, "the RNGs", frozenset({"cuda"}))
        self._load_cuda(state.get("cuda"))
        try:
            torch.set_rng_state(state["torch"])
        except (*_MALFORMED, RuntimeError):
            raise CheckpointError("has a malformed torch RNG state") from None
        try:
            version, words, gauss = state["python"]
            random.setstate((version, tuple(words), gauss))
        except _MALFORMED:
            raise CheckpointError("has a malformed Python RNG state") from None
        try:
            name, keys, *rest = state["numpy"]
            np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
        except _MALFORMED:
            raise CheckpointError("has a malformed NumPy RNG state") from None

    def _load_cuda(self, saved: Any) -> None:
        """The run's own GPU's state. Older checkpoints kept one per visible GPU
        (``rng/cuda/<index>``), CPU runs too: the run's GPU's is read, the others dropped."""
        per_gpu = saved if isinstance(saved, dict) else {} if saved is None else {"": saved}
        for index, value in per_gpu.items():
            if not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8):
                name = f"rng/cuda/{index}" if index else "rng/cuda"
                raise CheckpointError(f"holds a malformed CUDA RNG state {name[:60]}")
        if self.device.type != "cuda":
            return
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        own = per_gpu.get("" if isinstance(saved, torch.Tensor) else str(index))
        try:
            if own is not None:
                torch.cuda.set_rng_state(own, self.device)
        except RuntimeError:
            raise CheckpointError("has a malformed CUDA RNG state rng/cuda") from None


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

    @property
    def device(self) -> torch.device:
        return self.augment_generator.device

    def state_dict(self) -> dict[str, Any]:
        """The whole state as one tree of its objects' state dicts (live tensors, JSON values):
        the one description of what a checkpoint holds. A learner's entry carries its teacher,
        so that one learner's part travels alone between processes."""
        return {
            "layout": LAYOUT,
            "learners": [self.learner_state(i) for i in range(len(self.learners))],
            "global": self.merge.global_model.state_dict(),
            "best": None if self.best is None else self.best.state_dict(),
            "augment": {"generator": self.augment_generator.get_state()},
            "epoch": {"losses": self.epoch_losses},
            "rng": GlobalRandomness(self.device).state_dict(),
            "generator_device": self.device.type,
            "position": {"epoch": self.epoch, "batch": self.batch, "step": self.step},
            "metrics": self.metrics,
            "val": self.val,
        }

    def learner_state(self, index: int) -> dict[str, Any]:
        teacher = self.merge.teachers[index].state_dict()
        return {**self.learners[index].state_dict(), "teacher": teacher}

    def load_learner(self, index: int, state: Any) -> None:
        """Restore :meth:`learner_state`'s output for learner ``index`` in place."""
        learner = self.learners[index]
        if not isinstance(state, dict):
            raise CheckpointError(f"has no record of learner {learner.name}")
        learner.load_state_dict({k: v for k, v in state.items() if k != "teacher"})
        load_module(self.merge.teachers[index], state.get("teacher"), f"{learner.name} teacher")

    def load_state_dict(self, state: dict[str, Any], only: Collection[int] | None = None) -> None:
        """Restore :meth:`state_dict`'s output in place (the merge keeps views of the models);
        ``only`` restores just those learners (a distributed rank's own).

        :class:`CheckpointError` names the first thing that does not fit; a partial load is
        never left looking fine (:func:`~generalist.training.save_and_resume.resume_state`
        restores the fresh state when this raises).
        """
        parts = set(self.state_dict()) - {"layout", "best"}
        check_entries(state, parts, "the training state", frozenset({"best"}))
        names = [learner.name for learner in self.learners]
        saved = state["learners"] if isinstance(state["learners"], list) else []
        found = [entry.get("name") if isinstance(entry, dict) else None for entry in saved]
        if found != names:
            raise CheckpointError(f"has learners {cut(found)} where this run has {names}")
        if state["generator_device"] != self.device.type:
            raise CheckpointError(
                f"was written on {cut(state['generator_device'])} and this run is on "
                f"{self.device.type}; resume with --device {cut(state['generator_device'])} to "
                "continue exactly"
            )
        for index, entry in enumerate(saved):
            if only is None or index in only:
                self.load_learner(index, entry)
        load_module(self.merge.global_model, state["global"], "global model")
        best = state.get("best")  # absent in checkpoints written before model selection
        self.best = None if best is None else BestModel.from_state(best, self.merge.global_model)
        check_entries(state["augment"], {"generator"}, "the augmentation")
        load_generator(self.augment_generator, state["augment"]["generator"], "the augmentation")
        check_entries(state["epoch"], {"losses"}, "the epoch in progress")
        self._load_position(state["position"], state["epoch"]["losses"])
        GlobalRandomness(self.device).load_state_dict(state["rng"])
        metrics = state["metrics"]
        if not (
            isinstance(metrics, list)
            and len(metrics) == self.epoch - 1
            and all(isinstance(record, dict) for record in metrics)
        ):
            raise CheckpointError(
                f"does not hold one metrics record per finished epoch ({self.epoch - 1})"
            )
        if not isinstance(state["val"], dict):
            raise CheckpointError("has no validation record")
        self.metrics, self.val = list(metrics), state["val"]

    def _load_position(self, position: Any, losses: Any) -> None:
        """Epoch, batch and step, consistent with each other and with this run's epochs."""
        batches = self.epoch_losses.shape[0]
        check_entries(position, {"epoch", "batch", "step"}, "the position")
        epoch, batch, step = position["epoch"], position["batch"], position["step"]
        if not all(_is_int(value) for value in (epoch, batch, step)):
            raise CheckpointError("has a position that is not whole numbers")
        if not (epoch >= 1 and 0 <= batch <= batches):
            raise CheckpointError(
                f"has position epoch {epoch} batch {batch} outside the run's {batches} batches "
                "per epoch"
            )
        if step != (epoch - 1) * batches + batch:
            raise CheckpointError(
                f"has step {step}, which is not epoch {epoch} batch {batch} of {batches}-batch "
                "epochs"
            )
        check_same_layout(
            {"losses": self.epoch_losses}, {"losses": losses}, "does not fit this run's epochs"
        )
        self.epoch_losses.copy_(losses)
        self.epoch, self.batch, self.step = epoch, batch, step


def capture(state: TrainingState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)``: the state as a safetensors-ready table and JSON-ready values."""
    return flatten(state.state_dict())


def restore(
    state: TrainingState,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    only: Collection[int] | None = None,
) -> None:
    """Load a captured state (or a checkpoint's, whatever else its JSON holds) into ``state``
    in place. A checkpoint that does not fit raises :class:`CheckpointError` naming the first
    misfit; ``only`` restores just those learners (a distributed rank's own, whose tensors
    are all ``tensors`` holds of the learners)."""
    if "layout" not in meta:
        tensors, meta = _from_layout_1(tensors, meta)
    parts = set(state.state_dict()) - {"layout"}
    try:
        tree = unflatten(tensors, {k: v for k, v in meta.items() if k in parts})
        state.load_state_dict(tree, only)
    except CheckpointError:
        raise
    except _MALFORMED as exc:
        raise CheckpointError(f"is malformed ({type(exc).__name__}: {cut(exc)})") from None


def capture_learner(
    state: TrainingState, index: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One learner's part of :func:`capture`: what a distributed rank sends to rank 0."""
    return flatten(state.learner_state(index), f"learners/{index}")


def restore_learner(
    state: TrainingState, index: int, tensors: dict[str, torch.Tensor], entry: dict[str, Any]
) -> None:
    """Load learner ``index`` from :func:`capture_learner`'s output."""
    prefix = f"learners/{index}/"
    own = {key[len(prefix) :]: v for key, v in tensors.items() if key.startswith(prefix)}
    state.load_learner(index, unflatten(own, entry))


def _from_layout_1(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A checkpoint written before the state was its objects' state dicts, in today's layout:
    its optimizer buffers lacked torch's ``state/`` level (``optimizer/<index>/<key>``), the
    best model's weights their ``weights/`` level, and each learner's entry named its task
    where the task's own state now goes."""
    renamed = {}
    for key, tensor in tensors.items():
        parts = key.split("/")
        if parts[0] == "learners" and len(parts) > 3 and parts[2] == "optimizer":
            parts.insert(3, "state")
        elif parts[0] == "best":
            parts.insert(1, "weights")
        renamed["/".join(parts)] = tensor
    learners = meta.get("learners")
    if isinstance(learners, list):
        learners = [
            {k: v for k, v in entry.items() if k != "task"} if isinstance(entry, dict) else entry
            for entry in learners
        ]
    return renamed, {**meta, "learners": learners}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
