"""Exact resume: a run killed at any step and resumed ends bit-identical to one never stopped."""

from __future__ import annotations

import json
import random
import shutil
import signal
import time

import pytest
from safetensors.torch import load_file
from training_runs import (
    STEPS_PER_EPOCH,
    TOTAL_STEPS,
    assert_same_result,
    checkpoint_steps,
    only_run,
    quiet,
    sigterm_at_step,
    spawn_cli,
    tiny_cli,
    tiny_config,
    train_tiny,
)

from generalist.cli import main
from generalist.rundir import RunDir
from generalist.training import loop
from generalist.training.signals import TrainingInterrupted


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every resumed one must reproduce."""
    return train_tiny(tmp_path_factory.mktemp("reference"))


def _wait_for_checkpoint(process, out, step: int, timeout: float = 60.0):
    """Poll until the run under ``out`` has a checkpoint at ``step`` or later."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [p for p in out.iterdir() if p.is_dir()] if out.exists() else []
        if runs and any(s >= step for s in checkpoint_steps(runs[0])):
            return runs[0]
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.002)
    raise AssertionError(f"no checkpoint at step {step} within {timeout} s")


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path, reference):
    kill_after = random.Random(7).randint(1, TOTAL_STEPS - 2)
    out = tmp_path / "killed"
    process = spawn_cli(tiny_cli(out, "checkpoint.every_steps=1"))
    run = _wait_for_checkpoint(process, out, kill_after)
    process.kill()
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (run / "summary.json").exists()  # it really died mid-run
    assert max(checkpoint_steps(run)) < TOTAL_STEPS
    with open(run / "metrics.jsonl", "a") as metrics:  # what a kill mid-append leaves behind
        metrics.write('{"epoch": 2, "step": 1')
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same_result(run, reference)


def test_sigterm_saves_the_current_step_and_says_how_to_resume(tmp_path, reference, capsys):
    """What a preempted job sees, through the CLI: the step in flight finishes, a checkpoint
    of it is written, the message says how to resume, the exit status says SIGTERM."""
    out = tmp_path / "preempted"
    with sigterm_at_step(STEPS_PER_EPOCH + 3):
        status = main([*tiny_cli(out, "checkpoint.every_steps=5"), "--no-progress"])
    assert status == 128 + signal.SIGTERM
    run = only_run(out)
    newest = run / "checkpoints" / "step-000000011-epoch-0002.json"
    assert checkpoint_steps(run) == [10, 11]
    assert json.loads(newest.read_text())["reason"] == "SIGTERM"
    stderr = capsys.readouterr().err
    assert "SIGTERM received: finishing the current step, then saving a checkpoint" in stderr
    assert stderr.rstrip().endswith(
        f"stopped by SIGTERM after step 11 (epoch 2, batch 3/8); saved {newest}; "
        f"continue with: generalist train --resume {run}"
    )
    assert not (run / "summary.json").exists()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same_result(run, reference)


@pytest.mark.parametrize(
    ("preset", "extra", "stop_at"),
    [
        pytest.param(
            "quickstart",
            (
                "learners.natural.optimizer.type=adam",  # Adam: step counters, betas tuple
                "learners.natural.optimizer.lr=0.001",
                "data.crop_padding=1",  # the augmentation generator matters
                "data.flip=true",
                "merge.redistribute.unit=epoch",
                "merge.redistribute.start=1",  # redistribution in every epoch
                "merge.redistribute.every=1",
            ),
            11,
            id="adam-augment-redistribute",
        ),
        pytest.param(
            "quickstart",
            (
                "merge.redistribute.policy=once_per_c_epochs",
                "merge.redistribute.unit=epoch",
                "merge.redistribute.start=2",
                "merge.redistribute.every=2",
            ),
            2 * STEPS_PER_EPOCH,  # stopped after the last batch, before the epoch's end
            id="stop-at-epoch-boundary",
        ),
        pytest.param("cure", ("learners.cure.task.steps=2",), 13, id="cure-task-state"),
    ],
)
def test_in_process_interrupt_and_resume_matches_across_optimizers_and_tasks(
    tmp_path, preset, extra, stop_at
):
    """The state a resume needs beyond the default run: Adam's moments, the augmentation
    generator, redistribution, and a task's own state (CURE's revision model and coin)."""
    reference = train_tiny(tmp_path / "reference", *extra, preset=preset)
    config = tiny_config(
        tmp_path / "stopped", "checkpoint.every_minutes=null", *extra, preset=preset
    )
    with sigterm_at_step(stop_at), pytest.raises(TrainingInterrupted) as stopped:
        loop.train(config, progress=False, echo=quiet)
    assert checkpoint_steps(stopped.value.run)[-1] == stop_at
    if preset == "cure":
        tensors = load_file(stopped.value.checkpoint.with_suffix(".safetensors"))
        assert {"learners/0/task/generator", "learners/0/task/steps"} <= set(tensors)
    loop.train(config, RunDir.open(stopped.value.run), resume=True, progress=False, echo=quiet)
    assert_same_result(stopped.value.run, reference)


def test_resume_keeps_the_config_but_may_train_longer(tmp_path, reference, capsys):
    run = shutil.copytree(reference, tmp_path / "run")
    assert main(["train", "--resume", str(run), "--set", "learners.natural.optimizer.lr=0.01"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: --resume {run}: learners.natural.optimizer.lr is 0.01 here but "
        "{points: [[0, 0.05], "  # the schedule as YAML, as the user wrote it
    )
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    assert "already finished all 3 epochs" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--epochs", "4", "--no-progress"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["step"] == 4 * STEPS_PER_EPOCH
    manifest = json.loads((run / "manifest.json").read_text())
    assert [r["checkpoint"] for r in manifest["resumes"]] == ["step-000000024-epoch-0004.json"]
    assert "epochs: 4" in (run / "config.yaml").read_text()


def test_manifest_records_what_produced_the_run(reference):
    manifest = json.loads((reference / "manifest.json").read_text())
    assert {"python", "torch", "numpy", "safetensors"} <= set(manifest["software"])
    assert manifest["device"]["type"] == "cpu"
    assert manifest["seeds"] == {"seed": 0, "split_seed": 0}
    assert manifest["config"]["epochs"] == 3
    assert manifest["data"]["train"]["examples"] == 256
    assert len(manifest["data"]["train"]["fingerprint"]) == 64
    assert manifest["git"] is None or len(manifest["git"]["commit"]) == 40
    checkpoint = json.loads(next((reference / "checkpoints").glob("*.json")).read_text())
    assert checkpoint["data"]["train"] == manifest["data"]["train"]["fingerprint"]


def test_a_run_killed_before_its_first_checkpoint_restarts_from_the_beginning(tmp_path, reference):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(reference / "config.yaml", run / "config.yaml")
    (run / "metrics.jsonl").write_text('{"epoch": 1, "step": 8}\n')  # logged, never checkpointed
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same_result(run, reference)
    assert only_run(tmp_path) == run
