"""Validating a config: every check a ``Config`` must pass before any data is read.

The coercer (:mod:`generalist.config.coercion`) has made every value its field's type; these
are the checks types cannot express: ranges, choices, γ curves that sum to 1, attacks that fit
their task, files that must exist. Each raises one :class:`ConfigError` naming the dotted key and
what to write instead, because a typo found after an hour of training is an hour lost.
:func:`validate` runs them section by section, in the order of ``config.yaml``; it also
completes the config where only it can (each task's ``params`` become its parameters dataclass,
an import-path task's source file is recorded).
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Any

from generalist.attacks.threat import NORMS, ThreatModel, parse_eps
from generalist.config.coercion import from_dict
from generalist.config.schema import (
    BAD_FILE_POLICIES,
    INIT_POLICIES,
    MAX_EPOCHS,
    MAX_IMAGE_SIZE,
    MAX_NAME_BYTES,
    MAX_SEED,
    MAX_WORKERS,
    NONFINITE_POLICIES,
    OPTIMIZERS,
    REDISTRIBUTE_POLICIES,
    SELECTION_CRITERIA,
    STORAGES,
    UNLABELED_REST,
    BudgetConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    LearnerConfig,
    LoggingConfig,
    MergeConfig,
    TaskConfig,
)
from generalist.devices import PRECISIONS
from generalist.errors import ConfigError, cut
from generalist.plugins import check_source_record, is_import_path, source_record
from generalist.schedules import (
    REMAINDER,
    SCHEDULE_GRANULARITIES,
    SCHEDULE_UNITS,
    build_schedule,
    mixing_weights,
    parse_exact,
    parse_number,
    parse_step_size,
)
from generalist.threads import MAX_THREADS
from generalist.training.tasks import TaskSpec, list_tasks, task_spec


def validate(config: Config) -> None:
    """Cross-field checks that types alone cannot express; raises ConfigError naming the key.

    The sections are checked about in ``config.yaml``'s order, a check that reads another
    section after that one (``model.init_from`` reads ``merge.init``, ``data.unlabeled`` the
    learners), and the first mistake is the one reported. ``config`` is completed in place:
    each task's ``params`` become its parameters dataclass and an import-path task's source
    file is recorded (:func:`resolve_task`), so a ``Config`` edited in Python is checked and
    completed the same way as a built one."""
    _validate_run(config)
    _validate_dataset_and_model(config)
    _validate_data(config.data)
    _validate_budgets(config.budgets)
    _validate_learners(config)
    _validate_merge(config)
    _validate_init_from(config)
    _validate_unlabeled(config)
    _validate_eval(config)
    _validate_checkpoint(config.checkpoint)
    _validate_logging(config.logging)


def _validate_run(config: Config) -> None:
    """The run's own keys: its length, seeds, threads, name, folder, device and precision."""
    _at_least(config.epochs, 1, "epochs")
    _at_most(config.epochs, MAX_EPOCHS, "epochs")
    for key, seed in (("seed", config.seed), ("data.split_seed", config.data.split_seed)):
        _at_least(seed, 0, key)
        _at_most(seed, MAX_SEED, key)
    if config.threads is not None:
        _at_least(config.threads, 1, "threads")
        _at_most(config.threads, MAX_THREADS, "threads")
    _choice(config.schedule_granularity, SCHEDULE_GRANULARITIES, "schedule_granularity")
    validate_name(config.name)
    _validate_out_dir(config.out_dir)
    _validate_device(config.device)
    _choice(config.precision, PRECISIONS, "precision")


