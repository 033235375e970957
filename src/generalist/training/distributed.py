"""Learner-parallel training on ``torch.distributed``: one process group per base learner.

Started by ``torchrun --nproc-per-node N -m generalist train ...`` (or ``generalist train
--nproc N``, which runs that for you). With K learners, N = K gives every learner its own
process; N = m·K gives each learner m data-parallel replicas (ranks ``i·m .. i·m+m−1`` train
learner i: contiguous, so a learner's replicas share a node where they can). One learner
(a baseline preset) makes all N ranks plain data-parallel.

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

import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from generalist.config import Config
from generalist.data import EpochBatches
from generalist.errors import ConfigError, GeneralistError
from generalist.torchrun import check_gpus, said_by_rank_zero, world_size
from generalist.training.generalist import GeneralistMerge
from generalist.training.learner import Learner
from generalist.training.signals import TrainingInterrupted
from generalist.training.state import (
    TrainingState,
    capture,
    capture_learner,
    restore,
    restore_learner,
)
from generalist.training.tasks import task_spec

T = TypeVar("T")
INT_SPLIT = 2**24
"""Integers travel in the float buffer as (high, low) halves below 2**24, which float32 holds
exactly: counters up to 2**48."""


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


class SingleProcess:
    """The one-process placement: every learner trains here, nothing is communicated."""

    is_main = True

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def describe(self) -> str:
        return ""

    def check(self, config: Config, batches: EpochBatches) -> None:
        """Refuse, before any training, what this placement cannot run."""

    def merge(
        self, learners: Sequence[Learner], global_model: nn.Module, **kw: Any
    ) -> GeneralistMerge:
        return GeneralistMerge([learner.model for learner in learners], global_model, **kw)

    def local(self, learners: list[Learner]) -> list[Learner]:
        return learners

    def shard_batch(
        self, x: torch.Tensor, y: torch.Tensor, whole: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def gather_losses(self, local: torch.Tensor, learners: list[Learner]) -> torch.Tensor:
        """All learners' losses, as the single-process loop has them."""
        return local

    def weights_finite(self, learners: list[Learner], index: int) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in learners[index].model.parameters())

    def agree(self, *values: int) -> tuple[int, ...]:
        """The largest of each value over all processes (a stop signal, a due checkpoint)."""
        return values

    def on_main(self, work: Callable[[], T]) -> T:
        """Run ``work`` on rank 0 only (it touches the run directory); every rank gets its
        result, or its error."""
        return work()

    def share_state(self, state: TrainingState) -> None:
        """After rank 0 restored a checkpoint, give every rank its part of it."""

    def gather_learners(self, state: TrainingState) -> None:
        """Bring every learner's live state into rank 0's copy of it, for a checkpoint."""

    def eval_shard(self, model_name: str) -> tuple[int, int] | None:
        """``(i, n)``: evaluate shard i of n of the data for this model; None: not held here."""
        return 0, 1

    def sum_counts(self, counts: torch.Tensor) -> None:
        """Sum ``counts`` over the processes, in place."""


