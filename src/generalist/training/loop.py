"""The training loop: setup, then one epoch at a time, then the test and the saved model.

The whole training split lives on the device as one uint8 tensor (airbench-style): a batch is
an index, a cast and a device-side augmentation, with no loader processes in between. Only an
image folder over the memory budget streams from disk instead (``batch_source``). The
Generalist update of one step is :func:`~generalist.training.generalist.generalist_step`; this
file only feeds it batches and keeps the run safe (signals, NaNs, checkpoints, validation).

The loop can start from any (epoch, batch) position: everything it carries from one step to
the next lives in a :class:`~generalist.training.state.TrainingState`, which checkpoints save
and restore whole, so a run killed at any moment and resumed ends bit-identical to one that
never stopped (on the CPU; GPU kernels may not be deterministic).

Under torchrun every rank runs this same loop; its
:class:`~generalist.training.placement.Placement` says which learners train here and exchanges
what the ranks must agree on (alone, it does nothing). The loop builds the merge on the
placement's all-reduce and keeps the NaN policy.
"""

from __future__ import annotations

import functools
import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from generalist import backends
from generalist.attacks.threat import ThreatModel
from generalist.checkpoint import CheckpointStore
from generalist.compiling import compile_in_place
from generalist.config import Config, validate
from generalist.data import DataSplits, EpochBatches, ImageDataset, dataset_source, load_splits
from generalist.data.folders import FolderOptions
from generalist.data.streaming import StreamingBatches, TrainBatch
from generalist.devices import resolve_device, resolve_precision, training_autocast
from generalist.errors import TrainingError
from generalist.evaluation.accuracy import summed_accuracies
from generalist.evaluation.selection import selection_score
from generalist.manifest import build_manifest, data_fingerprints, note_resume, write_manifest
from generalist.models import NormalizedModel, create_model, model_source
from generalist.plugins import check_source_record
from generalist.preflight import start_notes, validation_split_warning
from generalist.rundir import RunDir
from generalist.schedules import build_schedule, schedule_position
from generalist.tensorboard import metrics_sinks
from generalist.threads import apply_threads
from generalist.training.batch_source import MemoryBatches, batch_augment, training_batches
from generalist.training.chance import chance_level_warnings
from generalist.training.generalist import (
    EpochPlan,
    GeneralistMerge,
    end_epoch,
    generalist_step,
    start_models,
)
from generalist.training.init import initialize_from
from generalist.training.learner import Learner
from generalist.training.placement import Placement
from generalist.training.processes import (
    check_replicas,
    gather_learner_states,
    placement,
    share_restored_state,
)
from generalist.training.pseudo_label import PseudoLabeled, prepare_pseudo_labels
from generalist.training.recipe import (
    build_optimizer,
    ema_cap_record,
    epoch_plan,
    gamma_schedules,
    learner_task,
)
from generalist.training.save_and_resume import Checkpointer, resume_state
from generalist.training.signals import (
    StopRequest,
    TrainingInterrupted,
    resume_hint,
    stop_on_signals,
)
from generalist.training.state import TrainingState
from generalist.training.unlabeled_pool import PseudoLabeledPool
from generalist.weights import BEST_STEM, check_same_layout, save_model

GLOBAL = "global"
SKIP_LIMIT = 10
"""With ``checkpoint.on_nonfinite: skip``, this many non-finite batches in a row (within an
epoch) for one learner stop the run: skipping is for stray bad batches, not divergence."""


def _memory_format(config: Config) -> torch.memory_format:
    return torch.channels_last if config.model.channels_last else torch.contiguous_format


def model_spec(config: Config, splits: DataSplits) -> dict[str, Any]:
    """``create_model``'s arguments for this run, as ``model.json`` keeps them; a plug-in model
    adds its ``kwargs`` and ``source`` (import path and file SHA-256) so a rebuild is checked."""
    info = splits.info
    normalize = config.model.normalize
    spec = {
        "name": config.model.name,
        "num_classes": info.num_classes,
        "in_channels": info.image_shape[0],
        "image_size": info.image_shape[1],
        "mean": list(info.mean) if normalize else None,
        "std": list(info.std) if normalize else None,
    }
    source = model_source(config.model.name)
    if source is not None:
        spec.update(kwargs=dict(config.model.kwargs), source=source)
    return spec


