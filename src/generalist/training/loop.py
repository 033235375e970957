"""The training loop, readable top to bottom: data → learners → steps → merge → log → save.

The whole training split lives on the device as one uint8 tensor (airbench-style): a batch is
an index, a cast and a device-side augmentation, with no loader processes in between. Every
base learner trains on the *same* augmented batch, as in the official code, then the merge
updates the teachers and the global learner.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from generalist.attacks.threat import ThreatModel
from generalist.checkpoint import save_model
from generalist.config import Config, redistribute_start_epoch
from generalist.data import BatchAugment, DataSplits, EpochBatches, load_splits, to_float
from generalist.errors import ConfigError, TrainingError
from generalist.evaluation.accuracy import accuracies
from generalist.models import create_model
from generalist.rundir import RunDir
from generalist.training.learner import Learner, build_optimizer
from generalist.training.merge import GeneralistMerge
from generalist.training.schedules import PiecewiseLinear, build_schedule
from generalist.training.tasks import Attack, build_task

GLOBAL = "global"


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
    base = create_model(name, **kwargs).to(device)
    gammas = gamma_schedules(config)
    learners = []
    for index, (lname, lc) in enumerate(config.learners.items()):
        if config.merge.init == "same":
            model = copy.deepcopy(base)
        else:
            torch.manual_seed(config.seed + 1000 * (index + 1))
            model = create_model(name, **kwargs).to(device)
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
                task=build_task(lc.task.type, attack, lc.task.beta),
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
    progress: bool = True,
    echo: Any = print,
) -> TrainResult:
    """Train ``config`` into ``run`` (a fresh run directory if None) and return the results."""
    started = time.perf_counter()
    device = resolve_device(config.device)
    splits = load_splits(
        config.data.dataset,
        config.data.data_dir,
        val_size=config.data.val_size,
        split_seed=config.data.split_seed,
        train_limit=config.data.train_limit,
        test_limit=config.data.test_limit,
    )
    run = run or RunDir.create(config.out_dir, config.name)
    run.write_config(config)
    spec = model_spec(config, splits)
    learners, global_model = build_learners(config, spec, device)
    merge = GeneralistMerge(
        [lr.model for lr in learners],
        global_model,
        decay_max=config.merge.ema_decay,
        warmup=config.merge.warmup,
    )
    threats = config.eval_threats()
    info = splits.info
    augment = BatchAugment(
        info.default_crop_padding if config.data.crop_padding is None else config.data.crop_padding,
        info.default_flip if config.data.flip is None else config.data.flip,
    )
    train_x = splits.train.images.to(device)
    train_y = splits.train.labels.to(device)
    batches = EpochBatches(len(splits.train), config.data.batch_size, config.seed)
    augment_generator = torch.Generator(device=device).manual_seed(config.seed)
    autocast = _autocast(config.precision, device)
    echo(
        f"run {run.path} · {config.name} · {len(learners)} learner(s) "
        f"({', '.join(f'{lr.name}:{lr.task.name}' for lr in learners)}) · {config.model.name} · "
        f"{info.name} train {len(splits.train)} / val {len(splits.val)} / test {len(splits.test)} "
        f"· {device}"
    )
    step = 0
    val: dict[str, dict[str, float]] = {}
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.perf_counter()
        gammas = [lr.gamma(epoch) for lr in learners]
        redistribute = redistributes_in(config, epoch)
        per_step = redistribute and config.merge.redistribute.policy == "per_step_in_epoch"
        loss_sums = torch.zeros(len(learners), device=device)
        n_batches = len(batches)
        bar = tqdm(
            batches.indices(epoch),
            total=n_batches,
            desc=f"epoch {epoch}/{config.epochs}",
            leave=False,
            disable=not progress,
            unit="batch",
        )
        for b, index in enumerate(bar):
            x = augment(to_float(train_x[index]), augment_generator)
            y = train_y[index]
            position = epoch - 1 + (b + 1) / n_batches
            with autocast:
                for i, learner in enumerate(learners):
                    loss_sums[i] += learner.train_step(x, y, position)
            merge.update(step, gammas)
            step += 1
            if per_step:
                merge.redistribute()
        if redistribute and not per_step:
            merge.redistribute()
        losses = (loss_sums / n_batches).tolist()
        for learner, loss in zip(learners, losses, strict=True):
            if not math.isfinite(loss):
                raise TrainingError(
                    f"learner {learner.name} had a non-finite loss in epoch {epoch}; "
                    f"lower its learning rate (learners.{learner.name}.optimizer.lr)"
                )
        record: dict[str, Any] = {
            "epoch": epoch,
            "step": step,
            "lr": {lr.name: lr.lr(epoch) for lr in learners},
            "gamma": dict(zip((lr.name for lr in learners), gammas, strict=True)),
            "redistributed": redistribute,
            "train_loss": dict(zip((lr.name for lr in learners), losses, strict=True)),
            "train_seconds": time.perf_counter() - epoch_started,
        }
        if epoch % config.eval.every == 0 or epoch == config.epochs:
            val = _validate(config, learners, global_model, splits, threats, device)
            record["val"] = val
        run.append_metrics(record)
        echo(_epoch_line(record, config.epochs))
    test = _test(config, global_model, splits, threats, device)
    save_model(
        global_model, run.path, {"model": spec, "dataset": info.name, "preset": config.preset}
    )
    seconds = time.perf_counter() - started
    run.write_json(
        "summary.json",
        {
            "name": config.name,
            "preset": config.preset,
            "test": test,
            "val": val,
            "test_examples": min(len(splits.test), config.eval.test_examples or len(splits.test)),
            "test_pgd_steps": config.eval.test_steps,
            "seconds": seconds,
        },
    )
    echo(f"test ({config.eval.test_steps}-step PGD): " + _format_accuracies(test))
    echo(f"saved {run.weights_path} in {seconds:.0f} s")
    return TrainResult(run, test, val, seconds)


def _autocast(precision: str, device: torch.device) -> Any:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def _validate(
    config: Config,
    learners: list[Learner],
    global_model: nn.Module,
    splits: DataSplits,
    threats: list[ThreatModel],
    device: torch.device,
) -> dict[str, dict[str, float]]:
    models = {GLOBAL: global_model}
    if config.eval.learners:
        models.update({lr.name: lr.model for lr in learners})
    return {
        name: accuracies(
            model,
            splits.val,
            threats,
            steps=config.eval.val_steps,
            batch_size=config.data.eval_batch_size,
            device=device,
            seed=config.seed,
        )
        for name, model in models.items()
    }


def _test(
    config: Config,
    global_model: nn.Module,
    splits: DataSplits,
    threats: list[ThreatModel],
    device: torch.device,
) -> dict[str, float]:
    test = splits.test
    if config.eval.test_examples is not None:
        test = test.subset(torch.arange(min(config.eval.test_examples, len(test))))
    return accuracies(
        global_model,
        test,
        threats,
        steps=config.eval.test_steps,
        batch_size=config.data.eval_batch_size,
        device=device,
        seed=config.seed,
    )


def _format_accuracies(acc: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.1f}%" for name, value in acc.items())


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    losses = " ".join(f"{k} {v:.3f}" for k, v in record["train_loss"].items())
    line = f"epoch {record['epoch']}/{epochs} loss {losses}"
    if GLOBAL in record.get("val", {}):
        line += f" | val {GLOBAL} " + _format_accuracies(record["val"][GLOBAL])
    line += f" | {record['train_seconds']:.1f} s"
    return line + (" | redistributed" if record["redistributed"] else "")
