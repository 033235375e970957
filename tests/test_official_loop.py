"""The library's Generalist-D equals an independent transcription of the official loop.

The transcription below is written from the algorithm's statement (docs/algorithm.md), in plain
torch and in the official code's shape: two models from one initialisation, two SGD optimizers,
a hand-written PGD, an EMA teacher per model, the γ-mix into the global model and the
redistribution rule e ≥ 75, e mod 5 = 0, with every schedule read once per integer epoch.
Both run side by side at the official length (E = 120) on a few digits batches per epoch, with
the same initialisation, batches and attack noise; after every step the global models must
agree to float rounding. The arithmetic is written in the same operation order as the library
(the EMA as a lerp, the mix term by term, the ε-box as a clamp of the perturbation): a
last-bit difference in a learner can flip the sign of a near-zero PGD gradient and grow, over
hundreds of steps, into a real one, which would hide what this test looks for. Any change to
the update (the lr's granularity, γ's epoch, the redistribution's epochs or place in the step,
the EMA) moves them apart.
"""

from __future__ import annotations

import copy
import itertools
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn
from training_runs import quiet

from generalist.config import build_config
from generalist.models import create_model
from generalist.training import loop
from generalist.training.save_and_resume import Checkpointer

EPOCHS = 120
EPS, PGD_STEPS, PGD_STEP_SIZE = 0.2, 3, 0.1
LR_POINTS = [(0, 0.01), (40, 0.01), (80, 0.001), (120, 0.0001)]
GAMMA_ADV_POINTS = [(0, 1.0), (80, 1.0), (120, 0.4)]
TOLERANCE = 1e-5


def _interp(points: list[tuple[float, float]], x: float) -> float:
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def _library_config(out, *extra: str):
    lr = "{unit: epoch, points: [[0, 0.01], [40, 0.01], [80, 0.001], [120, 0.0001]]}"
    return build_config(
        "generalist-d",
        dataset="digits",
        overrides=[
            f"epochs={EPOCHS}",
            "model.name=tiny-cnn",
            "data.train_limit=24",  # 3 batches of 8 per epoch
            "data.val_size=16",
            "data.test_limit=8",
            "data.batch_size=8",
            f"budgets.Linf.eps={EPS}",
            f"budgets.Linf.steps={PGD_STEPS}",
            f"budgets.Linf.step_size={PGD_STEP_SIZE}",
            f"learners.natural.optimizer.lr={lr}",
            f"learners.adv_linf.optimizer.lr={lr}",
            "merge.ema_decay=0.999",  # the official cap (what "auto" gives at 46,920 steps)
            "eval.every=120",
            "eval.val_steps=1",
            "eval.test_steps=1",
            "eval.learners=false",
            "checkpoint.every_minutes=null",
            f"out_dir={out}",
            *extra,
        ],
    )


def _run_library(config) -> tuple[dict[str, torch.Tensor], list, list[list[torch.Tensor]]]:
    """Train ``config``; returns the initial weights, each step's batch and global model."""
    batches, globals_after = [], []
    initial: dict[str, torch.Tensor] = {}
    original = loop.generalist_step

    def recording_step(here, merge, x, y, **kwargs):
        if not initial:
            initial.update(copy.deepcopy(merge.global_model.state_dict()))
        batches.append((x.clone(), y.clone()))
        losses = original(here, merge, x, y, **kwargs)
        globals_after.append([t.clone() for t in merge.global_model.state_dict().values()])
        return losses

    with (
        mock.patch.object(loop, "generalist_step", recording_step),
        # 120 epoch-end checkpoints would take half the test's time and touch no weight.
        mock.patch.object(Checkpointer, "save", lambda self, reason: self.run.path),
    ):
        loop.train(config, progress=False, echo=quiet)
    return initial, batches, globals_after


def _pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise: torch.Generator):
    """ℓ∞ PGD from a uniform start, crafted in eval mode (the official attack)."""
    model.eval()
    start = torch.rand(x.shape, generator=noise)
    x_adv = (x + (2 * start - 1) * EPS).clamp(0, 1)
    for _ in range(PGD_STEPS):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = x_adv.detach() + PGD_STEP_SIZE * grad.sign()
        # The projection onto the ε-box written as a clamp of the perturbation: the same point
        # as min(max(x_adv, x − ε), x + ε) but for the last bit, and a last-bit difference in
        # an input can flip the sign of a near-zero gradient at the next step, which turns
        # rounding into a real divergence.
        x_adv = (x + (x_adv - x).clamp(-EPS, EPS)).clamp(0, 1)
    model.train()
    return x_adv


