"""Bad input and faults: damaged checkpoints, a full disk, NaN losses, bad configs, bad data.

Each test checks what the user sees (one line naming the file, step or index, and what to do)
and that nothing good was lost.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import io
import json
import math
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from training_runs import (
    assert_same_result,
    checkpoint_steps,
    only_run,
    quiet,
    sigterm_at_step,
    tiny_cli,
    tiny_config,
    train_tiny,
)

from generalist import durable as durable_module
from generalist.checkpoint import CheckpointStore
from generalist.cli import main
from generalist.config import build_config
from generalist.data import load_splits
from generalist.errors import CheckpointError, ConfigError, DataError, TrainingError
from generalist.rundir import RunDir
from generalist.schedules import PiecewiseLinear
from generalist.training import loop
from generalist.training.learner import Learner
from generalist.training.signals import TrainingInterrupted
from generalist.training.tasks.natural import NaturalTask


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped by SIGTERM at step 13 (epoch 2, batch 5) with a checkpoint after every
    step, the last three kept; tests damage copies of it."""
    config = tiny_config(
        tmp_path_factory.mktemp("stopped"), "checkpoint.every_steps=1", "checkpoint.keep=3"
    )
    with (
        contextlib.redirect_stderr(io.StringIO()),  # the "SIGTERM received" notice
        sigterm_at_step(13),
        pytest.raises(TrainingInterrupted) as stopped,
    ):
        loop.train(config, progress=False, echo=quiet)
    return stopped.value.run


def _copy(run: Path, tmp_path: Path) -> Path:
    return shutil.copytree(run, tmp_path / run.name)


def _record(run: Path, step: int) -> Path:
    (record,) = (run / "checkpoints").glob(f"step-{step:09d}-*.json")
    return record


# --- damaged checkpoints ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda r: _truncate(r.with_suffix(".safetensors")), id="truncated-tensors"),
        pytest.param(lambda r: r.write_text('{"format": "generalist-chec'), id="torn-json"),
        pytest.param(lambda r: r.with_suffix(".safetensors").unlink(), id="lost-tensors"),
        pytest.param(
            lambda r: r.write_text(r.read_text().replace('"batch": 5', '"batch": 4')),
            id="edited-json",
        ),
    ],
)
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    tmp_path, reference, stopped_run, capsys, damage
):
    run = _copy(stopped_run, tmp_path)
    newest = _record(run, 13)
    damage(newest)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"warning: checkpoint {re.escape(str(newest))} .+; set aside as", out)
    assert "resuming from the previous checkpoint step-000000012-epoch-0002.json" in out
    assert (newest.parent / (newest.name + ".corrupt")).exists()
    assert_same_result(run, reference)  # the older checkpoint resumes exactly too


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_every_checkpoint_damaged_is_one_error_naming_each_file(tmp_path, stopped_run, capsys):
    run = _copy(stopped_run, tmp_path)
    for step in (11, 12):
        _truncate(_record(run, step).with_suffix(".safetensors"))
    _record(run, 13).write_bytes(b"\x00" * 10)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no readable checkpoint in {run / 'checkpoints'}: ")
    assert "step-000000013-epoch-0002.json is not valid JSON" in err
    assert "step-000000012-epoch-0002.json does not match step-000000012-epoch-0002" in err
    assert "step-000000011-epoch-0002.json does not match" in err
    assert err.endswith(f"start it again: generalist train --config {run / 'config.yaml'}\n")
    assert err.count("\n") == 1


def test_resume_refuses_a_checkpoint_whose_config_was_edited(tmp_path, stopped_run, capsys):
    run = _copy(stopped_run, tmp_path)
    config = RunDir.open(run).config_path
    config.write_text(config.read_text().replace("train_limit: 256", "train_limit: 255"))
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "step-000000013-epoch-0002.json was written with another config" in err
    assert "data.train_limit is 255 here but 256 in the run" in err


