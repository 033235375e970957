"""A run's processes as the training code sees them: how many, what they cannot split, and
which parts of the training state travel between them.

The :class:`~generalist.training.placement.Placement` only communicates; this module decides
with it: the number of data-parallel replicas per learner a process count gives, what a run
with replicas refuses (a task that needs the whole batch, skipping non-finite batches), which
placement this process takes, and what of the state a resume sends out from rank 0 or a
checkpoint gathers there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from generalist.config import Config
from generalist.data import EpochBatches
from generalist.errors import ConfigError
from generalist.torchrun import process_group, said_by_rank_zero, world_size
from generalist.training.distributed import LearnerParallel
from generalist.training.placement import Placement, SingleProcess
from generalist.training.signals import TrainingInterrupted
from generalist.training.state import (
    TrainingState,
    capture,
    capture_learner,
    restore,
    restore_learner,
)
from generalist.training.tasks import task_spec


def replicas_per_learner(processes: int, config: Config, launcher: str) -> int:
    """How many data-parallel replicas each learner gets; a one-line error if N does not fit."""
    learners = len(config.learners)
    if processes < 1 or processes % learners:
        names = ", ".join(config.learners)
        raise ConfigError(
            f"{launcher} {processes} processes, but {config.preset or config.name} trains "
            f"{learners} learners ({names}): use {learners} processes (one per learner) or a "
            f"multiple of {learners} ({2 * learners}, {3 * learners}, ...: data-parallel "
            "inside each learner)"
        )
    return processes // learners


def check_replicas(config: Config, replicas: int, batches: EpochBatches) -> None:
    """Refuse, before any training, what ``replicas`` data-parallel replicas per learner cannot
    run: skipping non-finite batches, a task that needs the whole batch, a last batch too small
    to split."""
    if replicas == 1:
        return
    where = f"with {replicas} data-parallel replicas per learner"
    if config.checkpoint.on_nonfinite == "skip":
        raise ConfigError(
            f"checkpoint.on_nonfinite: skip is not supported {where}; use one process "
            "per learner, or on_nonfinite: stop"
        )
    for name, learner in config.learners.items():
        kind = learner.task.type
        reason = task_spec(kind, f"learners.{name}.task").capabilities.whole_batch
        if reason is not None:
            raise ConfigError(
                f"learners.{name} is a {kind} learner, {reason}, so it cannot train "
                f"{where}; use one process per learner"
            )
    smallest = batches.num_examples % batches.batch_size or batches.batch_size
    if smallest < replicas:
        raise ConfigError(
            f"a batch of {smallest} examples cannot be split {where}; raise "
            "data.batch_size or use fewer processes"
        )


@contextmanager
def placement(config: Config, device: torch.device) -> Iterator[Placement]:
    """This process's placement: :class:`SingleProcess`, or under torchrun a
    :class:`LearnerParallel` on a fresh process group (or on the one the caller initialised,
    even of one process), left together when every rank stops at the same agreed step."""
    owned = not dist.is_initialized()
    size = world_size() if owned else dist.get_world_size()
    if size == 1 and owned:  # a group of one set up by the caller still takes the group path
        yield SingleProcess(device)
        return
    with said_by_rank_zero():
        replicas = replicas_per_learner(size, config, "torchrun started")
    with process_group(device, "train", leave_together_on=(TrainingInterrupted,)) as rank_device:
        yield LearnerParallel(rank_device, len(config.learners), replicas)


def share_restored_state(place: Placement, state: TrainingState) -> None:
    """After rank 0 restored a checkpoint into ``state``, give every other rank its part: the
    shared entries and its own learner's."""

    def parts() -> list[tuple[dict[str, torch.Tensor], Any]]:
        tensors, meta = capture(state)
        return [(_learner_part(tensors, i), meta) for i in range(len(state.learners))]

    received = place.send_by_learner(parts)
    if received is not None:
        tensors, meta = received
        restore(state, tensors, meta, only=place.learners_here(len(state.learners)))


def gather_learner_states(place: Placement, state: TrainingState) -> None:
    """Bring every learner's live state into rank 0's copy of ``state``, for a checkpoint."""

    def part(learner: int) -> tuple[int, dict[str, torch.Tensor], Any]:
        tensors, entry = capture_learner(state, learner)
        return learner, {k: v.detach().cpu() for k, v in tensors.items()}, entry

    for received in place.gather_by_learner(part):
        restore_learner(state, *received)


def _learner_part(tensors: dict[str, torch.Tensor], learner: int) -> dict[str, torch.Tensor]:
    """Everything but the other learners' entries, on the CPU for pickling."""
    own = f"learners/{learner}/"
    return {
        key: value.detach().cpu()
        for key, value in tensors.items()
        if not key.startswith("learners/") or key.startswith(own)
    }
