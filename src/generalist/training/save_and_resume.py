"""When the loop saves its state, and how a run picks up from a checkpoint.

Saves happen every ``checkpoint.every_steps`` steps and ``every_minutes`` minutes inside an
epoch, at every epoch's end, and when a signal asks the run to stop. Resuming takes the newest
checkpoint that reads back intact (damaged newer ones are set aside as ``*.corrupt``, with a
warning naming the fault), checks that it belongs to this config and this data, restores every
tensor and RNG, and rewrites ``metrics.jsonl`` from the checkpoint's own records, so no epoch
is logged twice or lost.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from generalist.checkpoint import Checkpoint, CheckpointStore
from generalist.config import Config, build_config, canonical_tasks, read_config_file
from generalist.errors import CheckpointError, ConfigError
from generalist.rundir import RunDir
from generalist.training.signals import resume_hint
from generalist.training.state import TrainingState, capture, restore

RESUMABLE = ("epochs", "device", "threads", "checkpoint", "logging")
"""What a resumed run may change: how long it trains, on which device and how many CPU threads,
how it saves and logs."""
IRRELEVANT_ON_RESUME = ("name", "out_dir", "description")
"""Where a new run would go; a resumed one stays in its own directory."""


class Checkpointer:
    """Saves the training state on schedule and remembers the last good checkpoint.

    Under torchrun, ``collect`` first brings every learner's state into this process's copy
    and ``on_main`` runs the write on rank 0 only, handing every rank its path (or its error);
    alone, both do nothing special.
    """

    def __init__(
        self,
        store: CheckpointStore,
        state: TrainingState,
        config: Config,
        run: RunDir,
        data_fingerprint: str,
        *,
        collect: Callable[[TrainingState], None] | None = None,
        on_main: Callable[[Callable[[], Path]], Path] | None = None,
    ) -> None:
        self.collect = collect
        self.on_main = on_main or (lambda work: work())
        self.store = store
        self.state = state
        self.config = config
        self.run = run
        self.data_fingerprint = data_fingerprint
        self.latest = store.latest()
        self._saved_at = time.monotonic()

    def due(self) -> bool:
        """Whether the step just taken should be followed by a save (inside an epoch)."""
        every = self.config.checkpoint.every_steps
        minutes = self.config.checkpoint.every_minutes
        by_steps = every is not None and self.state.step % every == 0
        by_time = minutes is not None and time.monotonic() - self._saved_at >= 60 * minutes
        return by_steps or by_time

    def save(self, reason: str) -> Path:
        """Write a checkpoint; a failed write (a full disk) stops the run, naming the last
        good checkpoint, which the atomic write left intact."""
        if self.collect is not None:
            self.collect(self.state)
        self.latest = self.on_main(lambda: self._write(reason))
        self._saved_at = time.monotonic()
        return self.latest

    def _write(self, reason: str) -> Path:
        tensors, meta = capture(self.state)
        meta.update(
            reason=reason,
            written=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            config=self.config.to_dict(),
            data={"train": self.data_fingerprint},
        )
        try:
            record = self.store.save(self.state.step, self.state.epoch, tensors, meta)
        except OSError as exc:
            raise CheckpointError(
                f"could not write a checkpoint to {self.store.directory} "
                f"({exc.strerror or exc}); {self.last_good()}; free some space, then "
                f"{resume_hint(self.run.path)}"
            ) from None
        self.latest = record
        self._saved_at = time.monotonic()
        return record

    @contextmanager
    def reporting_write_errors(self) -> Iterator[None]:
        """A failed write elsewhere in the run directory (metrics, weights, summary on a full
        disk) becomes one line naming the last good checkpoint, not a traceback."""
        try:
            yield
        except OSError as exc:
            raise CheckpointError(
                f"could not write {exc.filename or f'into {self.run.path}'} "
                f"({exc.strerror or exc}); {self.last_good()}; free some space, then "
                f"{resume_hint(self.run.path)}"
            ) from None

    def last_good(self) -> str:
        if self.latest is None:
            return "no checkpoint had been written yet"
        return f"the last good checkpoint is {self.latest}"


def resume_state(
    state: TrainingState,
    store: CheckpointStore,
    run: RunDir,
    config: Config,
    data_fingerprint: str,
    echo: Any,
) -> Path | None:
    """Load the newest intact checkpoint of ``run`` into ``state``; None if it has none yet."""
    fresh: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def fits(checkpoint: Checkpoint) -> str:
        """Restore ``checkpoint``; what does not fit ("" if all does) puts the fresh state back."""
        if not isinstance(checkpoint.meta.get("config"), dict):
            return "has no config"
        if _refusal(checkpoint, run, config, data_fingerprint, state) is not None:
            return ""  # refused below, and kept: it may be right for another config or device
        if not fresh:
            fresh.append(_snapshot(state))
        try:
            restore(state, checkpoint.tensors, checkpoint.meta)
        except CheckpointError as misfit:
            restore(state, *fresh[0])
            return str(misfit)
        return ""

    checkpoint, rejected = store.newest_readable(fits)
    for bad in rejected:
        store.quarantine(bad.record)
        echo(f"warning: {bad}; set aside as {bad.record.name}.corrupt")
    if checkpoint is None:
        echo(f"{run.path} has no checkpoint yet: training it from the beginning")
        run.write_metrics([])
        return None
    refusal = _refusal(checkpoint, run, config, data_fingerprint, state)
    if refusal is not None:
        raise refusal
    _check_epochs(state.epoch - 1, config, run)
    run.write_metrics(state.metrics)
    if rejected:
        echo(f"resuming from the previous checkpoint {checkpoint.record.name} instead")
    return checkpoint.record


def _snapshot(state: TrainingState) -> tuple[dict[str, Any], dict[str, Any]]:
    """``state`` as a checkpoint holds it (tensors copied to the CPU, the JSON through JSON),
    to put back after a checkpoint that did not fit."""
    tensors, meta = capture(state)
    copies = {key: tensor.detach().to("cpu", copy=True) for key, tensor in tensors.items()}
    return copies, json.loads(json.dumps(meta))


def _refusal(
    checkpoint: Checkpoint, run: RunDir, config: Config, data_fingerprint: str, state: TrainingState
) -> CheckpointError | None:
    """Why ``checkpoint``, intact, is not this run's to continue: another config, other data or
    another device. Such a checkpoint is refused, not set aside."""
    meta = checkpoint.meta
    difference = config_difference(meta.get("config", {}), config.to_dict())
    if difference:
        return CheckpointError(_config_refusal(checkpoint.record, meta, run, difference))
    data = meta.get("data")
    if not isinstance(data, dict) or data.get("train") != data_fingerprint:
        return CheckpointError(
            f"{checkpoint.record} was trained on other data than {config.data.dataset} in "
            f"{config.data.data_dir or 'its default location'} holds now; resume with the "
            "same dataset files"
        )
    device = meta.get("generator_device")
    if device in ("cpu", "cuda", "mps") and device != state.device.type:
        return CheckpointError(
            f"{checkpoint.record} was written on {device} and this run is on "
            f"{state.device.type}; resume with --device {device} to continue exactly"
        )
    return None


def _check_epochs(finished: int, config: Config, run: RunDir) -> None:
    if finished > config.epochs:
        raise ConfigError(
            f"epochs: {config.epochs} is fewer than the {finished} epochs {run.path} has "
            "already finished"
        )
    if finished == config.epochs and run.summary_path.is_file():
        raise ConfigError(
            f"{run.path} already finished all {finished} epochs; to train it longer: "
            f"generalist train --resume {run.path} --epochs N"
        )


def resume_config(run_dir: str | Path, given: Config | None, overrides: list[str]) -> Config:
    """The config to resume ``run_dir`` with: its own, with ``overrides`` applied.

    A config built from presets/files (``given``) or overrides may only change what
    :data:`RESUMABLE` lists; anything else would silently make the run something other than
    what its first half trained, so it is refused, naming the first differing key.
    """
    run = RunDir.open(run_dir)
    saved = build_config(user_yaml=run.config_path)
    wanted = (
        given if given is not None else build_config(user_yaml=run.config_path, overrides=overrides)
    )
    difference = config_difference(saved.to_dict(), wanted.to_dict())
    if difference:
        raise ConfigError(
            f"--resume {run.path}: {difference}; a resumed run keeps its config (only "
            "epochs, device, threads, checkpoint.* and logging.* may change), so start a new run to"
            " change it"
        )
    for key in IRRELEVANT_ON_RESUME:
        setattr(wanted, key, getattr(saved, key))
    return wanted


def _config_refusal(record: Path, meta: dict[str, Any], run: RunDir, difference: str) -> str:
    """Why a checkpoint's config differs from the run's, and what to do.

    Either config.yaml was edited since the checkpoint, or it still says what the checkpoint
    says and this version of generalist-at reads it differently (a run started before a
    recipe change, such as docs/algorithm.md's per-epoch schedules). Resuming the latter would
    switch recipes mid-run, so both are refused; only the advice differs."""
    try:
        on_disk = read_config_file(run.config_path)
    except (OSError, ConfigError):
        on_disk = None
    saved = meta.get("config")
    if on_disk is not None and isinstance(saved, dict) and not config_difference(saved, on_disk):
        return (
            f"{record} was written by an earlier version of generalist-at, which read "
            f"{run.config_path.name} differently ({difference}); resuming with this version "
            "would change the recipe mid-run, so finish it with the version its manifest.json "
            f"names, or start a new run: generalist train --config {run.config_path}"
        )
    return (
        f"{record} was written with another config ({difference}); "
        "config.yaml was edited since, so restore it or start a new run"
    )


def config_difference(saved: dict[str, Any], wanted: dict[str, Any]) -> str:
    """``"key: saved vs wanted"`` for the first differing key outside the resumable ones.

    Both are read as today's config reads them (:func:`canonical_tasks`): a run whose config
    was written with flat task parameters (``beta: 6`` beside the attack) still resumes."""
    return _difference(canonical_tasks(saved), canonical_tasks(wanted))


def _difference(saved: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> str:
    for key in list(saved) + [k for k in wanted if k not in saved]:
        dotted = f"{prefix}{key}"
        if dotted in RESUMABLE + IRRELEVANT_ON_RESUME:
            continue
        old, new = saved.get(key), wanted.get(key)
        if old is None and key not in saved and isinstance(new, dict):
            old = {}  # a section added since the run started: equal if it holds only nulls
        if isinstance(old, dict) and isinstance(new, dict):
            inner = _difference(old, new, f"{dotted}.")
            if inner:
                return inner
        elif old != new:
            return f"{dotted} is {_as_yaml(new)} here but {_as_yaml(old)} in the run"
    return ""


def _as_yaml(value: Any) -> str:
    """A config value as the user wrote it in YAML (a schedule reads as one, not as a dict)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("...\n").strip()