def test_resume_refuses_a_run_of_an_earlier_version_and_says_so(tmp_path, stopped_run, capsys):
    """A run started before a recipe change: config.yaml and the checkpoint still agree, but
    this version reads them differently (here the unit-less ``every: 5`` of before issue 17,
    which now reads as the exact number '5'). Not 'edited', and nothing is overwritten."""

    def as_before(config: dict) -> None:
        redistribute = config["merge"]["redistribute"]
        redistribute.pop("unit")
        redistribute["every"] = 5

    run = _copy(stopped_run, tmp_path)
    store = CheckpointStore(run / "checkpoints", keep=3)
    newest = store.read(_record(run, 13))
    meta = {k: v for k, v in newest.meta.items() if k not in ("format", "tensors")}
    as_before(meta["config"])
    store.save(13, 2, newest.tensors, meta)
    config_path = RunDir.open(run).config_path
    config = yaml.safe_load(config_path.read_text())
    as_before(config)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def files() -> dict[Path, bytes]:
        return {
            path.relative_to(run): path.read_bytes() for path in run.rglob("*") if path.is_file()
        }

    before = files()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {_record(run, 13)} was written by an earlier version of generalist-at, which "
        "read config.yaml differently (merge.redistribute.every is '5' here but 5 in the run); "
        "resuming with this version would change the recipe mid-run, so finish it with the "
        "version its manifest.json names, or start a new run: generalist train --config "
        f"{config_path}\n"
    )
    assert files() == before


