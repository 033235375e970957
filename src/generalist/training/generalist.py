"""The Generalist update, in the order it happens (docs/algorithm.md states it in full, with
the official defaults and every departure). Everything that makes the method differ from plain
adversarial training is in this file.

Per epoch e (1-based, of E):

* the mixing weights γ_i(e), read once per epoch, summing to 1 (:func:`epoch_plan`);
* whether e redistributes (:func:`redistribution_epochs`: the official e ≥ t', e mod c = 0,
  laid on E epochs).

The values come as plain numbers and curves: :mod:`generalist.training.recipe` reads them off
the run's config, so this file (like the learner and the tasks) knows no config.

At the start (:func:`start_models`, rule ``merge.init``): every θ_i and θ_g one
initialisation (``same``, the paper's), or each θ_i its own draw and θ_g ← Σ_i γ_i(1)·θ_i
(``independent``).

Per training step t (counted from 0 over the whole run, :func:`generalist_step`):

1. every base learner i takes one optimizer step of its own task on the same batch,
2. each teacher θ̄_i ← d_t·θ̄_i + (1−d_t)·θ_i,
3. the global learner θ_g ← d_t·θ_g + (1−d_t)·Σ_i γ_i(e)·θ̄_i,
4. in a redistributing epoch, every θ_i ← θ_g: after every step (the official rule), or once
   after the epoch's last one (:func:`end_epoch`),

with d_t = min(d_max, (t+1)/(t+10)) and d_max scaled to the run's length
(:func:`ema_decay_cap`). "Parameters" here means every floating-point tensor of the
state dict, so BatchNorm running means and variances are averaged like weights; integer buffers
(``num_batches_tracked``) are counters and are copied, never averaged. Redistribution copies the
whole global state into every base learner; their optimizers keep their momentum.

All updates use the ``torch._foreach_*`` kernels: one fused launch per tensor list instead of
one per tensor, which matters for the hundreds of small tensors of a ResNet. Under torchrun
(:mod:`~generalist.training.distributed`) the same code runs on every rank; the only
difference is that Σ_i γ_i·θ̄_i is summed over the processes instead of over a local list.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import torch
from torch import nn

from generalist.schedules import PiecewiseLinear

if TYPE_CHECKING:
    from generalist.training.learner import Learner

MixSum = Callable[
    [float, tuple[list[torch.Tensor], list[torch.Tensor]], list[torch.Tensor]],
    tuple[list[torch.Tensor], list[torch.Tensor]],
]
"""``(γ_i, this process's teacher (floats, ints), θ_g's ints) -> (Σ_i γ_i·θ̄_i, ints)``: the
mix summed over processes (learner-parallel training; one process sums a local list)."""


# ---- the schedules: fixed for a whole epoch ----------------------------------------------
# (γ_i(e) are the learners' ``gamma`` curves; :mod:`generalist.training.recipe` reads all of
# these values off a config.)


def redistribution_epochs(
    epochs: int, unit: str, start: Fraction, every: Fraction, min_gap: int = 1
) -> list[int]:
    """The epochs of E that redistribute, in order, for the rule (t' = ``start``, c = ``every``).

    ``unit: epoch`` is the official rule as written: e ≥ t' and e mod c = 0. ``unit: fraction``
    lays the same rule on E epochs: the points 1, 1 − c, 1 − 2c, … ≥ t' of the run (anchored
    at its end, as the official 120 mod 5 = 0 is), each at its nearest epoch (halves up). At
    E = 120, t' = 0.625, c = 1/24 that is exactly 75, 80, …, 120; shorter runs keep the last
    epoch and as many of the ten as the integer grid holds (docs/algorithm.md), unless two
    of them would be closer than ``min_gap`` epochs.
    """
    if unit == "epoch":
        return [e for e in range(1, epochs + 1) if e >= start and e % every == 0]
    points = (1 - k * every for k in range(math.floor((1 - start) / every) + 1))
    laid = sorted({min(epochs, max(1, _nearest(p * epochs))) for p in points})
    if all(later - earlier >= min_gap for earlier, later in itertools.pairwise(laid)):
        return laid
    # Too close on this E's grid: step back from the last epoch by the gap instead, so the
    # learners train apart for min_gap − 1 whole epochs between two copies of θ_g.
    first = max(1, _nearest(start * epochs))
    return list(range(epochs, first - 1, -min_gap))[::-1]


def _nearest(value: Fraction) -> int:
    """The nearest whole epoch, halves up."""
    return math.floor(value + Fraction(1, 2))


def ema_decay_cap(total_steps: int, *, decay: float | None, horizon: Fraction) -> float:
    """d_max: ``decay`` as given, or (None: ``merge.ema_decay: auto``) 1 − 1/(h·T) with h =
    ``horizon`` and T the run's steps, so the EMA averages over the same share of every run:
    the official h = 1000/46,920 at T = 120·391 gives exactly 0.999."""
    if decay is not None:
        return decay
    return float(max(Fraction(0), 1 - 1 / (horizon * total_steps)))


@dataclass(frozen=True)
class EpochPlan:
    """What the Generalist does in one epoch."""

    gammas: list[float]
    redistribute: bool
    every_step: bool
    """Redistribute after every step of the epoch (the official rule), not once at its end."""


def epoch_plan(
    gammas: Sequence[PiecewiseLinear], epoch: int, *, redistribute: bool, per_step: bool
) -> EpochPlan:
    """The plan of ``epoch``: γ_i(e) of every learner's curve, and whether (and how: after
    every step when ``per_step``) it redistributes."""
    # γ is fixed for the whole epoch, as in the official code: Σ_i γ_i(e) = 1 holds exactly at
    # the integer epochs the config check verified, and the global learner's target does not
    # drift within an epoch.
    return EpochPlan(
        gammas=[gamma(epoch) for gamma in gammas],
        redistribute=redistribute,
        every_step=redistribute and per_step,
    )


# ---- the start: one initialisation, or the γ-mix of independent ones ------------------------

StartRule = Callable[
    [nn.Module, Callable[[], nn.Module], Sequence[float], int],
    tuple[list[nn.Module], nn.Module],
]
"""``(θ_0, a fresh draw, γ_i(1), seed) -> ([θ_i], θ_g)``: one rule of ``merge.init``."""


def start_models(
    init: str,
    base: nn.Module,
    fresh: Callable[[], nn.Module],
    gammas: Sequence[float],
    *,
    seed: int,
) -> tuple[list[nn.Module], nn.Module]:
    """Every base learner's θ_i and the global θ_g at t = 0, by rule ``init`` of
    :data:`START_RULES`: ``base`` is the run's initialisation θ_0, ``fresh()`` draws a new one
    (from torch's global generator, which the rule seeds), ``gammas`` are γ_i(1)."""
    return START_RULES[init](base, fresh, gammas, seed)


def _same_start(
    base: nn.Module, fresh: Callable[[], nn.Module], gammas: Sequence[float], seed: int
) -> tuple[list[nn.Module], nn.Module]:
    """θ_i = θ_g = θ_0 for every i: one initialisation (the paper's)."""
    return [copy.deepcopy(base) for _ in gammas], copy.deepcopy(base)


def _independent_start(
    base: nn.Module, fresh: Callable[[], nn.Module], gammas: Sequence[float], seed: int
) -> tuple[list[nn.Module], nn.Module]:
    """θ_i drawn from seed s + 1000·(i+1), so adding a learner never shifts another's start;
    θ_g ← Σ_i γ_i(1)·θ_i."""
    models = []
    for index in range(len(gammas)):
        torch.manual_seed(seed + 1000 * (index + 1))
        models.append(fresh())
    global_model = copy.deepcopy(base)  # θ_0's integer buffers; its floats are mixed over
    mix_initial_global(global_model, models, list(gammas))
    return models, global_model


@torch.no_grad()
def mix_initial_global(
    global_model: nn.Module, learners: Sequence[nn.Module], gammas: list[float]
) -> None:
    """θ_g ← Σ_i γ_i·θ_i over the floating-point state (the ``independent`` start)."""
    for key, tensor in global_model.state_dict().items():
        if tensor.is_floating_point():
            tensor.copy_(
                sum(w * m.state_dict()[key] for w, m in zip(gammas, learners, strict=True))
            )


START_RULES: dict[str, StartRule] = {"same": _same_start, "independent": _independent_start}
"""The rules of ``merge.init`` by name (the config accepts exactly these names)."""


# ---- one step ------------------------------------------------------------------------------


def generalist_step(
    here: Sequence[Learner],
    merge: GeneralistMerge,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    position: float,
    step: int,
    plan: EpochPlan,
    settle_losses: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Steps 1–4 above for the learners trained in this process; returns every learner's loss.

    The one function a training step runs through (each learner runs its forward passes in
    its own precision: :attr:`Learner.autocast`).

    ``settle_losses`` gathers all learners' losses (from the other processes under torchrun)
    and stops the run, or skips the batch, at a non-finite one: before the merge, so a NaN
    never reaches the teachers, the global learner or a checkpoint.
    """
    # 1. Every learner sees the same batch (as in the official code): the global learner
    #    averages models that differ only in their task and optimizer, not in their data.
    losses = torch.stack([learner.train_step(x, y, position) for learner in here])
    losses = settle_losses(losses)
    # 2–3. Teachers, then the global learner from the updated teachers.
    merge.update(step, plan.gammas)
    # 4. After the merge: what goes back into the learners already holds this step's progress.
    if plan.every_step:
        merge.redistribute()  # θ_i ← θ_g
    return losses


def end_epoch(merge: GeneralistMerge, plan: EpochPlan) -> None:
    """After the epoch's last step: step 4 once (θ_i ← θ_g), for a redistributing epoch whose
    rule is ``once_per_c_epochs``; the per-step rule already did it after every step."""
    if plan.redistribute and not plan.every_step:
        merge.redistribute()


# ---- the state the merge owns --------------------------------------------------------------


def state_tensors(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The model's state as (floating tensors, integer tensors), sharing storage with it.

    ``state_dict()`` returns detached views of the live parameters and buffers, so in-place
    updates on these lists update the model itself.
    """
    floats, ints = [], []
    for tensor in model.state_dict().values():
        (floats if tensor.is_floating_point() else ints).append(tensor)
    return floats, ints


def ema_decay(step: int, decay_max: float, warmup: bool) -> float:
    """d_t = min(d_max, (t+1)/(t+10)): early steps trust the new weights, later ones average."""
    return min(decay_max, (step + 1) / (step + 10)) if warmup else decay_max


class GeneralistMerge:
    """Owns the teachers θ̄_i and the global learner θ_g for a list of base-learner models.

    ``trained_here`` are the learners this process trains (all of them, in one process), whose
    teachers it updates; ``sum_over_processes`` replaces the local Σ_i γ_i·θ̄_i under torchrun.
    """

    def __init__(
        self,
        learners: Sequence[nn.Module],
        global_model: nn.Module,
        *,
        decay_max: float = 0.999,
        warmup: bool = True,
        trained_here: Sequence[int] | None = None,
        sum_over_processes: MixSum | None = None,
    ) -> None:
        self.learners = list(learners)
        self.teachers = [copy.deepcopy(m) for m in self.learners]
        for teacher in self.teachers:
            teacher.requires_grad_(False)
        self.global_model = global_model.requires_grad_(False)
        self.decay_max = decay_max
        self.warmup = warmup
        self.trained_here = range(len(self.learners)) if trained_here is None else trained_here
        self.sum_over_processes = sum_over_processes
        self._learner_state = [state_tensors(m) for m in self.learners]
        self._teacher_state = [state_tensors(m) for m in self.teachers]
        self._global_state = state_tensors(self.global_model)

    @torch.no_grad()
    def update(self, step: int, gammas: Sequence[float]) -> float:
        """Steps 2 and 3 for step ``step``; returns d_t."""
        if len(gammas) != len(self.learners):
            raise ValueError(f"expected {len(self.learners)} mixing weights, got {len(gammas)}")
        d = ema_decay(step, self.decay_max, self.warmup)
        for index in self.trained_here:
            l_float, l_int = self._learner_state[index]
            t_float, t_int = self._teacher_state[index]
            torch._foreach_lerp_(t_float, l_float, 1.0 - d)  # θ̄_i ← d·θ̄_i + (1−d)·θ_i
            if t_int:
                torch._foreach_copy_(t_int, l_int)
        self._mix(gammas, d)
        return d

    def _mix(self, gammas: Sequence[float], d: float) -> None:
        """θ_g ← d·θ_g + (1−d)·Σ_i γ_i·θ̄_i; integer buffers from the first teacher."""
        g_float, g_int = self._global_state
        torch._foreach_mul_(g_float, d)  # d·θ_g
        if self.sum_over_processes is None:
            for gamma, (t_float, _) in zip(gammas, self._teacher_state, strict=True):
                if gamma != 0.0:  # + (1−d)·γ_i·θ̄_i
                    torch._foreach_add_(g_float, t_float, alpha=(1.0 - d) * gamma)
            ints = self._teacher_state[0][1]
        else:
            here = self.trained_here[0]
            mixed, ints = self.sum_over_processes(gammas[here], self._teacher_state[here], g_int)
            torch._foreach_add_(g_float, mixed, alpha=1.0 - d)  # + (1−d)·Σ_i γ_i·θ̄_i
        if g_int:
            torch._foreach_copy_(g_int, ints)

    @torch.no_grad()
    def redistribute(self) -> None:
        """Step 4: copy θ_g (weights and all buffers) into every base learner."""
        g_float, g_int = self._global_state
        for l_float, l_int in self._learner_state:
            torch._foreach_copy_(l_float, g_float)
            if l_int:
                torch._foreach_copy_(l_int, g_int)
