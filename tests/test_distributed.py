"""Learner-parallel training on two CPU processes (torchrun, gloo) equals the one-process run.

Every run here is the tiny Generalist-D of :mod:`training_runs` for 2 epochs, with a constant
learning rate (so the learners really move in epoch 2) and redistribution after every step of
epoch 2 (so the all-reduced global flows back into the learners). The reference run goes
through ``generalist train --nproc 2`` and torchrun; the others fork this process into the two
ranks, to spare each process the seconds torchrun's fresh interpreters spend importing.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from forked_ranks import cli_rank, fork_two
from safetensors.torch import load_file
from training_runs import (
    STEPS_PER_EPOCH,
    assert_same_result,
    checkpoint_steps,
    comparable_metrics,
    only_run,
    tiny_cli,
    train_tiny,
)

from generalist.cli import main

EXTRA = (
    "epochs=2",
    "learners.natural.optimizer.lr=0.05",
    "learners.adv_linf.optimizer.lr=0.05",
    "merge.redistribute.unit=epoch",
    "merge.redistribute.start=2",
    "merge.redistribute.every=1",
)
ATOL = 1e-5
"""Measured: at most 2.4e-7 apart. The all-reduce sums γ_0·θ̄_0 + γ_1·θ̄_1 before scaling where
one process adds the two scaled terms in turn, so epoch 2 (γ = 0.6 / 0.4) differs by rounding;
an all-reduce that mixed with γ = 0.5 / 0.5 instead moved the weights by 2.4e-4, and a run
without redistribution differs by 2e-1."""
STOP_AT = STEPS_PER_EPOCH + 3


def _fork_two_ranks(args: list[str], stop_at: int | None = None) -> list[int | None]:
    """``generalist ARGS`` as ranks 0 and 1 (rank 0 stopped by SIGTERM at step ``stop_at``)."""
    return fork_two(cli_rank, args, stop_at)


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    assert main([*tiny_cli(out, *EXTRA), "--nproc", "2", "--no-progress"]) == 0
    return only_run(out)


def test_two_processes_train_the_single_process_global_model(distributed_run, tmp_path):
    single = train_tiny(tmp_path, *EXTRA)
    weights = load_file(distributed_run / "model.safetensors")
    expected = load_file(single / "model.safetensors")
    torch.testing.assert_close(weights, expected, atol=ATOL, rtol=0)
    records, reference = comparable_metrics(distributed_run), comparable_metrics(single)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0] == reference[0]  # γ = 0 / 1 in epoch 1: no rounding to differ by yet
    assert records[1]["val"] == reference[1]["val"]  # sharded evaluation, counts all-reduced
    assert records[1]["train_loss"] == pytest.approx(reference[1]["train_loss"], abs=ATOL)
    summary = json.loads((distributed_run / "summary.json").read_text())
    assert summary["test"] == json.loads((single / "summary.json").read_text())["test"]


def test_stopped_distributed_run_resumes_to_the_uninterrupted_one(distributed_run, tmp_path, capfd):
    out = tmp_path / "stopped"
    statuses = _fork_two_ranks([*tiny_cli(out, *EXTRA), "--no-progress"], stop_at=STOP_AT)
    assert statuses == [128 + signal.SIGTERM] * 2
    said = f"stopped by SIGTERM after step {STOP_AT} (epoch 2, batch 3/8)"
    assert capfd.readouterr().err.count(said) == 1  # by rank 0 alone
    run = only_run(out)
    assert checkpoint_steps(run)[-1] == STOP_AT  # saving is collective: rank 1 stopped there too
    assert not (run / "summary.json").exists()
    assert _fork_two_ranks(["train", "--resume", str(run), "--no-progress"]) == [0, 0]
    assert_same_result(run, distributed_run)


def test_one_learner_on_two_processes_is_data_parallel(tmp_path):
    """Standard training (one learner) on a model without BatchNorm: two replicas, each on
    half of every batch with the gradients averaged, take the single-process steps."""
    extra = ("epochs=2", "model.name=small-cnn")
    out = tmp_path / "data-parallel"
    args = tiny_cli(out, *extra)
    args[args.index("quickstart")] = "standard"
    assert _fork_two_ranks([*args, "--no-progress"]) == [0, 0]
    single = train_tiny(tmp_path / "single", *extra, preset="standard")
    torch.testing.assert_close(
        load_file(only_run(out) / "model.safetensors"),
        load_file(single / "model.safetensors"),
        atol=1e-6,  # measured 1.1e-8: the two halves' gradients summed instead of one batch's
        rtol=0,
    )


def test_a_process_count_that_does_not_fit_the_learners_is_refused(tmp_path, capsys):
    out = tmp_path / "refused"
    assert main([*tiny_cli(out, *EXTRA), "--nproc", "3"]) == 2
    assert capsys.readouterr().err == (
        "error: --nproc asks for 3 processes, but quickstart trains 2 learners (natural, "
        "adv_linf): use 2 processes (one per learner) or a multiple of 2 (4, 6, ...: "
        "data-parallel inside each learner)\n"
    )
    assert not out.exists()
