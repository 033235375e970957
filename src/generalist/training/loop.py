"""The training loop, readable top to bottom: data → learners → steps → merge → log → save.

The whole training split lives on the device as one uint8 tensor (airbench-style): a batch is
an index, a cast and a device-side augmentation, with no loader processes in between. Every
base learner trains on the *same* augmented batch, as in the official code, then the merge
updates the teachers and the global learner.

The loop can start from any (epoch, batch) position: everything it carries from one step to
the next lives in a :class:`~generalist.training.state.TrainingState`, which checkpoints save
and restore whole, so a run killed at any moment and resumed ends bit-identical to one that
never stopped (on the CPU; GPU kernels may not be deterministic).

Under torchrun every rank runs this same loop; a placement object from
:mod:`~generalist.training.distributed` says which learners train here, exchanges what the
ranks must agree on, and leaves the run directory to rank 0. Alone, it does nothing.
"""

from __future__ import annotations

import copy
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from generalist.attacks.threat import ThreatModel
from generalist.checkpoint import CheckpointStore, save_model
from generalist.config import Config, redistribute_start_epoch, validate
from generalist.data import BatchAugment, DataSplits, EpochBatches, load_splits, to_float
from generalist.devices import resolve_precision, training_autocast
from generalist.errors import ConfigError, TrainingError
from generalist.manifest import build_manifest, data_fingerprints, note_resume, write_manifest
from generalist.models import create_model
from generalist.rundir import RunDir
from generalist.schedules import PiecewiseLinear, build_schedule
from generalist.training.distributed import SingleProcess, processes
from generalist.training.init import initialize_from
from generalist.training.learner import Learner, build_optimizer
from generalist.training.save_and_resume import Checkpointer, resume_state
from generalist.training.signals import TrainingInterrupted, resume_hint, stop_on_signals
from generalist.training.state import TrainingState
from generalist.training.tasks import Attack, task_from_config

GLOBAL = "global"
SKIP_LIMIT = 10
"""With ``checkpoint.on_nonfinite: skip``, this many non-finite batches in a row (within an
epoch) for one learner stop the run: skipping is for stray bad batches, not divergence."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: {name!r} is not a device; use auto, cpu or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: CUDA was asked for but no GPU is visible; use --device cpu")
    return device


def _memory_format(config: Config) -> torch.memory_format:
    return torch.channels_last if config.model.channels_last else torch.contiguous_format


def gamma_schedules(config: Config) -> list[PiecewiseLinear]:
    """One γ curve per learner; the ``remainder`` learner gets 1 minus the others, per epoch."""
    names = list(config.learners)
    fixed = {
        name: build_schedule(lc.gamma, config.epochs, f"learners.{name}.gamma", high=1.0)
        for name, lc in config.learners.items()
        if lc.gamma != "remainder"
    }
    curves = []
    for name in names:
        if name in fixed:
            curves.append(fixed[name])
        else:
            points = tuple(
                (float(e), 1.0 - sum(c(e) for c in fixed.values()))
                for e in range(1, config.epochs + 1)
            )
            curves.append(PiecewiseLinear(points))
    return curves


def redistributes_in(config: Config, epoch: int) -> bool:
    """DESIGN §1: redistribute in epochs e >= t' with e mod c == 0."""
    policy = config.merge.redistribute
    if policy.policy == "never":
        return False
    return epoch >= redistribute_start_epoch(config) and epoch % policy.every == 0


def model_spec(config: Config, splits: DataSplits) -> dict[str, Any]:
    info = splits.info
    normalize = config.model.normalize
    return {
        "name": config.model.name,
        "num_classes": info.num_classes,
        "in_channels": info.image_shape[0],
        "image_size": info.image_shape[1],
        "mean": list(info.mean) if normalize else None,
        "std": list(info.std) if normalize else None,
    }