def test_resume_refuses_a_checkpoint_of_other_data(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz", _images(), np.arange(20) % 4)
    settings = ["model.name=tiny-cnn", "epochs=2", "data.batch_size=4", "data.val_size=0"]
    overrides = [*settings, f"data.data_dir={data}", f"out_dir={tmp_path / 'out'}"]
    config = build_config("standard", dataset="npz", overrides=overrides)
    with sigterm_at_step(3), pytest.raises(TrainingInterrupted) as stopped:
        loop.train(config, progress=False, echo=quiet)
    x = _images()
    x[0, 0, 0, 0] = 1 - x[0, 0, 0, 0]  # one pixel of the file changes
    _npz(data, x, np.arange(20) % 4)
    capsys.readouterr()
    assert main(["train", "--resume", str(stopped.value.run), "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        f"error: {stopped.value.checkpoint} was trained on other data than npz in {data} holds "
        "now; resume with the same dataset files\n"
    )


# --- a full disk --------------------------------------------------------------------------


class _FullDisk:
    """A file whose disk fills up half-way through the write."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()

    def write(self, data: bytes) -> int:
        self.handle.write(data[: len(data) // 2])
        self.handle.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failing", [".safetensors", ".json"])
def test_full_disk_while_saving_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, reference, failing
):
    real_open = durable_module.open_new

    def open_on_a_filling_disk(path):
        handle = real_open(path)
        if Path(path).name == f".step-000000005-epoch-0001{failing}.tmp":
            return _FullDisk(handle)
        return handle

    monkeypatch.setattr(durable_module, "open_new", open_on_a_filling_disk)
    config = tiny_config(tmp_path / "out", "checkpoint.every_steps=1")
    with pytest.raises(CheckpointError) as failed:
        loop.train(config, progress=False, echo=quiet)
    run = only_run(tmp_path / "out")
    previous = run / "checkpoints" / "step-000000004-epoch-0001.json"
    assert str(failed.value) == (
        f"could not write a checkpoint to {run / 'checkpoints'} (No space left on device); "
        f"the last good checkpoint is {previous}; free some space, then "
        f"continue with: generalist train --resume {run}"
    )
    newest, rejected = CheckpointStore(run / "checkpoints").newest_readable()
    assert newest.record == previous and rejected == []
    assert not list((run / "checkpoints").glob(".*.tmp"))
    monkeypatch.undo()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same_result(run, reference)


def test_full_disk_while_logging_is_one_line_naming_the_last_checkpoint(tmp_path, monkeypatch):
    append = RunDir.append_metrics

    def append_on_a_full_disk(self, record):
        if record["epoch"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.metrics_path))
        append(self, record)

    monkeypatch.setattr(RunDir, "append_metrics", append_on_a_full_disk)
    with pytest.raises(CheckpointError) as failed:
        loop.train(tiny_config(tmp_path), progress=False, echo=quiet)
    run = only_run(tmp_path)
    assert str(failed.value) == (
        f"could not write {run / 'metrics.jsonl'} (No space left on device); the last good "
        f"checkpoint is {run / 'checkpoints' / 'step-000000008-epoch-0002.json'}; free some "
        f"space, then continue with: generalist train --resume {run}"
    )


# --- non-finite losses ----------------------------------------------------------------------


def test_nan_loss_stops_naming_step_learner_and_last_good_checkpoint(tmp_path):
    config = tiny_config(tmp_path, "checkpoint.every_steps=1", "learners.natural.optimizer.lr=1e30")
    with pytest.raises(TrainingError) as stopped:
        loop.train(config, progress=False, echo=quiet)
    message = str(stopped.value)
    found = re.fullmatch(
        r"learner natural had a non-finite loss \((nan|inf)\) at step (\d+) \(epoch 1, batch "
        r"\d/8\); stopped without saving it, the last good checkpoint is (\S+); lower its "
        r"learning rate \(learners\.natural\.optimizer\.lr\) in a new run, or skip such "
        r"batches: generalist train --resume (\S+) --set checkpoint\.on_nonfinite=skip",
        message,
    )
    assert found, message
    step, record = int(found[2]), Path(found[3])
    assert record.name == f"step-{step - 1:09d}-epoch-0001.json"
    assert checkpoint_steps(record.parent.parent)[-1] == step - 1
    tensors = load_file(record.with_suffix(".safetensors"))
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_nan_loss_with_skip_skips_that_batch_and_finishes(tmp_path, monkeypatch):
    calls = []
    loss = NaturalTask.loss

    def poisoned(self, model, x, y, generator, epoch):
        calls.append(1)
        value = loss(self, model, x, y, generator, epoch)
        return value * math.nan if len(calls) == 3 else value

    monkeypatch.setattr(NaturalTask, "loss", poisoned)
    lines = []
    config = tiny_config(tmp_path, "checkpoint.on_nonfinite=skip", "epochs=1")
    loop.train(config, progress=False, echo=lines.append)
    assert (
        "warning: learner natural had a non-finite loss (nan) at step 3 (epoch 1, batch 3/8); "
        "skipped that batch for it (checkpoint.on_nonfinite: skip)"
    ) in lines
    metrics = json.loads((only_run(tmp_path) / "metrics.jsonl").read_text())
    assert metrics["skipped_batches"] == {"natural": 1, "adv_linf": 0}
    assert all(math.isfinite(v) for v in metrics["train_loss"].values())


def test_skip_mode_still_stops_a_learner_that_diverged(tmp_path):
    config = tiny_config(
        tmp_path,
        "checkpoint.on_nonfinite=skip",
        "learners.natural.optimizer.lr=1e30",
        "merge.redistribute.policy=never",  # a redistribution would copy finite weights back
    )
    lines = []
    with pytest.raises(TrainingError) as stopped:
        loop.train(config, progress=False, echo=lines.append)
    assert re.fullmatch(
        r"learner natural had a non-finite loss \((nan|inf)\) at step 16 \(epoch 2, batch 8/8\) "
        r"for the 8th batch in a row, so skipping batches is not helping; stopped without "
        r"saving it, the last good checkpoint is \S+step-000000008-epoch-0002\.json; lower its "
        r"learning rate \(learners\.natural\.optimizer\.lr\) and start a new run",
        str(stopped.value),
    ), str(stopped.value)
    assert sum("skipped that batch" in line for line in lines) == 14  # steps 2-8 and 9-15


def test_skip_mode_stops_a_learner_whose_weights_are_no_longer_finite(tmp_path, monkeypatch):
    calls = []
    loss = NaturalTask.loss

    def poisoned(self, model, x, y, generator, epoch):
        calls.append(1)
        if len(calls) == 3:  # as if an update had overflowed: one weight is NaN from now on
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = math.nan
        return loss(self, model, x, y, generator, epoch)

    monkeypatch.setattr(NaturalTask, "loss", poisoned)
    config = tiny_config(tmp_path, "checkpoint.on_nonfinite=skip", "epochs=1")
    with pytest.raises(TrainingError) as stopped:
        loop.train(config, progress=False, echo=lambda *_: None)
    assert str(stopped.value).startswith(
        "learner natural had a non-finite loss (nan) at step 3 (epoch 1, batch 3/8) and its "
        "weights are no longer finite, so skipping batches cannot help; stopped without saving it"
    ), str(stopped.value)


def test_skipping_a_nonfinite_loss_leaves_the_learner_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    learner = Learner(
        name="natural",
        model=model,
        optimizer=optimizer,
        lr_schedule=PiecewiseLinear.constant(0.1),
        gamma=PiecewiseLinear.constant(1.0),
        task=NaturalTask(),
        generator=torch.Generator(),
    )
    x, y = torch.rand(8, 1, 2, 2), torch.arange(8) % 3
    learner.train_step(x, y, 0.5)  # momentum exists from here on
    before = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    learner.skip_nonfinite = True  # checkpoint.on_nonfinite: skip
    loss = learner.train_step(x * math.nan, y, 0.6)
    assert torch.isnan(loss)
    for key, value in before[0].items():
        assert torch.equal(model.state_dict()[key], value), key
    for index, state in before[1]["state"].items():
        assert torch.equal(
            optimizer.state_dict()["state"][index]["momentum_buffer"], state["momentum_buffer"]
        )
    assert math.isfinite(learner.train_step(x, y, 0.7))


# --- config errors: before any compute --------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("checkpoint.every_steps=0", "checkpoint.every_steps: must be >= 1, got 0"),
        ("checkpoint.every_minutes=-5", "checkpoint.every_minutes: must be > 0, got -5"),
        ("checkpoint.keep=0", "checkpoint.keep: must be >= 1, got 0"),
        ("checkpoint.on_nonfinite=ignore", "checkpoint.on_nonfinite: unknown value 'ignore'"),
        ("checkpoint.every_step=3", "unknown key 'checkpoint.every_step'"),
    ],
)
def test_checkpoint_config_errors_stop_before_anything_runs(tmp_path, capsys, setting, message):
    assert main(tiny_cli(tmp_path / "out", setting)) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")
    assert not (tmp_path / "out").exists()


def test_a_config_edited_in_python_is_checked_before_data_is_read(tmp_path, monkeypatch):
    config = tiny_config(tmp_path)
    config.checkpoint.keep = 0
    monkeypatch.setattr(loop, "load_splits", lambda *a, **k: pytest.fail("data was read"))
    with pytest.raises(ConfigError, match=r"checkpoint\.keep: must be >= 1"):
        loop.train(config, progress=False, echo=quiet)


def test_resume_of_something_that_is_not_a_run(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path} is not a run directory (it has no config.yaml); pass the folder "
        "that `generalist train` printed after 'run'\n"
    )
    missing = tmp_path / "typo"
    assert main(["train", "--resume", str(missing)]) == 2
    assert capsys.readouterr().err == (
        f"error: {missing} does not exist; pass the folder that `generalist train` printed "
        "after 'run'\n"
    )
    assert not missing.exists()


# --- bad datasets: the offending index ---------------------------------------------------------


def _npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x_train=x, y_train=y, x_test=x[:4], y_test=y[:4])
    return path


def _images(n: int = 20) -> np.ndarray:
    return np.random.default_rng(0).random((n, 6, 6, 1)).astype(np.float32)


def test_nan_pixel_is_reported_with_its_index(tmp_path, capsys):
    x = _images()
    x[13, 2, 3, 0] = np.nan
    path = _npz(tmp_path / "d.npz", x, np.arange(20) % 4)
    assert main(["train", "--preset", "standard", "--dataset", "npz", "--data-dir", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {path}:x_train[13] holds nan, outside [0, 1] (NaN and inf included); scale "
        "images to [0, 1] or store uint8 pixels\n"
    )


def test_stray_label_is_reported_with_its_index(tmp_path):
    y = np.arange(20) % 4
    y[6] = 255
    with pytest.raises(DataError) as error:
        load_splits("npz", _npz(tmp_path / "d.npz", _images(), y))
    assert str(error.value) == (
        f"{tmp_path / 'd.npz'}:y_train[6] is 255, but no example has label 4; labels must be "
        "the class indices 0..K-1, so renumber them"
    )


def test_one_hot_labels_and_ragged_images_are_refused_with_a_fix(tmp_path):
    one_hot = np.eye(4)[np.arange(20) % 4]
    with pytest.raises(DataError, match=r"shape \(20, 4\): one-hot .* y\.argmax\(axis=1\)"):
        load_splits("npz", _npz(tmp_path / "a.npz", _images(), one_hot))
    ragged = np.empty(2, dtype=object)
    ragged[:] = [np.zeros((4, 4)), np.zeros((5, 5))]
    np.savez(tmp_path / "b.npz", x_train=ragged, y_train=[0, 1], x_test=ragged, y_test=[0, 1])
    with pytest.raises(DataError, match=r"object array .* refusing it"):
        load_splits("npz", tmp_path / "b.npz")


def test_label_out_of_range_in_a_real_format_names_its_index(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    labels = [i % 10 for i in range(12)]
    labels[9] = 10
    batch = {"data": np.zeros((12, 3072), np.uint8), "labels": labels}
    (folder / "data_batch_1").write_bytes(pickle.dumps(batch))
    (folder / "test_batch").write_bytes(pickle.dumps({**batch, "labels": [0] * 12}))
    with pytest.raises(DataError, match=r"cifar10 train label at index 9 is 10, outside \[0, 10\)"):
        load_splits("cifar10", tmp_path)