def validate_name(name: str) -> None:
    """A run name is one folder name: no separators, no ``..``, room for the timestamp."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(
            f"name: {cut(name)} is not a folder name; use letters, digits, '-', '_' or '.' "
            "without '/', and put the run elsewhere with --out"
        )
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ConfigError(
            f"name: {len(name.encode('utf-8'))} bytes is too long for a folder name; use at "
            f"most {MAX_NAME_BYTES}"
        )


def _validate_out_dir(out_dir: str) -> None:
    """The folder runs go into must be a folder, or creatable as one (no file in the way)."""
    path = Path(out_dir)
    for ancestor in (path, *path.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                where = "is" if ancestor == path else f"is below {ancestor}, which is"
                raise ConfigError(f"out_dir: {cut(out_dir)} {where} a file; give a folder")
            return


def _validate_device(device: str) -> None:
    """A device that exists on this machine: ``mps`` without Apple's GPU, or ``cuda:3`` on a
    two-GPU machine, fails here at ``--dry-run`` rather than when the weights are moved."""
    if device == "auto":
        return
    import torch

    from generalist.devices import resolve_device

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device: {cut(device)} cannot train; use auto, cpu, cuda or cuda:N")
    resolve_device(device)


def _validate_dataset_and_model(config: Config) -> None:
    """A dataset and a model that exist, registered or given by import path, and keyword
    arguments the model accepts."""
    from generalist.data import is_known_dataset, list_datasets
    from generalist.models.registry import check_model_kwargs, model_name_problem

    if not is_known_dataset(config.data.dataset):
        _choice(config.data.dataset, list_datasets(), "data.dataset")
    problem = model_name_problem(config.model.name)
    if problem is not None:
        raise ConfigError(f"model.name: {problem}")
    check_model_kwargs(config.model.name, config.model.kwargs)


def _validate_data(data: DataConfig) -> None:
    """How the data is split, batched, augmented, stored and decoded."""
    _at_least(data.batch_size, 1, "data.batch_size")
    _at_least(data.eval_batch_size, 1, "data.eval_batch_size")
    if data.val_size < 0 or (data.val_size >= 1 and data.val_size != int(data.val_size)):
        raise ConfigError("data.val_size: use a fraction in [0, 1) or a whole count of examples")
    if data.crop_padding is not None:
        _at_least(data.crop_padding, 0, "data.crop_padding")
    _at_least(data.image_size, 8, "data.image_size")
    _at_most(data.image_size, MAX_IMAGE_SIZE, "data.image_size")
    _choice(data.storage, STORAGES, "data.storage")
    _at_least(data.memory_budget_gb, 0, "data.memory_budget_gb")
    _at_least(data.workers, 0, "data.workers")
    _at_most(data.workers, MAX_WORKERS, "data.workers")
    _choice(data.bad_files, BAD_FILE_POLICIES, "data.bad_files")
    for key in ("train_limit", "test_limit"):
        if getattr(data, key) is not None:
            _at_least(getattr(data, key), 1, f"data.{key}")


def _validate_budgets(budgets: dict[str, BudgetConfig]) -> None:
    """Each norm's default attack: a known norm, a readable ε, steps and a positive step."""
    for norm, budget in budgets.items():
        if norm not in NORMS:
            raise ConfigError(f"budgets.{norm}: unknown norm; use {', '.join(NORMS)}")
        try:
            parse_eps(budget.eps)
        except ConfigError as error:
            raise ConfigError(f"budgets.{norm}.eps: {error}") from None
        _at_least(budget.steps, 0, f"budgets.{norm}.steps")
        if budget.step_size is not None:
            eps = parse_exact(budget.eps, f"budgets.{norm}.eps")
            _positive(parse_step_size(budget.step_size, eps, f"budgets.{norm}.step_size"), norm)


def _positive(step_size: float, norm: str) -> None:
    if not step_size > 0:
        raise ConfigError(f"budgets.{norm}.step_size: must be > 0, got {step_size:g}")


def _validate_learners(config: Config) -> None:
    """At least one learner, each with a valid task and optimizer, and γ that sum to 1."""
    if not config.learners:
        raise ConfigError("learners: at least one learner is needed; pick a --preset")
    _validate_robust_preset_keeps_an_attack(config)
    for name, learner in config.learners.items():
        _validate_learner(config, name, learner)
    validate_gammas(config)


def _validate_robust_preset_keeps_an_attack(config: Config) -> None:
    """A robust preset whose every adversarial learner was removed (``learners.X=null``) is
    standard training under a robust method's name: refused, not run. (A learner whose task
    type the user set to ``natural`` is a choice made by name, and is kept.)"""
    from generalist.presets import list_presets, load_method_preset

    if config.preset not in list_presets():
        return
    if any(lc.task.type != "natural" for lc in config.learners.values()):
        return
    robust = [
        name
        for name, learner in (load_method_preset(config.preset).get("learners") or {}).items()
        if (learner or {}).get("task", {}).get("type", "natural") != "natural"
        and name not in config.learners
    ]
    if robust:
        raise ConfigError(
            f"learners.{robust[0]}: the {config.preset} preset without its adversarial "
            f"learner{'s' if len(robust) > 1 else ''} ({', '.join(robust)}) is standard "
            "training; use --preset standard, or keep a learner with an attack"
        )