def build_learners(
    config: Config, spec: dict[str, Any], device: torch.device
) -> tuple[list[Learner], nn.Module]:
    """Base learners and the global learner, all from one initialisation unless told otherwise."""
    kwargs = dict(spec)
    name = kwargs.pop("name")
    torch.manual_seed(config.seed)
    memory_format = _memory_format(config)
    base = create_model(name, **kwargs).to(device, memory_format=memory_format)
    initialize_from(base, config.model.init_from, spec)
    gammas = gamma_schedules(config)
    learners = []
    for index, (lname, lc) in enumerate(config.learners.items()):
        if config.merge.init == "same":
            model = copy.deepcopy(base)
        else:
            torch.manual_seed(config.seed + 1000 * (index + 1))
            model = create_model(name, **kwargs).to(device, memory_format=memory_format)
        attack = None
        if lc.task.type != "natural":
            threat, steps, step_size = config.threat_of(lc.task, f"learners.{lname}.task")
            attack = Attack(threat, steps, step_size, lc.task.random_start)
        generator = torch.Generator(device=device).manual_seed(config.seed * 7919 + index + 1)
        learners.append(
            Learner(
                name=lname,
                model=model,
                optimizer=build_optimizer(model, lc.optimizer),
                lr=build_schedule(lc.optimizer.lr, config.epochs, f"learners.{lname}.lr"),
                gamma=gammas[index],
                task=task_from_config(
                    lc.task,
                    attack,
                    model,
                    epochs=config.epochs,
                    seed=config.seed * 7919 + index + 1,
                    pretrained=config.model.init_from is not None,
                    key=f"learners.{lname}.task",
                ),
                config=lc,
                generator=generator,
            )
        )
    global_model = copy.deepcopy(base)
    if config.merge.init != "same":
        _mix_into(global_model, [lr.model for lr in learners], [lr.gamma(1) for lr in learners])
    return learners, global_model


@torch.no_grad()
def _mix_into(target: nn.Module, models: list[nn.Module], weights: list[float]) -> None:
    for key, tensor in target.state_dict().items():
        if tensor.is_floating_point():
            tensor.copy_(sum(w * m.state_dict()[key] for w, m in zip(weights, models, strict=True)))


@dataclass
class TrainResult:
    run: RunDir
    test: dict[str, float]
    val: dict[str, dict[str, float]]
    seconds: float


def train(
    config: Config,
    run: RunDir | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    echo: Any = print,
) -> TrainResult:
    """Train ``config`` into ``run`` (a fresh run directory if None) and return the results.

    With ``resume``, ``run`` continues from its newest intact checkpoint (from the start if it
    has none yet). SIGTERM/SIGINT save a checkpoint and raise :class:`TrainingInterrupted`.
    """
    started = time.perf_counter()
    validate(config)  # a Config edited in Python after build_config fails here, before compute
    device = resolve_device(config.device)
    if resume and run is None:
        raise ValueError("resume=True needs the run directory to resume")
    with processes(config, device) as parallel:
        if not parallel.is_main:
            progress, echo = False, _silent
        return _train(config, run, parallel, started, resume=resume, progress=progress, echo=echo)


def _silent(*_: Any) -> None:
    """The ``echo`` of every rank but 0: one process speaks for the run."""