def _check_recorded_plugins(run: RunDir) -> None:
    """On resume: the plug-ins the run started with must still be the same files."""
    try:
        recorded = json.loads(run.manifest_path.read_text()).get("plugins") or {}
    except (OSError, ValueError, AttributeError):
        return  # no readable manifest (killed before writing it): nothing was recorded
    for what, record in recorded.items():
        if isinstance(record, dict):
            check_source_record(
                record, what=what, how_to_accept="or start a new run to train with it as it is now"
            )


def _start_from(base: nn.Module, initial: nn.Module) -> None:
    """Copy a given model's weights into the one the spec built, which must have its layout:
    the run records only how to rebuild the spec's model, so a different instance (other
    constructor arguments) must be said now rather than found at ``generalist eval``."""
    net = base.net if isinstance(base, NormalizedModel) else base
    check_same_layout(
        net.state_dict(),
        initial.state_dict(),
        f"model: the given {type(initial).__name__} is not what model.name builds from the data "
        "(pass its constructor arguments as model.kwargs)",
    )
    with torch.no_grad():
        net.load_state_dict(initial.state_dict())


def build_learners(
    config: Config,
    spec: dict[str, Any],
    device: torch.device,
    pseudo_labeled: PseudoLabeledPool | None = None,
    initial: nn.Module | None = None,
) -> tuple[list[Learner], nn.Module]:
    """Base learners and the global learner, all from one initialisation unless told otherwise;
    rst learners draw from ``pseudo_labeled``; ``initial`` (a model instance given from Python)
    is that initialisation."""
    kwargs = dict(spec)
    name = kwargs.pop("name")
    torch.manual_seed(config.seed)
    memory_format = _memory_format(config)
    base = create_model(name, **kwargs)
    if initial is not None:
        _start_from(base, initial)
    base = base.to(device, memory_format=memory_format)
    initialize_from(base, config.model.init_from, spec)
    gammas = gamma_schedules(config)
    models, global_model = start_models(
        config.merge.init,
        base,
        lambda: create_model(name, **kwargs).to(device, memory_format=memory_format),
        [gamma(1) for gamma in gammas],
        seed=config.seed,
    )
    autocast = training_autocast(resolve_precision(config.precision, device), device)
    learners = []
    for index, ((lname, lc), model) in enumerate(zip(config.learners.items(), models, strict=True)):
        seed = config.seed * 7919 + index + 1
        generator = torch.Generator(device=device).manual_seed(seed)
        learners.append(
            Learner(
                name=lname,
                model=model,
                optimizer=build_optimizer(model, lc.optimizer),
                lr_schedule=build_schedule(lc.optimizer.lr, config.epochs, f"learners.{lname}.lr"),
                gamma=gammas[index],
                task=learner_task(config, lname, model, seed=seed, pseudo_labeled=pseudo_labeled),
                generator=generator,
                skip_nonfinite=config.checkpoint.on_nonfinite == "skip",
                autocast=autocast,
            )
        )
    return learners, global_model


@dataclass
class TrainResult:
    run: RunDir
    test: dict[str, float]
    val: dict[str, dict[str, float]]
    seconds: float
    best: dict[str, Any] | None = None
    """The model selected on validation, as in summary.json (epoch, criterion, val, test);
    None when nothing was selected."""
    model: nn.Module | None = None
    """The final global model (the one saved as ``model.safetensors``), in eval mode."""