def _validate_learner(config: Config, name: str, learner: LearnerConfig) -> None:
    key = f"learners.{name}"
    _validate_task(config, f"{key}.task", learner.task)
    opt = learner.optimizer
    _choice(opt.type, OPTIMIZERS, f"{key}.optimizer.type")
    build_schedule(opt.lr, config.epochs, f"{key}.optimizer.lr")
    if not 0 <= opt.momentum < 1:
        raise ConfigError(f"{key}.optimizer.momentum: {opt.momentum:g} must be in [0, 1)")
    if opt.nesterov and opt.type == "sgd" and opt.momentum == 0:
        raise ConfigError(
            f"{key}.optimizer.nesterov: Nesterov momentum needs a momentum > 0; set "
            f"{key}.optimizer.momentum or nesterov: false"
        )
    if opt.weight_decay < 0:
        raise ConfigError(f"{key}.optimizer.weight_decay: must be >= 0, got {opt.weight_decay:g}")
    if len(opt.betas) != 2 or not all(0 <= b < 1 for b in opt.betas):
        raise ConfigError(f"{key}.optimizer.betas: give two numbers in [0, 1), e.g. [0.9, 0.999]")


def resolve_task(task: TaskConfig, key: str) -> TaskSpec:
    """The task ``task.type`` names; turns ``task.params`` into its parameters dataclass (the
    task's defaults filled in) and records or checks an import path's source file."""
    spec = task_spec(task.type, key)
    if not isinstance(task.params, spec.params):  # as written: a mapping (or null)
        if task.params is not None and not isinstance(task.params, dict):
            raise ConfigError(f"{key}.params: expected a mapping, got {cut(task.params)}")
        task.params = from_dict(spec.params, task.params or {}, f"{key}.params")
    if not is_import_path(task.type):
        if task.source is not None:
            raise ConfigError(f"{key}.source: only an import-path task type records one; remove it")
    elif task.source is None or task.source.get("import_path") != task.type:
        task.source = source_record(task.type, what=f"{key}.type")
    else:
        check_source_record(task.source, what=f"{key}.type")
    return spec


def _validate_task(config: Config, key: str, task: TaskConfig) -> None:
    """The attack a task's capabilities ask for, and its own parameters' checks."""
    spec = resolve_task(task, key)
    if spec.capabilities.attack:
        threat, steps, step_size = config.threat_of(task, key)
        _at_least(steps, 1, f"{key}.steps")
        if not step_size > 0:
            raise ConfigError(f"{key}.step_size: must be > 0, got {step_size:g}")
        if steps > 1 and step_size > threat.eps and _explicit_step_size(config, task, threat):
            raise ConfigError(
                f"{key}.step_size: {step_size:g} is larger than epsilon {threat.eps:g}, so "
                f"each of the {steps} steps overshoots the ball; use at most epsilon (or leave it "
                "unset for 2.5·epsilon/steps)"
            )
        norms = spec.capabilities.norms
        if threat.norm not in norms:
            listed = " and ".join([", ".join(norms[:-1]), norms[-1]] if len(norms) > 1 else norms)
            raise ConfigError(f"{key}.norm: {spec.name} supports {listed}, not {threat.norm}")
    else:
        given = [f for f in ("norm", "eps", "steps", "step_size") if getattr(task, f) is not None]
        if given:
            raise ConfigError(
                f"{key}: a {spec.name} learner has no attack; remove {'/'.join(given)}"
            )
    spec.check(task.params, f"{key}.params", config.epochs)


def _explicit_step_size(config: Config, task: TaskConfig, threat: ThreatModel) -> bool:
    """Whether the step size was written down rather than defaulted to 2.5·ε/steps."""
    if task.step_size is not None:
        return True
    budget = config.budgets.get(threat.norm)
    return task.eps is None and budget is not None and budget.step_size is not None


