"""Where a run's learners train, and what its processes exchange: the :class:`Placement`.

A placement only communicates. It says which learners train in this process and which slice
of a batch, and it is the run's every exchange between processes: the mix summed over them,
the replicas' gradients, the losses and stop/save decisions every rank must agree on, rank 0's
work handed to the others, the learners' states a checkpoint gathers or a resume sends out, and
the counts an evaluation sums. What to do with them (the merge, the NaN policy, which parts of
the state travel) is the training code's. :class:`SingleProcess` is the placement of one
process, where every exchange is the identity; :mod:`~generalist.training.distributed` is the
one under torchrun.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from generalist.data.streaming import BatchShare
from generalist.training.generalist import MixSum

T = TypeVar("T")


class Placement(Protocol):
    """The communication primitives of a training run (the sync points of docs/architecture.md)."""

    device: torch.device
    is_main: bool
    """Whether this process speaks for the run: writes its files, prints (rank 0)."""
    replicas: int
    """Data-parallel replicas per learner (1: each learner in one process)."""

    def describe(self) -> str:
        """The placement, for the run's first line ("" in one process)."""
        ...

    def learners_here(self, count: int) -> list[int]:
        """The indices, of ``count`` learners, of those this process trains."""
        ...

    @property
    def gradient_sync(self) -> Callable[[nn.Module], None] | None:
        """Averages a model's gradients (and BatchNorm statistics) over its learner's replicas,
        between the backward pass and the update; None without replicas."""
        ...

    @property
    def mix_sum(self) -> MixSum | None:
        """Σ_i γ_i·θ̄_i summed over the processes (one all-reduce), for the merge; None where
        this process holds every teacher the mix needs."""
        ...

    def shard_batch(
        self, x: torch.Tensor, y: torch.Tensor, whole: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This replica's slice of the batch every process drew; with ``whole``, ``x`` already
        is this replica's slice of a batch of that many examples (streamed)."""
        ...

    def decode_share(self) -> BatchShare:
        """This process's part in decoding a streamed batch (its slice, its decode peers)."""
        ...

    def gather_losses(self, local: torch.Tensor) -> torch.Tensor:
        """Every learner's batch loss on every process, from the losses of those trained here
        (a learner's replicas weighted by their share of the batch)."""
        ...

    def gather_flags(self, local: torch.Tensor) -> torch.Tensor:
        """Every learner's flag on every process (set if set by any process that trains it),
        from the flags of the learners trained here."""
        ...

    def agree(self, *values: int) -> tuple[int, ...]:
        """The largest of each value over all processes (a stop signal, a due checkpoint)."""
        ...

    def on_main(self, work: Callable[[], T]) -> T:
        """Run ``work`` on rank 0 only (it touches the run directory); every process gets its
        result, or its error."""
        ...

    def send_by_learner(self, parts: Callable[[], Sequence[Any]]) -> Any | None:
        """Rank 0's ``parts()`` (one object per learner) sent out: every other process receives
        that of the learner it trains; None on rank 0, where ``parts`` runs (and alone, where
        it does not)."""
        ...

    def gather_by_learner(self, part: Callable[[int], Any]) -> list[Any]:
        """On rank 0, ``part(i)`` of the first replica of every learner i trained elsewhere, in
        rank order; empty on the other processes and alone."""
        ...

    def eval_shard(self, learner: int | None) -> tuple[int, int] | None:
        """``(i, n)``: evaluate shard i of n of the data for learner ``learner`` (None: the
        global model); None: that learner is not held here."""
        ...

    def sum_counts(self, counts: torch.Tensor) -> None:
        """Sum an evaluation's ``counts`` over the processes, in place."""
        ...


class SingleProcess:
    """The placement of one process: every learner trains here, nothing is communicated."""

    is_main = True
    replicas = 1
    gradient_sync = None
    mix_sum = None

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def describe(self) -> str:
        return ""

    def learners_here(self, count: int) -> list[int]:
        return list(range(count))

    def shard_batch(
        self, x: torch.Tensor, y: torch.Tensor, whole: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def decode_share(self) -> BatchShare:
        return BatchShare()

    def gather_losses(self, local: torch.Tensor) -> torch.Tensor:
        return local

    def gather_flags(self, local: torch.Tensor) -> torch.Tensor:
        return local

    def agree(self, *values: int) -> tuple[int, ...]:
        return values

    def on_main(self, work: Callable[[], T]) -> T:
        return work()

    def send_by_learner(self, parts: Callable[[], Sequence[Any]]) -> Any | None:
        return None

    def gather_by_learner(self, part: Callable[[int], Any]) -> list[Any]:
        return []

    def eval_shard(self, learner: int | None) -> tuple[int, int] | None:
        return 0, 1

    def sum_counts(self, counts: torch.Tensor) -> None:
        pass