def train(
    config: Config,
    run: RunDir | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    echo: Any = print,
    initial_model: nn.Module | None = None,
) -> TrainResult:
    """Train ``config`` into ``run`` (a fresh run directory if None) and return the results.

    With ``resume``, ``run`` continues from its newest intact checkpoint (from the start if it
    has none yet). SIGTERM/SIGINT save a checkpoint and raise :class:`TrainingInterrupted`.
    ``initial_model``: every learner starts from a copy of its weights (it must be what
    ``config.model`` builds, so the saved run can rebuild it).
    """
    started = time.perf_counter()
    validate(config)  # a Config edited in Python after build_config fails here, before compute
    device = resolve_device(config.device)
    if resume and run is None:
        raise ValueError("resume=True needs the run directory to resume")
    threads, why = apply_threads(config.threads)
    pseudo_labeled = None
    if config.data.unlabeled is not None:  # RST: pseudo-label first, in the run's directory
        run, pseudo_labeled = prepare_pseudo_labels(
            config, run, train_labeler=_labeler_trainer(progress, echo), echo=echo
        )
    with placement(config, device) as parallel:
        if not parallel.is_main:
            progress, echo = False, _silent
        backends.configure(parallel.device, deterministic=config.deterministic)
        if device.type == "cpu":
            echo(f"CPU threads: {threads}, {why}")
        for line in start_notes(config):
            echo(line)
        session = _setup(
            config,
            run,
            parallel,
            resume=resume,
            echo=echo,
            pseudo=pseudo_labeled,
            initial=initial_model,
        )
        with (
            stop_on_signals(session.run.path) as stop,
            session.checkpoints.reporting_write_errors(),
        ):
            for epoch in range(session.state.epoch, config.epochs + 1):
                _train_epoch(session, epoch, stop, progress)
            return _finish(session, started)


def _labeler_trainer(progress: bool, echo: Any) -> Any:
    def train_labeler(config: Config, run: RunDir, resume: bool) -> None:
        train(config, run, resume=resume, progress=progress, echo=echo)

    return train_labeler


def _silent(*_: Any) -> None:
    """The ``echo`` of every rank but 0: one process speaks for the run."""