def _train(
    config: Config,
    run: RunDir | None,
    parallel: SingleProcess,
    started: float,
    *,
    resume: bool,
    progress: bool,
    echo: Any,
) -> TrainResult:
    device = parallel.device
    splits = load_splits(
        config.data.dataset,
        config.data.data_dir,
        val_size=config.data.val_size,
        split_seed=config.data.split_seed,
        train_limit=config.data.train_limit,
        test_limit=config.data.test_limit,
    )
    spec = model_spec(config, splits)
    learners, global_model = build_learners(config, spec, device)
    batches = EpochBatches(len(splits.train), config.data.batch_size, config.seed)
    parallel.check(config, batches)
    run = parallel.create_run(run, config)
    merge = parallel.merge(
        learners, global_model, decay_max=config.merge.ema_decay, warmup=config.merge.warmup
    )
    local = parallel.local(learners)
    state = TrainingState(
        learners,
        merge,
        augment_generator=torch.Generator(device=device).manual_seed(config.seed),
        epoch_losses=torch.zeros(len(batches), len(learners), device=device),
    )
    fingerprints = data_fingerprints(splits)
    store = CheckpointStore(run.checkpoints_path, keep=config.checkpoint.keep)
    if resume:
        resumed_from = parallel.on_main(
            lambda: resume_state(
                state, store, run, config, fingerprints["train"]["fingerprint"], echo
            )
        )
        parallel.share_state(state)
    if parallel.is_main:
        if resume:
            note_resume(run, resumed_from, echo)
        run.write_config(config)
        if not resume:
            write_manifest(run, build_manifest(config, device, splits.info.name, fingerprints))
    checkpoints = parallel.checkpointer(
        store, state, config, run, fingerprints["train"]["fingerprint"]
    )
    threats = config.eval_threats()
    info = splits.info
    augment = BatchAugment(
        info.default_crop_padding if config.data.crop_padding is None else config.data.crop_padding,
        info.default_flip if config.data.flip is None else config.data.flip,
    )
    train_x = splits.train.images.to(device)
    train_y = splits.train.labels.to(device)
    precision = resolve_precision(config.precision, device)
    memory_format = _memory_format(config)
    autocast = training_autocast(precision, device)
    skip_nonfinite = config.checkpoint.on_nonfinite == "skip"
    echo(
        f"run {run.path} · {config.name} · {len(learners)} learner(s) "
        f"({', '.join(f'{lr.name}:{lr.task.name}' for lr in learners)}) · {config.model.name} · "
        f"{info.name} train {len(splits.train)} / val {len(splits.val)} / test {len(splits.test)} "
        f"· {device} {precision}{parallel.describe()}"
    )
    if resume and state.step:
        echo(
            f"resuming at epoch {state.epoch}, batch {state.batch}/{len(batches)} "
            f"(step {state.step}) from {checkpoints.latest}"
        )
    with stop_on_signals(run.path) as stop, checkpoints.reporting_write_errors():
        for epoch in range(state.epoch, config.epochs + 1):
            epoch_started = time.perf_counter()
            gammas = [lr.gamma(epoch) for lr in learners]
            redistribute = redistributes_in(config, epoch)
            per_step = redistribute and config.merge.redistribute.policy == "per_step_in_epoch"
            bar = tqdm(
                batches.indices(epoch, start_batch=state.batch),
                initial=state.batch,
                total=len(batches),
                desc=f"epoch {epoch}/{config.epochs}",
                leave=False,
                disable=not progress,
                unit="batch",
            )
            for index in bar:
                x = augment(to_float(train_x[index]), state.augment_generator)
                x = x.contiguous(memory_format=memory_format)
                x, y = parallel.shard_batch(x, train_y[index])
                position = epoch - 1 + (state.batch + 1) / len(batches)
                with autocast:
                    losses = torch.stack(
                        [
                            lr.train_step(x, y, position, skip_nonfinite=skip_nonfinite).float()
                            for lr in local
                        ]
                    )
                losses = parallel.gather_losses(losses, learners)
                # One host sync per step, against a PGD step's dozens of kernels: a NaN is
                # caught at the step that made it, before it reaches the merge or a checkpoint.
                if not bool(torch.isfinite(losses).all()):
                    _nonfinite(losses, state, config, checkpoints, parallel, len(batches), echo)
                merge.update(state.step, gammas)
                state.record_step(losses)
                if per_step:
                    merge.redistribute()
                signum, due = parallel.agree(  # every rank stops or saves at the same step
                    stop.signum or 0, state.batch < len(batches) and checkpoints.due()
                )
                if signum:
                    saved = checkpoints.save(signal.Signals(signum).name)
                    raise _interrupted(saved, signum, state, len(batches), run.path)
                if due:
                    checkpoints.save("schedule")
            if redistribute and not per_step:
                merge.redistribute()
            record = _epoch_record(state, epoch, gammas, redistribute, epoch_started)
            if epoch % config.eval.every == 0 or epoch == config.epochs:
                state.val = _validate(config, learners, global_model, splits, threats, parallel)
                record["val"] = state.val
            state.finish_epoch(record)
            if parallel.is_main:
                run.append_metrics(record)
            saved = checkpoints.save("epoch end")
            echo(_epoch_line(record, config.epochs))
            (signum,) = parallel.agree(stop.signum or 0)
            if signum:
                raise _interrupted(saved, signum, state, len(batches), run.path)
        test = _test(config, global_model, splits, threats, parallel)
        seconds = time.perf_counter() - started
        if parallel.is_main:
            save_model(
                global_model,
                run.path,
                {"model": spec, "dataset": info.name, "preset": config.preset},
            )
            test_examples = min(len(splits.test), config.eval.test_examples or len(splits.test))
            run.write_json(
                "summary.json",
                {
                    "name": config.name,
                    "preset": config.preset,
                    "test": test,
                    "val": state.val,
                    "test_examples": test_examples,
                    "test_pgd_steps": config.eval.test_steps,
                    "seconds": seconds,
                },
            )
    echo(f"test ({config.eval.test_steps}-step PGD): " + _format_accuracies(test))
    echo(f"saved {run.weights_path} in {seconds:.0f} s")
    return TrainResult(run, test, state.val, seconds)


def _epoch_record(
    state: TrainingState,
    epoch: int,
    gammas: list[float],
    redistribute: bool,
    epoch_started: float,
) -> dict[str, Any]:
    """The epoch's metrics line; a learner's loss is the mean over the batches it trained on."""
    finite = torch.isfinite(state.epoch_losses)
    trained = finite.sum(dim=0)
    losses = (torch.where(finite, state.epoch_losses, 0).sum(dim=0) / trained).tolist()
    names = [lr.name for lr in state.learners]
    record: dict[str, Any] = {
        "epoch": epoch,
        "step": state.step,
        "lr": {lr.name: lr.lr(epoch) for lr in state.learners},
        "gamma": dict(zip(names, gammas, strict=True)),
        "redistributed": redistribute,
        "train_loss": dict(zip(names, losses, strict=True)),
        "train_seconds": time.perf_counter() - epoch_started,
    }
    skipped = (len(state.epoch_losses) - trained).tolist()
    if any(skipped):
        record["skipped_batches"] = dict(zip(names, skipped, strict=True))
    return record