@torch.no_grad()
def _ema(average: nn.Module, model: nn.Module, decay: float) -> None:
    """average ← decay·average + (1 − decay)·model, as average + (1 − decay)·(model − average)
    (a lerp); integer buffers are copied."""
    live = model.state_dict()
    for key, value in average.state_dict().items():
        if value.is_floating_point():
            value.lerp_(live[key], 1 - decay)
        else:
            value.copy_(live[key])


@torch.no_grad()
def _mix(global_model: nn.Module, teachers: list[nn.Module], gammas: list[float], decay: float):
    """θ_g ← decay·θ_g + (1 − decay)·Σ_i γ_i·θ̄_i, summed term by term; integer buffers from
    the first teacher."""
    states = [t.state_dict() for t in teachers]
    for key, value in global_model.state_dict().items():
        if value.is_floating_point():
            value.mul_(decay)
            for gamma, state in zip(gammas, states, strict=True):
                if gamma:
                    value.add_(state[key], alpha=(1 - decay) * gamma)
        else:
            value.copy_(states[0][key])


def _official_loop(initial: dict[str, torch.Tensor], batches: list, steps_per_epoch: int):
    """Yields the global model's state after every step."""
    base = create_model("tiny-cnn", num_classes=10, in_channels=1, image_size=8)
    base.load_state_dict(initial)
    natural, robust = copy.deepcopy(base), copy.deepcopy(base)
    teachers = [copy.deepcopy(natural), copy.deepcopy(robust)]
    global_model = copy.deepcopy(base)
    opt_nat = torch.optim.SGD(natural.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    opt_adv = torch.optim.SGD(robust.parameters(), lr=0.01, momentum=0.9, weight_decay=3.5e-3)
    noise = torch.Generator().manual_seed(0 * 7919 + 2)  # seed·7919 + learner index + 1
    step = 0
    for epoch in range(1, EPOCHS + 1):
        lr = _interp(LR_POINTS, epoch)  # held for the whole integer epoch
        for optimizer in (opt_nat, opt_adv):
            for group in optimizer.param_groups:
                group["lr"] = lr
        gamma_adv = _interp(GAMMA_ADV_POINTS, epoch)
        gammas = [1 - gamma_adv, gamma_adv]
        redistribute = epoch >= 75 and epoch % 5 == 0
        for x, y in batches[step : step + steps_per_epoch]:
            natural.train()
            loss = F.cross_entropy(natural(x), y)
            opt_nat.zero_grad()
            loss.backward()
            opt_nat.step()
            robust.train()
            x_adv = _pgd(robust, x, y, noise)
            loss = F.cross_entropy(robust(x_adv), y)
            opt_adv.zero_grad()
            loss.backward()
            opt_adv.step()
            decay = min(0.999, (step + 1) / (step + 10))
            _ema(teachers[0], natural, decay)
            _ema(teachers[1], robust, decay)
            _mix(global_model, teachers, gammas, decay)
            if redistribute:
                natural.load_state_dict(global_model.state_dict())
                robust.load_state_dict(global_model.state_dict())
            step += 1
            yield list(global_model.state_dict().values())


def _largest_gap(config) -> tuple[float, int]:
    """(max |Δθ_g| over all steps, the first step where it exceeds the tolerance or -1)."""
    initial, batches, library = _run_library(config)
    steps_per_epoch = len(batches) // EPOCHS
    assert steps_per_epoch * EPOCHS == len(batches) and steps_per_epoch == 3
    largest, first_bad = 0.0, -1
    for step, (ours, theirs) in enumerate(
        zip(library, _official_loop(initial, batches, steps_per_epoch), strict=True)
    ):
        gap = max(
            (a.double() - b.double()).abs().max().item() for a, b in zip(ours, theirs, strict=True)
        )
        largest = max(largest, gap)
        if gap > TOLERANCE and first_bad < 0:
            first_bad = step
            break  # diverged: no need to run on
    return largest, first_bad


def test_the_library_matches_the_official_loop_at_every_step(tmp_path):
    largest, first_bad = _largest_gap(_library_config(tmp_path))
    assert first_bad == -1, f"global model {largest:.2e} apart at step {first_bad}"


def test_the_comparison_catches_a_per_step_learning_rate(tmp_path):
    """The check can fail: with the lr read per step (the old default) the two part as soon as
    the lr starts to fall (epoch 41, step 120) and never meet again."""
    largest, first_bad = _largest_gap(_library_config(tmp_path, "schedule_granularity=step"))
    assert first_bad >= 120 and largest > TOLERANCE
