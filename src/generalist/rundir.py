"""The run directory: everything a finished (or killed) training run leaves behind.

```
runs/<name>-<YYYYmmdd-HHMMSS>/
  config.yaml        the fully resolved config (re-running it reproduces the run)
  metrics.jsonl      one JSON object per epoch: losses, lr, γ, validation accuracies
  manifest.json      software versions, device, seeds, data fingerprints, git commit, resumes
  checkpoints/       the complete training state, newest few (generalist.training.state)
  model.safetensors  the global learner's weights (safetensors: loading runs no code)
  model.json         how to rebuild the architecture, the dataset it was trained on, a hash
  summary.json       final test-set accuracies and timings
  tensorboard/       the metrics as TensorBoard scalars, if ``logging.tensorboard`` is on
  .lock              locked by the process writing the run; says its PID and host
```
Files are written atomically (temp file + rename), so a crash never leaves a half-written one,
and never through a symbolic link (:mod:`generalist.durable`). A process that writes into a run
directory holds its lock (:mod:`generalist.runlock`) until it exits, so two processes never
write one run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from generalist.config.schema import Config
from generalist.durable import append_text, write_text_durably
from generalist.errors import CheckpointError
from generalist.runlock import LOCK_FILE, lock_folder, release_folder

RUN_ADVICE = "a separate run needs its own folder: generalist train without --resume"


_created: list[Path] = []
"""Run directories this process made, for :func:`discard_unstarted_runs`."""


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.metrics_sinks: list[Callable[[dict[str, Any]], None]] = []
        """Called with every record after it is in metrics.jsonl (e.g. TensorBoard: training
        attaches them, see :func:`generalist.tensorboard.metrics_sinks`)."""

    @classmethod
    def create(cls, out_dir: str | Path, name: str) -> RunDir:
        """A fresh directory; an existing run is never overwritten (a suffix is added)."""
        base = Path(out_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        path.mkdir(parents=True)
        _created.append(path)
        lock_folder(path, "run", RUN_ADVICE)
        return cls(path)

    @classmethod
    def open(cls, path: str | Path, *, lock: bool = True) -> RunDir:
        """An existing run directory, e.g. one to resume; ``lock=False`` only to read it."""
        run = cls(Path(path))
        if not run.path.exists():
            raise CheckpointError(
                f"{run.path} does not exist; pass the folder that `generalist train` printed "
                "after 'run'"
            )
        if not run.config_path.is_file():
            raise CheckpointError(
                f"{run.path} is not a run directory (it has no config.yaml); pass the folder "
                "that `generalist train` printed after 'run'"
            )
        if lock:
            lock_folder(run.path, "run", RUN_ADVICE)
        return run

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def checkpoints_path(self) -> Path:
        return self.path / "checkpoints"

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def weights_path(self) -> Path:
        return self.path / "model.safetensors"

    def write_config(self, config: Config) -> None:
        write_text_durably(self.config_path, config.to_yaml())

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        """Replace metrics.jsonl, e.g. with a checkpoint's records so a resumed run never
        repeats or loses an epoch's line."""
        write_text_durably(self.metrics_path, "".join(json.dumps(r) + "\n" for r in records))

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_text(self.metrics_path, json.dumps(record) + "\n")
        for sink in self.metrics_sinks:
            sink(record)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        write_text_durably(self.path / name, json.dumps(data, indent=2) + "\n")


def discard_unstarted_runs() -> list[Path]:
    """Remove the run folders this process made that hold nothing but the lock (and an empty
    ``checkpoints/``), e.g. after a full disk refused the first file: a folder without
    config.yaml is no run, and ``--resume`` would only refuse it. Returns what was removed."""
    removed = []
    while _created:
        path = _created.pop()
        if (path / "config.yaml").exists() or not path.is_dir():
            continue
        checkpoints = path / "checkpoints"
        extra = {p.name for p in path.iterdir()} - {LOCK_FILE, "checkpoints"}
        if extra or (checkpoints.is_dir() and any(checkpoints.iterdir())):
            continue
        if checkpoints.is_dir():
            checkpoints.rmdir()
        release_folder(path)
        (path / LOCK_FILE).unlink(missing_ok=True)
        path.rmdir()
        removed.append(path)
    return removed
