"""Tiny real training runs shared by the resume, fault and safe-loading tests.

Generalist-D (natural + ℓ∞ learner) on 256 digits, tiny-cnn, batch 32: 8 steps per epoch,
3 epochs, about a second of training on one CPU thread.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

from generalist.config import Config, build_config
from generalist.training import loop
from generalist.training.generalist import GeneralistMerge

TINY_DATA = [
    "device=cpu",  # also where a GPU is visible: the runs fork and compare CPU bits
    "threads=1",  # CPU results depend on the thread count; the runs compare bits across processes
    "model.name=tiny-cnn",
    "data.train_limit=256",
    "data.test_limit=128",
    "data.val_size=64",
    "eval.val_steps=2",
    "eval.test_steps=3",
]
"""A tiny model on a few hundred digits with short evaluations: every test run's base."""
TINY = [*TINY_DATA, "data.batch_size=32", "epochs=3"]
STEPS_PER_EPOCH = 8
TOTAL_STEPS = 3 * STEPS_PER_EPOCH
CHECKPOINT_NAME = re.compile(r"step-(\d+)-epoch-(\d+)\.json")


def quiet(*_: Any) -> None:
    """An ``echo`` that drops the loop's progress lines."""


def tiny_config(out: Path, *extra: str, preset: str = "quickstart") -> Config:
    return build_config(preset, dataset="digits", overrides=[*TINY, f"out_dir={out}", *extra])


def tiny_cli(out: Path, *extra: str) -> list[str]:
    """``generalist train`` arguments for the same run as :func:`tiny_config`."""
    sets = [arg for item in (*TINY, *extra) for arg in ("--set", item)]
    return ["train", "--preset", "quickstart", "--dataset", "digits", *sets, "--out", str(out)]


def train_tiny(out: Path, *extra: str, preset: str = "quickstart") -> Path:
    """Train a tiny run in this process; returns its run directory."""
    return loop.train(tiny_config(out, *extra, preset=preset), progress=False, echo=quiet).run.path


def only_run(out: Path) -> Path:
    (run,) = [p for p in Path(out).iterdir() if p.is_dir()]
    return run


def checkpoint_steps(run: Path) -> list[int]:
    """Steps of the complete checkpoints in ``run``, oldest first."""
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    matches = (CHECKPOINT_NAME.fullmatch(p.name) for p in folder.iterdir())
    return sorted(int(m[1]) for m in matches if m)


def comparable_metrics(run: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without its wall-clock field, the one thing a resume may change."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "train_seconds"} for r in records]


def assert_same_result(run: Path, reference: Path) -> None:
    """Bit-identical final and best weights, identical metrics, selection and test accuracies."""
    for weights in ("model.safetensors", "model-best.safetensors", "model-best.json"):
        assert (run / weights).read_bytes() == (reference / weights).read_bytes(), weights
    assert comparable_metrics(run) == comparable_metrics(reference)
    summary = json.loads((run / "summary.json").read_text())
    expected = json.loads((reference / "summary.json").read_text())
    assert (summary["test"], summary["best"]) == (expected["test"], expected["best"])


@contextmanager
def sigterm_at_step(step: int) -> Iterator[None]:
    """Send this process SIGTERM while step ``step`` (1-based) is being merged, as a cluster
    preempting the job would, at a point chosen exactly."""
    original = GeneralistMerge.update

    def update(self: GeneralistMerge, t: int, gammas: list[float]) -> float:
        if t + 1 == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, t, gammas)

    with mock.patch.object(GeneralistMerge, "update", update):
        yield


def spawn_cli(args: list[str]) -> subprocess.Popen:
    """``python -m generalist ARGS`` on one CPU thread, as a separate process to be killed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "generalist", *args, "--no-progress"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