def _nonfinite(
    losses: torch.Tensor,
    state: TrainingState,
    config: Config,
    checkpoints: Checkpointer,
    parallel: SingleProcess,
    batches_per_epoch: int,
    echo: Any,
) -> None:
    """Stop at a NaN/inf loss, or (``checkpoint.on_nonfinite: skip``) report the skipped batch.

    Skipping only helps against a bad batch. A learner whose weights are no longer finite, or
    whose loss stayed non-finite for :data:`SKIP_LIMIT` batches in a row (weights so large that
    every batch overflows), cannot recover that way, so the run stops then too.
    """
    batch = f"batch {state.batch + 1}/{batches_per_epoch}"
    where = f"step {state.step + 1} (epoch {state.epoch}, {batch})"
    skip = config.checkpoint.on_nonfinite == "skip"
    limit = min(SKIP_LIMIT, batches_per_epoch)
    for i in torch.nonzero(~torch.isfinite(losses)).flatten().tolist():
        learner = state.learners[i]
        value = float(losses[i])
        cause = ""
        if skip:
            earlier = state.epoch_losses[max(0, state.batch - limit + 1) : state.batch, i]
            if len(earlier) == limit - 1 and not bool(torch.isfinite(earlier).any()):
                cause = f" for the {limit}th batch in a row, so skipping batches is not helping"
            elif not parallel.weights_finite(state.learners, i):
                cause = " and its weights are no longer finite, so skipping batches cannot help"
            else:
                echo(
                    f"warning: learner {learner.name} had a non-finite loss ({value}) at "
                    f"{where}; skipped that batch for it (checkpoint.on_nonfinite: skip)"
                )
                continue
        fix = f"lower its learning rate (learners.{learner.name}.optimizer.lr)"
        if skip or checkpoints.latest is None:
            fix += " and start a new run"
        else:
            fix += (
                " in a new run, or skip such batches: generalist train --resume "
                f"{checkpoints.run.path} --set checkpoint.on_nonfinite=skip"
            )
        raise TrainingError(
            f"learner {learner.name} had a non-finite loss ({value}) at {where}{cause}; "
            f"stopped without saving it, {checkpoints.last_good()}; {fix}"
        )


def _interrupted(
    saved: Path, signum: int, state: TrainingState, batches_per_epoch: int, run: Path
) -> TrainingInterrupted:
    position = (
        f"epoch {state.epoch}, batch {state.batch}/{batches_per_epoch}"
        if state.batch
        else f"the end of epoch {state.epoch - 1}"
    )
    return TrainingInterrupted(
        f"stopped by {signal.Signals(signum).name} after step {state.step} ({position}); saved "
        f"{saved}; {resume_hint(run)}",
        signum=signum,
        run=run,
        checkpoint=saved,
    )


def _validate(
    config: Config,
    learners: list[Learner],
    global_model: nn.Module,
    splits: DataSplits,
    threats: list[ThreatModel],
    parallel: SingleProcess,
) -> dict[str, dict[str, float]]:
    models = {GLOBAL: global_model}
    if config.eval.learners:
        models.update({lr.name: lr.model for lr in learners})
    return parallel.accuracies(
        models,
        splits.val,
        threats,
        steps=config.eval.val_steps,
        batch_size=config.data.eval_batch_size,
        device=parallel.device,
        seed=config.seed,
    )


def _test(
    config: Config,
    global_model: nn.Module,
    splits: DataSplits,
    threats: list[ThreatModel],
    parallel: SingleProcess,
) -> dict[str, float]:
    test = splits.test
    if config.eval.test_examples is not None:
        test = test.subset(torch.arange(min(config.eval.test_examples, len(test))))
    return parallel.accuracies(
        {GLOBAL: global_model},
        test,
        threats,
        steps=config.eval.test_steps,
        batch_size=config.data.eval_batch_size,
        device=parallel.device,
        seed=config.seed,
    )[GLOBAL]


def _format_accuracies(acc: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.1f}%" for name, value in acc.items())


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    losses = " ".join(f"{k} {v:.3f}" for k, v in record["train_loss"].items())
    line = f"epoch {record['epoch']}/{epochs} loss {losses}"
    if GLOBAL in record.get("val", {}):
        line += f" | val {GLOBAL} " + _format_accuracies(record["val"][GLOBAL])
    line += f" | {record['train_seconds']:.1f} s"
    return line + (" | redistributed" if record["redistributed"] else "")
