"""Learner-parallel training on ``torch.distributed``: one process group per base learner.

Started by ``torchrun --nproc-per-node N -m generalist train ...`` (or ``generalist train
--nproc N``, which runs that for you). With K learners, N = K gives every learner its own
process; N = m·K gives each learner m data-parallel replicas (ranks ``i·m .. i·m+m−1`` train
learner i: contiguous, so a learner's replicas share a node where they can). One learner
(a baseline preset) makes all N ranks plain data-parallel.

:class:`LearnerParallel` is the :class:`~generalist.training.placement.Placement` of such a
rank, and only communicates: the loop builds the merge and keeps the NaN policy,
:mod:`~generalist.training.processes` decides what travels, and
:func:`generalist.torchrun.process_group` is the group it runs on.

Why the distributed run equals the single-process one (docs/algorithm.md, same config):

* every rank builds all K learners with the single-process seeds and keeps the others as
  placeholders, so the initialisation, each learner's attack generator and the augmentation
  generator are the single-process ones; every rank draws the same batches in the same order
  and augments the whole batch, so learner i sees exactly the single-process batch and random
  starts;
* the mix Σ_i γ_i·θ̄_i is one all-reduce of a flat buffer per step (learner i's first replica
  puts γ_i·θ̄_i in it, every other rank zeros), after which each rank applies
  θ_g ← d·θ_g + (1−d)·Σ itself. The all-reduce hands every rank the same bits (each chunk is
  summed once, then copied), the global starts equal everywhere and the update is the same
  elementwise arithmetic, so θ_g stays bit-identical on all ranks and redistribution is a
  local copy, no broadcast. The only difference from one process is the summation order
  (γ_0·θ̄_0 + γ_1·θ̄_1, then one scaled add, instead of two scaled adds): rounding, ~1e-7
  relative per step;
* losses and the stop/checkpoint decisions are agreed on by small all-reduces, so every rank
  stops, saves or reports a NaN at the same step.

Data-parallel replicas of a learner are identical copies: they average their gradients and
BatchNorm statistics in one all-reduce per step, after the backward pass (no DDP wrapper, so
the attacks' own backward passes, which run on the same module, trigger nothing). They share
the learner's attack generator, so their random starts repeat from one slice of the batch to
the next (each is still uniform); per-replica streams would need per-replica checkpoint
entries.

Integer buffers (BatchNorm's ``num_batches_tracked``) ride in the same buffer, from learner 0
as in one process, split into two exact float halves. Checkpoints keep the single-process
format: rank 0 gathers each learner's state from its first replica and writes one file, so a
run can resume on any number of processes; on resume rank 0 reads and checks it and sends each
rank its learner. Only rank 0 writes into the run directory or prints.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from generalist.data.streaming import BatchShare
from generalist.errors import GeneralistError
from generalist.training.generalist import MixSum

T = TypeVar("T")
INT_SPLIT = 2**24
"""Integers travel in the float buffer as (high, low) halves below 2**24, which float32 holds
exactly: counters up to 2**48."""


class LearnerParallel:
    """This rank's place: learner ``rank // m``, replica ``rank % m`` of it, of ``learners``
    (a :class:`~generalist.training.placement.Placement`, on the initialised process group)."""

    def __init__(self, device: torch.device, learners: int, replicas: int) -> None:
        self.device = device
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.learners = learners
        self.replicas = replicas
        self.learner = self.rank // replicas
        self.replica = self.rank % replicas
        self.is_main = self.rank == 0
        self.objects = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        """A gloo group for pickled objects (checkpoint parts), whatever the tensor backend."""
        self.replica_group = None
        if replicas > 1:  # every rank creates every group, in the same order
            groups = [
                dist.new_group(list(range(i * replicas, (i + 1) * replicas)))
                for i in range(learners)
            ]
            self.replica_group = groups[self.learner]
        self.batch_share = 1.0

    def describe(self) -> str:
        per = f"{self.replicas} per learner" if self.replicas > 1 else "one per learner"
        return f" · {self.world_size} processes ({per}, {dist.get_backend()})"

    def learners_here(self, count: int) -> list[int]:
        return [self.learner]

    @property
    def gradient_sync(self) -> Callable[[nn.Module], None] | None:
        return self._average_replicas if self.replicas > 1 else None

    @property
    def mix_sum(self) -> MixSum | None:
        """One learner's replicas hold identical teachers: nothing to exchange."""
        return self._sum_mix if self.learners > 1 else None

    @torch.no_grad()
    def _sum_mix(
        self,
        gamma: float,
        teacher: tuple[list[torch.Tensor], list[torch.Tensor]],
        global_ints: list[torch.Tensor],
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Σ_i γ_i·θ̄_i as one all-reduce: learner i's first replica puts γ_i·θ̄_i in a flat
        buffer, every other rank zeros; rank 0 adds the integer buffers of teacher 0."""
        t_float, t_int = teacher
        floats = torch.cat([t.reshape(-1) for t in t_float])
        ints = _split_ints(t_int if self.rank == 0 else global_ints, floats)
        if self.rank != 0:
            ints.zero_()
        if self.replica == 0:
            floats.mul_(gamma)
        else:
            floats.zero_()
        flat = torch.cat([floats, ints])
        dist.all_reduce(flat)
        mixed = _unflatten(flat[: len(floats)], t_float)
        return mixed, _join_ints(flat[len(floats) :], global_ints) if global_ints else []

    def shard_batch(
        self, x: torch.Tensor, y: torch.Tensor, whole: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This replica's contiguous slice of the batch every rank drew and augmented; with
        ``whole``, ``x`` already is this replica's slice of a batch of that many examples
        (a streamed batch, of which each replica decodes only its share)."""
        if self.replicas == 1:
            return x, y
        if whole is not None:
            self.batch_share = len(x) / whole
            return x, y
        x_part = x.tensor_split(self.replicas)[self.replica]
        self.batch_share = len(x_part) / len(x)
        return x_part, y.tensor_split(self.replicas)[self.replica]

    def decode_share(self) -> BatchShare:
        """This replica's slice, and one decode peer per learner: the ranks of the same replica
        of every learner. Every rank creates every peer group, in the same order, as
        ``new_group`` requires."""
        group = None
        if self.learners > 1:
            for replica in range(self.replicas):
                ranks = [learner * self.replicas + replica for learner in range(self.learners)]
                created = dist.new_group(ranks)
                if replica == self.replica:
                    group = created
        return BatchShare(self.replica, self.replicas, self.learner, self.learners, group)

    @torch.no_grad()
    def _average_replicas(self, model: nn.Module) -> None:
        """DDP's gradient average, as one all-reduce after the backward pass: the gradient of
        the whole batch's mean loss (replicas weighted by their share of the batch), and the
        replicas' BatchNorm statistics averaged, so the replicas stay identical."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        stats = [b for b in model.buffers() if b.is_floating_point()]
        flat = torch.cat(
            [g.reshape(-1) * self.batch_share for g in grads]
            + [b.reshape(-1) / self.replicas for b in stats]
        )
        dist.all_reduce(flat, group=self.replica_group)
        torch._foreach_copy_(grads + stats, _unflatten(flat, grads + stats))

    def gather_losses(self, local: torch.Tensor) -> torch.Tensor:
        exchange = torch.zeros(self.learners, device=local.device)
        exchange[self.learner] = local[0] * self.batch_share
        dist.all_reduce(exchange)
        return exchange

    def gather_flags(self, local: torch.Tensor) -> torch.Tensor:
        exchange = torch.zeros(self.learners, dtype=torch.int64, device=self.device)
        exchange[self.learner] = int(local[0])
        dist.all_reduce(exchange, op=dist.ReduceOp.MAX)
        return exchange.bool()

    def agree(self, *values: int) -> tuple[int, ...]:
        agreed = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        return tuple(agreed.tolist())

    def on_main(self, work: Callable[[], T]) -> T:
        outcome: list[Any] = [None]
        if self.is_main:
            try:
                outcome = [(True, work())]
            except Exception as exc:
                dist.broadcast_object_list([(False, _portable(exc))], src=0, group=self.objects)
                raise
        dist.broadcast_object_list(outcome, src=0, group=self.objects)
        ok, value = outcome[0]
        if ok:
            return value
        value.quiet = True  # rank 0 prints it
        raise value

    def send_by_learner(self, parts: Callable[[], Sequence[Any]]) -> Any | None:
        sent: list[Any] | None = None
        if self.is_main:
            made = parts()
            sent = [made[rank // self.replicas] for rank in range(self.world_size)]
        received: list[Any] = [None]
        dist.scatter_object_list(received, sent, src=0, group=self.objects)
        return None if self.is_main else received[0]

    def gather_by_learner(self, part: Callable[[int], Any]) -> list[Any]:
        mine = part(self.learner) if self.replica == 0 and not self.is_main else None
        parts: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(mine, parts, dst=0, group=self.objects)
        return [received for received in parts or [] if received is not None]

    def eval_shard(self, learner: int | None) -> tuple[int, int] | None:
        """The global model over all ranks, a learner over its replicas: batch shards, so the
        summed counts are exactly the single-process ones."""
        if learner is None:
            return self.rank, self.world_size
        if learner == self.learner:
            return self.replica, self.replicas
        return None

    def sum_counts(self, counts: torch.Tensor) -> None:
        dist.all_reduce(counts)


def _portable(exc: Exception) -> GeneralistError:
    """``exc`` as the other ranks can unpickle it: itself if it can, else its message."""
    if isinstance(exc, GeneralistError):
        try:
            pickle.loads(pickle.dumps(exc))
            return exc
        except Exception:
            return GeneralistError(str(exc))
    return GeneralistError(f"rank 0 failed: {type(exc).__name__}: {exc}")


def _unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    sizes = [t.numel() for t in like]
    return [part.view_as(t) for part, t in zip(flat.split(sizes), like, strict=True)]


def _split_ints(tensors: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Integers as float (high, low) halves in ``like``'s dtype and device."""
    if not tensors:
        return like.new_zeros(0)
    values = torch.cat([t.reshape(-1).to(torch.int64) for t in tensors])
    return torch.cat([values // INT_SPLIT, values % INT_SPLIT]).to(like)


def _join_ints(halves: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    high, low = halves.to(torch.int64).chunk(2)
    return _unflatten(high * INT_SPLIT + low, like)