@dataclass
class Session:
    """Everything :func:`_setup` builds for the epochs: one run in progress."""

    config: Config
    parallel: Placement
    run: RunDir
    splits: DataSplits
    spec: dict[str, Any]
    learners: list[Learner]
    here: list[Learner]
    """The learners this process trains (all of them, in one process)."""
    global_model: nn.Module
    merge: GeneralistMerge
    state: TrainingState
    batches: EpochBatches
    source: MemoryBatches | StreamingBatches
    """The training batches: indexed out of the split on the device, or streamed from disk."""
    checkpoints: Checkpointer
    threats: list[ThreatModel]
    echo: Any

    def batch(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmented ``batch`` (this replica's slice of it, data-parallel)."""
        x = batch.x.contiguous(memory_format=_memory_format(self.config))
        return self.parallel.shard_batch(x, batch.y, batch.whole if batch.shared else None)

    def settle_losses(self, losses: torch.Tensor) -> torch.Tensor:
        """Every learner's loss; stops (or skips the batch) at a NaN/inf one."""
        losses = self.parallel.gather_losses(losses)
        # One host sync per step, against a PGD step's dozens of kernels: a NaN is caught at
        # the step that made it, before it reaches the merge or a checkpoint.
        if not bool(torch.isfinite(losses).all()):
            _nonfinite(losses, self, len(self.batches))
        return losses


@dataclass
class _Training:
    """What the steps change: the learners, the merge of their models, and the state around
    them that a checkpoint saves."""

    learners: list[Learner]
    global_model: nn.Module
    merge: GeneralistMerge
    state: TrainingState
    batches: EpochBatches


def _setup(
    config: Config,
    run: RunDir | None,
    parallel: Placement,
    *,
    resume: bool,
    echo: Any,
    pseudo: PseudoLabeled | None = None,
    initial: nn.Module | None = None,
) -> Session:
    """Load the data, build the run, then restore it (``resume``) or start it."""
    if resume and run is not None:
        _check_recorded_plugins(run)  # before any data is read: an edited model file stops here
    splits = _load_data(config, echo)
    spec = model_spec(config, splits)
    training = _build_training(config, splits, spec, parallel, pseudo, initial)
    if run is None:
        run = RunDir(parallel.on_main(lambda: RunDir.create(config.out_dir, config.name).path))
    checkpoints = _restore_or_start(
        config, run, splits, spec, parallel, training, resume=resume, echo=echo, pseudo=pseudo
    )
    session = Session(
        config=config,
        parallel=parallel,
        run=run,
        splits=splits,
        spec=spec,
        learners=training.learners,
        here=_learners_here(parallel, training.learners),
        global_model=training.global_model,
        merge=training.merge,
        state=training.state,
        batches=training.batches,
        source=training_batches(
            config, splits, training.batches, training.state.augment_generator, parallel, echo
        ),
        checkpoints=checkpoints,
        threats=config.eval_threats(),
        echo=echo,
    )
    _announce(session, resume)
    return session


def _learners_here(parallel: Placement, learners: list[Learner]) -> list[Learner]:
    """The learners this process trains, their gradients averaged over their replicas."""
    here = [learners[index] for index in parallel.learners_here(len(learners))]
    for learner in here:
        learner.gradient_sync = parallel.gradient_sync
    return here


def _load_data(config: Config, echo: Any) -> DataSplits:
    """The run's train, validation and test splits; a warning if validation is too small."""
    splits = load_splits(
        config.data.dataset,
        config.data.data_dir,
        val_size=config.data.val_size,
        split_seed=config.data.split_seed,
        train_limit=config.data.train_limit,
        test_limit=config.data.test_limit,
        folder=FolderOptions.from_settings(config.data),
        echo=echo,
    )
    small_validation = validation_split_warning(len(splits.val), config)
    if small_validation is not None:
        echo(small_validation)
    return splits


def _build_training(
    config: Config,
    splits: DataSplits,
    spec: dict[str, Any],
    parallel: Placement,
    pseudo: PseudoLabeled | None,
    initial: nn.Module | None,
) -> _Training:
    """The learners, the global model and their merge, and the state of a run at its start."""
    device = parallel.device
    pool = None
    if pseudo is not None:
        images, labels = pseudo.unlabeled.images.to(device), pseudo.labels.to(device)
        pool = PseudoLabeledPool(images, labels, batch_augment(config, splits.info))
    learners, global_model = build_learners(config, spec, device, pool, initial)
    batches = EpochBatches(len(splits.train), config.data.batch_size, config.seed)
    check_replicas(config, parallel.replicas, batches)
    merge = GeneralistMerge(
        [learner.model for learner in learners],
        global_model,
        decay_max=ema_cap_record(config, len(batches))["d_max"],
        warmup=config.merge.warmup,
        trained_here=parallel.learners_here(len(learners)),
        sum_over_processes=parallel.mix_sum,  # Σ_i γ_i·θ̄_i as one all-reduce, under torchrun
    )
    if config.model.compile:  # after the teachers' deep copies; in place, so no key changes
        compile_in_place(*(learner.model for learner in learners), global_model)
    state = TrainingState(
        learners,
        merge,
        augment_generator=torch.Generator(device=device).manual_seed(config.seed),
        epoch_losses=torch.zeros(len(batches), len(learners), device=device),
    )
    return _Training(learners, global_model, merge, state, batches)


def _restore_or_start(
    config: Config,
    run: RunDir,
    splits: DataSplits,
    spec: dict[str, Any],
    parallel: Placement,
    training: _Training,
    *,
    resume: bool,
    echo: Any,
    pseudo: PseudoLabeled | None,
) -> Checkpointer:
    """The run's checkpoints: with ``resume``, the state of the newest one (restored in place
    on every rank); the run's files written or, resumed, noted."""
    state = training.state
    fingerprints = data_fingerprints(splits)
    train_fingerprint = fingerprints["train"]["fingerprint"]
    store = CheckpointStore(run.checkpoints_path, keep=config.checkpoint.keep)
    if resume:
        resumed_from = parallel.on_main(
            lambda: resume_state(state, store, run, config, train_fingerprint, echo)
        )
        share_restored_state(parallel, state)
    if parallel.is_main:
        run.write_config(config)
        if not resume or not run.manifest_path.is_file():  # killed before it was written
            manifest = build_manifest(config, parallel.device, splits.info.name, fingerprints)
            manifest["ema"] = ema_cap_record(config, len(training.batches))
            if pseudo is not None:
                manifest["pseudo_labels"] = pseudo.record
            plugins = _plugin_records(config, spec)
            if plugins:
                manifest["plugins"] = plugins
            write_manifest(run, manifest)
        if resume:
            note_resume(run, resumed_from, echo)
        run.metrics_sinks = metrics_sinks(config, run.path)  # before the first record
    return Checkpointer(
        store,
        state,
        config,
        run,
        train_fingerprint,
        collect=functools.partial(gather_learner_states, parallel),
        on_main=parallel.on_main,
    )


def _announce(s: Session, resume: bool) -> None:
    """Say what runs, and from where it resumes; on resume, rewrite the best model's files."""
    info, state, device = s.splits.info, s.state, s.parallel.device
    precision = resolve_precision(s.config.precision, device)
    s.echo(
        f"run {s.run.path} · {s.config.name} · {len(s.learners)} learner(s) "
        f"({', '.join(f'{learner.name}:{learner.task.name}' for learner in s.learners)}) · "
        f"{s.config.model.name} · "
        f"{info.name} train {len(s.splits.train)} / val {len(s.splits.val)} / "
        f"test {len(s.splits.test)} · {device} {precision}{s.parallel.describe()}"
    )
    if resume and state.step:
        s.echo(
            f"resuming at epoch {state.epoch}, batch {state.batch}/{len(s.batches)} "
            f"(step {state.step}) from {s.checkpoints.latest}"
        )
    if resume and state.best is not None and s.parallel.is_main:
        # The files may be newer than the checkpoint (killed between the two writes), or torn:
        # the checkpoint's copy is the one this run continues from.
        _save_best(s)


def _plugin_records(config: Config, spec: dict[str, Any]) -> dict[str, Any]:
    """The user code this run depends on, keyed by the setting that names it."""
    records = {
        "model.name": spec.get("source"),
        "data.dataset": dataset_source(config.data.dataset),
    }
    return {key: record for key, record in records.items() if record is not None}


def _train_epoch(s: Session, epoch: int, stop: StopRequest, progress: bool) -> None:
    """One epoch from the state's (epoch, batch) position: steps, then validate, log, save."""
    config, state, parallel, checkpoints = s.config, s.state, s.parallel, s.checkpoints
    epoch_started = time.perf_counter()
    plan = epoch_plan(config, [learner.gamma for learner in s.learners], epoch)
    bar = tqdm(
        s.source.epoch(epoch, start_batch=state.batch),
        initial=state.batch,
        total=len(s.batches),
        desc=f"epoch {epoch}/{config.epochs}",
        leave=False,
        disable=not progress,
        unit="batch",
    )
    for batch in bar:
        x, y = s.batch(batch)
        losses = generalist_step(
            s.here,
            s.merge,
            x,
            y,
            position=schedule_position(
                config.schedule_granularity, epoch, state.batch + 1, len(s.batches)
            ),
            step=state.step,
            plan=plan,
            settle_losses=s.settle_losses,
        )
        state.record_step(losses)
        signum, due = parallel.agree(  # every rank stops or saves at the same step
            stop.signum or 0, state.batch < len(s.batches) and checkpoints.due()
        )
        if signum:
            saved = checkpoints.save(signal.Signals(signum).name)
            raise _interrupted(saved, signum, state, len(s.batches), s.run.path)
        if due:
            checkpoints.save("schedule")
    end_epoch(s.merge, plan)
    record = _epoch_record(state, epoch, plan, epoch_started, config.schedule_granularity)
    validated = len(s.splits.val) > 0  # data.val_size: 0 validates and selects nothing
    if validated and (epoch % config.eval.every == 0 or epoch == config.epochs):
        state.val = record["val"] = _validate(s)
        if _select(s, epoch):
            record["selected"] = True
    if epoch == 1:
        _warn_at_chance_level(s, record.get("val", {}))
    state.finish_epoch(record)
    if parallel.is_main:
        s.run.append_metrics(record)
    saved = checkpoints.save("epoch end")
    s.echo(_epoch_line(record, config.epochs))
    (signum,) = parallel.agree(stop.signum or 0)
    if signum:
        raise _interrupted(saved, signum, state, len(s.batches), s.run.path)


def _warn_at_chance_level(s: Session, val: dict[str, dict[str, float]]) -> None:
    """After the first epoch: name each learner whose loss is still a uniform guess (and, if
    validated, its clean accuracy too)."""
    names = [learner.name for learner in s.state.learners]
    clean = {name: accuracies["clean"] for name, accuracies in val.items()}
    if len(names) == 1 and GLOBAL in clean:  # one learner: the global model is its EMA
        clean.setdefault(names[0], clean[GLOBAL])
    for line in chance_level_warnings(
        s.state.epoch_losses, names, s.splits.info.num_classes, s.config.model.name, clean
    ):
        s.echo(line)


def _select(s: Session, epoch: int) -> bool:
    """Keep the validated global model as ``model-best`` if it beats the best so far
    (``eval.select``); True if it did. Every rank decides alike (same validation sums)."""
    evaluation = s.config.eval
    val = s.state.val[GLOBAL]
    score = selection_score(evaluation.select, val, evaluation.select_min_clean)
    if not s.state.offer_best(epoch, score, val):
        return False
    if s.parallel.is_main:
        _save_best(s)
    return True


def _best_model(s: Session) -> nn.Module:
    """A fresh model of the run's architecture holding the best weights (not a deep copy of
    the live global model, which may be compiled in place)."""
    kwargs = dict(s.spec)
    model = create_model(kwargs.pop("name"), **kwargs)
    model.load_state_dict(s.state.best.weights)
    return model.to(s.parallel.device, memory_format=_memory_format(s.config)).eval()


def _save_best(s: Session) -> None:
    best = s.state.best
    save_model(
        _best_model(s),
        s.run.path,
        {
            **_weights_spec(s),
            "selected": {"criterion": s.config.eval.select, "split": "val", **best.describe()},
        },
        stem=BEST_STEM,
    )


def _weights_spec(s: Session) -> dict[str, Any]:
    return {"model": s.spec, "dataset": s.splits.info.name, "preset": s.config.preset}


def _finish(s: Session, started: float) -> TrainResult:
    """Test the last global model (and the best one), save it and the summary."""
    config, splits = s.config, s.splits
    test = _test(s, s.global_model)
    best = None
    if s.state.best is not None:
        best = {
            "criterion": config.eval.select,
            "file": f"{BEST_STEM}.safetensors",
            **s.state.best.describe(),
            "test": _test(s, _best_model(s)),
        }
    seconds = time.perf_counter() - started
    if s.parallel.is_main:
        save_model(s.global_model, s.run.path, _weights_spec(s))
        test_examples = min(len(splits.test), config.eval.test_examples or len(splits.test))
        s.run.write_json(
            "summary.json",
            {
                "name": config.name,
                "preset": config.preset,
                "model": "last",
                "test": test,
                "val": s.state.val,
                "best": best,
                "test_examples": test_examples,
                "test_pgd_steps": config.eval.test_steps,
                "seconds": seconds,
            },
        )
    s.echo(f"test ({config.eval.test_steps}-step PGD), last: " + _format_accuracies(test))
    if best is not None:
        s.echo(
            f"test, best on validation (epoch {best['epoch']}, {best['criterion']}): "
            + _format_accuracies(best["test"])
        )
    s.echo(f"saved {s.run.weights_path} in {seconds:.0f} s")
    return TrainResult(s.run, test, s.state.val, seconds, best, s.global_model.eval())


def _epoch_record(
    state: TrainingState,
    epoch: int,
    plan: EpochPlan,
    epoch_started: float,
    granularity: str,
) -> dict[str, Any]:
    """The epoch's metrics line; a learner's loss is the mean over the batches it trained on.

    ``lr`` is the value the epoch's last step used, which with ``schedule_granularity: epoch``
    is the one every step of it used; per step, ``lr_first`` adds the first step's value.
    """
    finite = torch.isfinite(state.epoch_losses)
    trained = finite.sum(dim=0)
    losses = (torch.where(finite, state.epoch_losses, 0).sum(dim=0) / trained).tolist()
    names = [learner.name for learner in state.learners]
    batches = len(state.epoch_losses)
    first, last = (schedule_position(granularity, epoch, n, batches) for n in (1, batches))
    record: dict[str, Any] = {
        "epoch": epoch,
        "step": state.step,
        "lr": {learner.name: learner.lr_schedule(last) for learner in state.learners},
    }
    if granularity == "step":
        record["lr_first"] = {
            learner.name: learner.lr_schedule(first) for learner in state.learners
        }
    record |= {
        "gamma": dict(zip(names, plan.gammas, strict=True)),
        "redistributed": plan.redistribute,
        "train_loss": dict(zip(names, losses, strict=True)),
        "train_seconds": time.perf_counter() - epoch_started,
    }
    skipped = (len(state.epoch_losses) - trained).tolist()
    if any(skipped):
        record["skipped_batches"] = dict(zip(names, skipped, strict=True))
    return record


def _nonfinite(losses: torch.Tensor, s: Session, batches_per_epoch: int) -> None:
    """Stop at a NaN/inf loss, or (``checkpoint.on_nonfinite: skip``) report the skipped batch.

    Skipping only helps against a bad batch. A learner whose weights are no longer finite, or
    whose loss stayed non-finite for :data:`SKIP_LIMIT` batches in a row (weights so large that
    every batch overflows), cannot recover that way, so the run stops then too.
    """
    state, config, checkpoints = s.state, s.config, s.checkpoints
    batch = f"batch {state.batch + 1}/{batches_per_epoch}"
    where = f"step {state.step + 1} (epoch {state.epoch}, {batch})"
    skip = config.checkpoint.on_nonfinite == "skip"
    limit = min(SKIP_LIMIT, batches_per_epoch)
    broken = _weights_nonfinite(s) if skip else None  # every rank takes this branch alike
    for i in torch.nonzero(~torch.isfinite(losses)).flatten().tolist():
        learner = state.learners[i]
        value = float(losses[i])
        cause = ""
        if skip:
            earlier = state.epoch_losses[max(0, state.batch - limit + 1) : state.batch, i]
            if len(earlier) == limit - 1 and not bool(torch.isfinite(earlier).any()):
                cause = f" for the {limit}th batch in a row, so skipping batches is not helping"
            elif broken is not None and bool(broken[i]):
                cause = " and its weights are no longer finite, so skipping batches cannot help"
            else:
                s.echo(
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


def _weights_nonfinite(s: Session) -> torch.Tensor:
    """Whether each learner's weights hold a NaN/inf, agreed over the processes."""
    here = [
        ~torch.stack([torch.isfinite(p).all() for p in learner.model.parameters()]).all()
        for learner in s.here
    ]
    return s.parallel.gather_flags(torch.stack(here)).cpu()


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


def _validate(s: Session) -> dict[str, dict[str, float]]:
    """Clean and PGD accuracy on the validation split: the global learner (and the base
    learners with ``eval.learners``)."""
    models = {GLOBAL: s.global_model}
    if s.config.eval.learners:
        models.update({learner.name: learner.model for learner in s.learners})
    return _accuracies(s, models, s.splits.val, s.config.eval.val_steps)


def _test(s: Session, model: nn.Module) -> dict[str, float]:
    """A global model on the test split (its first ``eval.test_examples`` points)."""
    test = s.splits.test
    if s.config.eval.test_examples is not None:
        test = test.subset(torch.arange(min(s.config.eval.test_examples, len(test))))
    return _accuracies(s, {GLOBAL: model}, test, s.config.eval.test_steps)[GLOBAL]


def _accuracies(
    s: Session, models: dict[str, nn.Module], data: ImageDataset, steps: int
) -> dict[str, dict[str, float]]:
    """Each model on the shard of ``data`` this process evaluates it on, summed over them."""
    names = [learner.name for learner in s.learners]  # any other name is the global model
    return summed_accuracies(
        models,
        data,
        s.threats,
        shard_of=lambda name: s.parallel.eval_shard(names.index(name) if name in names else None),
        sum_counts=s.parallel.sum_counts,
        device=s.parallel.device,
        steps=steps,
        batch_size=s.config.data.eval_batch_size,
        seed=s.config.seed,
    )


def _format_accuracies(acc: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.1f}%" for name, value in acc.items())


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    losses = " ".join(f"{k} {v:.3f}" for k, v in record["train_loss"].items())
    line = f"epoch {record['epoch']}/{epochs} loss {losses}"
    if GLOBAL in record.get("val", {}):
        line += f" | val {GLOBAL} " + _format_accuracies(record["val"][GLOBAL])
    line += f" | {record['train_seconds']:.1f} s"
    line += " | redistributed" if record["redistributed"] else ""
    return line + (" | best so far" if record.get("selected") else "")