class LearnerParallel(SingleProcess):
    """This rank's place: learner ``rank // m``, replica ``rank % m`` of it."""

    def __init__(
        self,
        device: torch.device,
        config: Config,
        replicas: int,
        objects: dist.ProcessGroup | None,
    ) -> None:
        super().__init__(device)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.replicas = replicas
        self.learner = self.rank // replicas
        self.replica = self.rank % replicas
        self.is_main = self.rank == 0
        self.names = list(config.learners)
        self.objects = objects
        """A gloo group for pickled objects (checkpoint parts), whatever the tensor backend."""
        self.skip_nonfinite = config.checkpoint.on_nonfinite == "skip"
        self.replica_group = None
        if replicas > 1:  # every rank creates every group, in the same order
            groups = [
                dist.new_group(list(range(i * replicas, (i + 1) * replicas)))
                for i in range(len(self.names))
            ]
            self.replica_group = groups[self.learner]
        self.batch_share = 1.0
        self._weights_nonfinite = torch.zeros(len(self.names))

    def describe(self) -> str:
        per = f"{self.replicas} per learner" if self.replicas > 1 else "one per learner"
        return f" · {self.world_size} processes ({per}, {dist.get_backend()})"

    def check(self, config: Config, batches: EpochBatches) -> None:
        with said_by_rank_zero():
            self._check_replicas(config, batches)

    def _check_replicas(self, config: Config, batches: EpochBatches) -> None:
        if self.replicas == 1:
            return
        where = f"with {self.replicas} data-parallel replicas per learner"
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
        if smallest < self.replicas:
            raise ConfigError(
                f"a batch of {smallest} examples cannot be split {where}; raise "
                "data.batch_size or use fewer processes"
            )

    def merge(
        self, learners: Sequence[Learner], global_model: nn.Module, **kw: Any
    ) -> GeneralistMerge:
        """The merge of this rank's teacher; the mix summed over the ranks (one learner's
        replicas hold identical teachers: nothing to exchange)."""
        return GeneralistMerge(
            [learner.model for learner in learners],
            global_model,
            trained_here=[self.learner],
            sum_over_processes=self._sum_mix if len(self.names) > 1 else None,
            **kw,
        )

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

    def local(self, learners: list[Learner]) -> list[Learner]:
        learner = learners[self.learner]
        if self.replicas > 1:
            learner.gradient_sync = self._average_replicas
        return [learner]

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

    def gather_losses(self, local: torch.Tensor, learners: list[Learner]) -> torch.Tensor:
        """Every learner's batch loss on every rank, so all take the same NaN decision."""
        k = len(self.names)
        exchange = torch.zeros(2 * k, device=local.device)
        exchange[self.learner] = local[0] * self.batch_share
        if self.skip_nonfinite and self.replica == 0:
            params = list(learners[self.learner].model.parameters())
            finite = torch.stack([torch.isfinite(p).all() for p in params]).all()
            exchange[k + self.learner] = (~finite).float()
        dist.all_reduce(exchange)
        self._weights_nonfinite = exchange[k:].cpu()
        return exchange[:k]

    def weights_finite(self, learners: list[Learner], index: int) -> bool:
        return not bool(self._weights_nonfinite[index])

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

    def share_state(self, state: TrainingState) -> None:
        parts: list[Any] = [None]
        if self.is_main:
            tensors, meta = capture(state)
            parts = [
                (_learner_part(tensors, rank // self.replicas), meta)
                for rank in range(self.world_size)
            ]
        received: list[Any] = [None]
        dist.scatter_object_list(
            received, parts if self.is_main else None, src=0, group=self.objects
        )
        if not self.is_main:
            tensors, meta = received[0]
            restore(state, tensors, meta, only=[self.learner])

    def gather_learners(self, state: TrainingState) -> None:
        """Bring every learner's live state into rank 0's copy of it, for a checkpoint."""
        part = None
        if self.replica == 0 and not self.is_main:
            tensors, entry = capture_learner(state, self.learner)
            part = (self.learner, {k: v.detach().cpu() for k, v in tensors.items()}, entry)
        parts: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(part, parts, dst=0, group=self.objects)
        for received in parts or []:
            if received is not None:
                restore_learner(state, *received)

    def sum_counts(self, counts: torch.Tensor) -> None:
        dist.all_reduce(counts)

    def eval_shard(self, model_name: str) -> tuple[int, int] | None:
        """The global model over all ranks, a learner over its replicas: batch shards, so the
        summed counts are exactly the single-process ones."""
        if model_name not in self.names:
            return self.rank, self.world_size
        if self.names.index(model_name) == self.learner:
            return self.replica, self.replicas
        return None


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


def _learner_part(tensors: dict[str, torch.Tensor], learner: int) -> dict[str, torch.Tensor]:
    """Everything but the other learners' entries, on the CPU for pickling."""
    own = f"learners/{learner}/"
    return {
        key: value.detach().cpu()
        for key, value in tensors.items()
        if not key.startswith("learners/") or key.startswith(own)
    }


@contextmanager
def processes(config: Config, device: torch.device) -> Iterator[SingleProcess]:
    """This process's placement: :class:`SingleProcess`, or under torchrun a
    :class:`LearnerParallel` on a fresh process group (NCCL on GPUs, picked by LOCAL_RANK;
    gloo on the CPU), torn down at the end; or on the process group the caller initialised,
    even of one process."""
    owned = not dist.is_initialized()
    size = world_size() if owned else dist.get_world_size()
    if size == 1 and owned:  # a group of one set up by the caller still takes the group path
        yield SingleProcess(device)
        return
    with said_by_rank_zero():
        replicas = replicas_per_learner(size, config, "torchrun started")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", size))
        check_gpus(local, device, "torchrun started")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if owned:
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    try:
        objects = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        try:
            yield LearnerParallel(device, config, replicas, objects)
        except TrainingInterrupted:  # every rank stops at the same agreed step
            _leave_together(owned)
            raise
        _leave_together(owned)
    finally:
        if owned:
            dist.destroy_process_group()


def _leave_together(owned: bool) -> None:
    """Wait for every rank before tearing the group down: a gloo rank whose peer has already
    closed its connections can abort in C++ ("terminate called without an active exception")
    after the run itself finished. Only on paths every rank takes, so it cannot hang."""
    if owned:
        dist.barrier()