def validate_gammas(config: Config) -> None:
    """γ_i(e) must lie in [0, 1] and sum to 1 at every epoch e = 1..E (docs/algorithm.md)."""
    remainders = [n for n, lc in config.learners.items() if lc.gamma == REMAINDER]
    if len(remainders) > 1:
        raise ConfigError(
            f"learners.{remainders[1]}.gamma: only one learner may take the 'remainder'"
        )
    curves = mixing_weights({n: lc.gamma for n, lc in config.learners.items()}, config.epochs)
    for epoch in range(1, config.epochs + 1):
        if remainders:
            remainder = curves[remainders[0]](epoch)
            if remainder < -1e-6:
                raise ConfigError(
                    f"learners.*.gamma: the fixed γ already sum to {1 - remainder:.4g} > 1 at "
                    f"epoch {epoch}, leaving a negative remainder for learners.{remainders[0]}"
                )
            continue
        total = sum(curve(epoch) for curve in curves.values())
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ConfigError(
                f"learners.*.gamma: γ sum to {total:.4g}, not 1, at epoch {epoch}; "
                "fix the curves or set one learner's gamma to 'remainder'"
            )


def _validate_merge(config: Config) -> None:
    """The EMA, how the learners start, and when the global learner is copied back."""
    merge = config.merge
    _validate_ema(merge)
    _choice(merge.init, INIT_POLICIES, "merge.init")
    _choice(merge.redistribute.policy, REDISTRIBUTE_POLICIES, "merge.redistribute.policy")
    redistribute_rule(config)


def _validate_ema(merge: MergeConfig) -> None:
    if merge.ema_decay != "auto":
        decay = parse_number(merge.ema_decay, "merge.ema_decay")
        if not 0 <= decay < 1:
            raise ConfigError(
                f"merge.ema_decay: {decay:g} must be in [0, 1), or auto to scale with the run"
            )
    horizon = parse_exact(merge.ema_horizon, "merge.ema_horizon")
    if not 0 < horizon <= 1:
        raise ConfigError(
            f"merge.ema_horizon: {float(horizon):g} must be a fraction of the run's steps in "
            "(0, 1], e.g. 1000/46920 (the official run)"
        )


def redistribute_rule(config: Config) -> tuple[str, Fraction, Fraction]:
    """``(unit, t', c)`` of ``merge.redistribute``, checked and exact (see
    :func:`generalist.training.generalist.redistribution_epochs`)."""
    rule = config.merge.redistribute
    start = parse_exact(rule.start, "merge.redistribute.start")
    every = parse_exact(rule.every, "merge.redistribute.every")
    if start < 0:
        raise ConfigError(f"merge.redistribute.start: must be >= 0, got {float(start):g}")
    unit = rule.unit
    if unit is None and every > 1:  # the rule before `unit` existed: t' a fraction, c epochs
        unit, start = "epoch", start * config.epochs if start <= 1 else start
    unit = unit or "fraction"
    _choice(unit, SCHEDULE_UNITS, "merge.redistribute.unit")
    _at_least(rule.min_gap, 1, "merge.redistribute.min_gap")
    if rule.min_gap != 1 and unit == "epoch":
        raise ConfigError(
            "merge.redistribute.min_gap: only for unit: fraction (with unit: epoch, every is "
            "already the gap); remove min_gap or set unit=fraction"
        )
    if unit == "epoch":
        if every < 1 or every.denominator != 1:
            raise ConfigError(
                f"merge.redistribute.every: {float(every):g} is not a whole number of epochs "
                "(unit: epoch); write e.g. 5"
            )
    elif not 0 < every <= 1 or start > 1:
        raise ConfigError(
            f"merge.redistribute: start {float(start):g} and every {float(every):g} must be "
            "fractions of the run in [0, 1] (unit: fraction; official 0.625 and 1/24), or set "
            "merge.redistribute.unit=epoch to give whole epochs (official 75 and 5)"
        )
    return unit, start, every


def _validate_init_from(config: Config) -> None:
    """Saved weights to start from exist, and every learner starts from them."""
    if config.model.init_from is None:
        return
    if not Path(config.model.init_from).exists():
        raise ConfigError(
            f"model.init_from: {config.model.init_from} does not exist; pass a run "
            "directory or a model.safetensors file"
        )
    if config.merge.init != "same":
        raise ConfigError("model.init_from: needs merge.init: same (one shared start)")


