"""The recipe step: a run's config turned into the plain values the algorithm takes.

The algorithm core (:mod:`~generalist.training.generalist`, :mod:`~generalist.training.learner`
and :mod:`~generalist.training.tasks`) knows no config: it takes curves, numbers, optimizers
and task objects. This module is the one place that reads them off a :class:`Config`: the γ
curves, the redistribution epochs, the EMA cap, each learner's optimizer, attack and task.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from generalist.config.schema import Config, OptimizerConfig, TaskConfig
from generalist.config.validation import redistribute_rule, resolve_task
from generalist.optimizers import OPTIMIZERS
from generalist.schedules import PiecewiseLinear, mixing_weights, parse_exact, parse_number
from generalist.training import generalist
from generalist.training.generalist import EpochPlan
from generalist.training.tasks import Task, TaskContext, TrainingAttack
from generalist.training.unlabeled_pool import PseudoLabeledPool


def gamma_schedules(config: Config) -> list[PiecewiseLinear]:
    """γ_i(e), one curve per learner in config order; ``remainder`` is 1 − Σ of the others."""
    curves = mixing_weights({n: lc.gamma for n, lc in config.learners.items()}, config.epochs)
    return list(curves.values())


def redistribution_epochs(config: Config) -> list[int]:
    """The epochs ``merge.redistribute`` redistributes in (none for ``policy: never``)."""
    if config.merge.redistribute.policy == "never":
        return []
    unit, start, every = redistribute_rule(config)
    return generalist.redistribution_epochs(
        config.epochs, unit, start, every, config.merge.redistribute.min_gap
    )


def redistributes_in(config: Config, epoch: int) -> bool:
    return epoch in redistribution_epochs(config)


def ema_decay_cap(config: Config, total_steps: int) -> float:
    """d_max of ``merge.ema_decay`` (``auto``: scaled by ``merge.ema_horizon``) for a run of
    ``total_steps`` steps."""
    merge = config.merge
    decay = None if merge.ema_decay == "auto" else parse_number(merge.ema_decay, "merge.ema_decay")
    horizon = parse_exact(merge.ema_horizon, "merge.ema_horizon")
    return generalist.ema_decay_cap(total_steps, decay=decay, horizon=horizon)


def ema_cap_record(config: Config, steps_per_epoch: int) -> dict[str, Any]:
    """d_max and the run length it was resolved for: what ``manifest.json`` records under
    ``ema`` and ``train --dry-run`` prints, since with ``auto`` it depends on the data."""
    total_steps = config.epochs * steps_per_epoch
    return {
        "ema_decay": config.merge.ema_decay,
        "ema_horizon": config.merge.ema_horizon if config.merge.ema_decay == "auto" else None,
        "epochs": config.epochs,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "d_max": ema_decay_cap(config, total_steps),
    }


def describe_ema_cap(record: dict[str, Any]) -> str:
    """One line: d_max, how it was set, and over how many steps the EMA then averages."""
    d_max = record["d_max"]
    how = (
        f"merge.ema_decay auto: horizon {record['ema_horizon']} of the run"
        if record["ema_decay"] == "auto"
        else "merge.ema_decay as given"
    )
    span = f"{1 / (1 - d_max):,.0f} steps" if d_max > 0 else "1 step (no averaging)"
    return (
        f"EMA cap d_max = {d_max:.6g} ({how}, {record['epochs']} epochs x "
        f"{record['steps_per_epoch']:,} steps = {record['total_steps']:,}; the EMA averages over "
        f"~{span})"
    )


def epoch_plan(config: Config, gammas: list[PiecewiseLinear], epoch: int) -> EpochPlan:
    """What the merge does in ``epoch``: γ_i(e) and whether (and how) it redistributes."""
    return generalist.epoch_plan(
        gammas,
        epoch,
        redistribute=redistributes_in(config, epoch),
        per_step=config.merge.redistribute.policy == "per_step_in_epoch",
    )


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    """``config.type``'s optimizer over the model's parameters (:data:`OPTIMIZERS`)."""
    return OPTIMIZERS[config.type](model.parameters(), config)


def training_attack(config: Config, task: TaskConfig, key: str) -> TrainingAttack | None:
    """The PGD a task trains against (its fields, gaps filled from ``budgets``); None for a task
    without an attack."""
    if not resolve_task(task, key).capabilities.attack:
        return None
    threat, steps, step_size = config.threat_of(task, key)
    return TrainingAttack(threat, steps, step_size, task.random_start)


def learner_task(
    config: Config,
    name: str,
    model: nn.Module,
    *,
    seed: int,
    pseudo_labeled: PseudoLabeledPool | None = None,
) -> Task:
    """Learner ``name``'s task on its own ``model``; ``seed`` seeds the task's own randomness,
    ``pseudo_labeled`` is the run's pool (for a task that reads unlabeled data)."""
    key = f"learners.{name}.task"
    task = config.learners[name].task
    spec = resolve_task(task, key)
    context = TaskContext(
        attack=training_attack(config, task, key),
        model=model,
        epochs=config.epochs,
        seed=seed,
        pretrained=config.model.init_from is not None,
        key=key,
        pseudo_labeled=pseudo_labeled,
    )
    return spec.build(task.params, context)


def unlabeled_per_batch(config: Config) -> dict[str, int]:
    """Pseudo-labeled images each learner that reads them adds to a batch, by learner name."""
    counts: dict[str, int] = {}
    for name, learner in config.learners.items():
        spec = resolve_task(learner.task, f"learners.{name}.task")
        if spec.capabilities.reads_unlabeled:
            counts[name] = learner.task.params.unlabeled_per_batch(config.data.batch_size)
    return counts