def _validate_unlabeled(config: Config) -> None:
    """``data.unlabeled`` and ``pseudo_labels``: present exactly when an rst learner reads them."""
    source = config.data.unlabeled
    readers = [n for n, lc in config.learners.items() if _reads_unlabeled(lc.task.type)]
    if readers and source is None:
        raise ConfigError(
            f"learners.{readers[0]}.task.type: {config.learners[readers[0]].task.type} needs "
            f"unlabeled images; set data.unlabeled to {UNLABELED_REST!r} (with "
            "data.train_limit), an .npz holding x_unlabeled, or a folder of images"
        )
    labeler = config.pseudo_labels
    if source is None:
        if labeler.model is not None or labeler.epochs is not None:
            raise ConfigError(
                "pseudo_labels: only runs with data.unlabeled pseudo-label; remove it or set "
                "data.unlabeled"
            )
        return
    if not readers:
        kinds = "/".join(t for t in list_tasks() if _reads_unlabeled(t))
        raise ConfigError(
            f"data.unlabeled: no learner uses unlabeled images (only task.type {kinds} does); "
            f"remove it or add an {kinds} learner"
        )
    if source == UNLABELED_REST:
        if config.data.train_limit is None:
            raise ConfigError(
                f"data.unlabeled: {UNLABELED_REST} needs data.train_limit (the labeled part); "
                "the training examples beyond it become the unlabeled data"
            )
    elif not Path(source).expanduser().exists():
        raise ConfigError(
            f"data.unlabeled: {source} does not exist; pass {UNLABELED_REST!r}, an .npz "
            "holding x_unlabeled, or a folder of images"
        )
    if labeler.model is not None and not Path(labeler.model).exists():
        raise ConfigError(
            f"pseudo_labels.model: {labeler.model} does not exist; pass a run directory or a "
            "model.safetensors file, or leave it unset to train a labeler first"
        )
    if labeler.epochs is not None:
        _at_least(labeler.epochs, 1, "pseudo_labels.epochs")


def _reads_unlabeled(kind: str) -> bool:
    return task_spec(kind).capabilities.reads_unlabeled


def _validate_eval(config: Config) -> None:
    """Validation and test attacks, how often they run, and how ``model-best`` is chosen."""
    _at_least(config.eval.val_steps, 0, "eval.val_steps")
    _at_least(config.eval.test_steps, 0, "eval.test_steps")
    _at_least(config.eval.every, 1, "eval.every")
    _validate_selection(config.eval)
    if config.eval.test_examples is not None:
        _at_least(config.eval.test_examples, 1, "eval.test_examples")
    config.eval_threats()


def _validate_selection(evaluation: EvalConfig) -> None:
    _choice(evaluation.select, SELECTION_CRITERIA, "eval.select")
    gate = evaluation.select_min_clean
    if evaluation.select == "clean_gated_robust":
        if gate is None or not 0 <= gate <= 100:
            raise ConfigError(
                "eval.select_min_clean: clean_gated_robust needs a clean-accuracy gate in "
                "[0, 100] %, e.g. --set eval.select_min_clean=88"
            )
    elif gate is not None:
        raise ConfigError(
            f"eval.select_min_clean: only eval.select=clean_gated_robust uses it (here "
            f"{evaluation.select}); remove it"
        )


def _validate_checkpoint(checkpoint: CheckpointConfig) -> None:
    """When checkpoints are written, how many are kept, and what a non-finite loss does."""
    if checkpoint.every_steps is not None:
        _at_least(checkpoint.every_steps, 1, "checkpoint.every_steps")
    minutes = checkpoint.every_minutes
    if minutes is not None and not minutes > 0:
        raise ConfigError(
            f"checkpoint.every_minutes: must be > 0, got {minutes:g}; use null to turn it off"
        )
    _at_least(checkpoint.keep, 1, "checkpoint.keep")
    _choice(checkpoint.on_nonfinite, NONFINITE_POLICIES, "checkpoint.on_nonfinite")


def _validate_logging(logging: LoggingConfig) -> None:
    """TensorBoard scalars need the ``tensorboard`` extra installed (said now, not at epoch 1)."""
    if logging.tensorboard:
        from generalist.tensorboard import require_tensorboard

        require_tensorboard()


def _at_most(value: int, high: int, key: str) -> None:
    if value > high:
        raise ConfigError(f"{key}: must be <= {high}, got {cut(value)}")


def _at_least(value: int, low: int, key: str) -> None:
    if value < low:
        raise ConfigError(f"{key}: must be >= {low}, got {cut(value)}")


def _choice(value: str, choices: Any, key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: unknown value {cut(value)}; choose one of {', '.join(choices)}")
