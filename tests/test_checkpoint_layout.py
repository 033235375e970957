"""Checkpoints whose hashes are consistent but whose content does not fit the run: the
training state does not take them back, so each is set aside like a damaged one, and the run
resumes from the previous checkpoint exactly; one of another device is refused and kept."""

from __future__ import annotations

import contextlib
import io
import re
import shutil

import pytest
import torch
from training_runs import assert_same_result, quiet, sigterm_at_step, tiny_config, train_tiny

from generalist.checkpoint import CheckpointStore
from generalist.cli import main
from generalist.training import loop
from generalist.training.signals import TrainingInterrupted


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    config = tiny_config(
        tmp_path_factory.mktemp("stopped"), "checkpoint.every_steps=1", "checkpoint.keep=3"
    )
    with (
        contextlib.redirect_stderr(io.StringIO()),
        sigterm_at_step(13),
        pytest.raises(TrainingInterrupted) as stopped,
    ):
        loop.train(config, progress=False, echo=quiet)
    return stopped.value.run


def _reshape_momentum(tensors, meta):
    key = "learners/0/optimizer/state/0/momentum_buffer"
    tensors[key] = torch.zeros(tensors[key].numel() + 1)


def _half_momentum(tensors, meta):
    key = "learners/1/optimizer/state/2/momentum_buffer"
    tensors[key] = tensors[key].half()


def _half_weight(tensors, meta):
    key = next(k for k in tensors if k.startswith("learners/0/model/"))
    tensors[key] = tensors[key].half()


def _short_generator(tensors, meta):
    tensors["augment/generator"] = tensors["augment/generator"][:100].clone()


def _bad_position(tensors, meta):
    meta["position"]["batch"] = 99


def _no_rng(tensors, meta):
    del tensors["rng/torch"]


def _short_numpy_rng(tensors, meta):
    meta["rng"]["numpy"][1] = meta["rng"]["numpy"][1][:10]


def _float_cuda_rng(tensors, meta):
    tensors["rng/cuda"] = torch.zeros(16)


def _stray_tensor(tensors, meta):
    tensors["extra/weights"] = torch.zeros(3)


def _lost_metrics(tensors, meta):
    meta["metrics"] = []


def _unrecorded_best(tensors, meta):
    meta["best"] = None


def _half_best(tensors, meta):
    key = next(k for k in tensors if k.startswith("best/"))
    tensors[key] = tensors[key].half()


def _foreign_optimizer_entry(tensors, meta):
    tensors["learners/0/optimizer/state/999/momentum_buffer"] = torch.zeros(1)


def _resign_newest(run, edit):
    """Rewrite the newest checkpoint with ``edit`` applied, both hashes consistent again."""
    store = CheckpointStore(run / "checkpoints", keep=10)
    newest = store.latest()
    checkpoint = store.read(newest)
    meta = {k: v for k, v in checkpoint.meta.items() if k not in ("format", "tensors")}
    tensors = dict(checkpoint.tensors)
    edit(tensors, meta)
    assert store.save(13, 2, tensors, meta) == newest
    return newest


@pytest.mark.parametrize(
    ("malform", "problem"),
    [
        (
            _reshape_momentum,
            r"holds natural's optimizer momentum_buffer of parameter 0 as float32\[\d+\] where "
            r"float32\[[\d, ]+\] is expected",
        ),
        (
            _half_momentum,
            r"holds adv_linf's optimizer momentum_buffer of parameter 2 as float16\[\d+\] where "
            r"float32\[\d+\] is expected",
        ),
        (_half_weight, r"does not fit this run's natural model: '.+' is float16\[.*\] where "),
        (_short_generator, r"holds a malformed state for the augmentation \(uint8\[100\]\)"),
        (_bad_position, r"has position epoch 2 batch 99 outside the run's 8 batches per epoch"),
        (_no_rng, r"lacks \['torch'\] of the RNGs"),
        (_short_numpy_rng, r"has a malformed NumPy RNG state"),
        (_float_cuda_rng, r"holds a malformed CUDA RNG state rng/cuda"),
        (_stray_tensor, r"holds \['extra'\] of the training state, which this run has no place"),
        (_lost_metrics, r"does not hold one metrics record per finished epoch \(1\)"),
        (_unrecorded_best, r"holds 'best/weights/.+', which this run has no place for"),
        (_half_best, r"has a best model that does not fit this run: '.+' is float16"),
        (
            _foreign_optimizer_entry,
            r"has optimizer state for parameter 999 of natural, which has \d+",
        ),
    ],
)
def test_a_malformed_newest_checkpoint_is_set_aside_and_the_previous_resumes_exactly(
    tmp_path, reference, stopped_run, capsys, malform, problem
):
    run = shutil.copytree(stopped_run, tmp_path / stopped_run.name)
    newest = _resign_newest(run, malform)
    CheckpointStore(run / "checkpoints", keep=10).read(newest)  # hashes consistent: intact
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert re.search(
        rf"warning: checkpoint {re.escape(str(newest))} {problem}.*; set aside as "
        rf"{re.escape(newest.name)}.corrupt\n",
        out,
    ), out
    assert "resuming from the previous checkpoint step-000000012-epoch-0002.json" in out
    assert_same_result(run, reference)


def test_an_older_checkpoint_with_per_gpu_rng_entries_still_resumes_exactly(
    tmp_path, reference, stopped_run, capsys
):
    """Before CUDA RNG states were kept for the run's own GPU only, every run saved one
    ``rng/cuda/<index>`` per visible GPU, CPU runs too; such a checkpoint fits."""
    run = shutil.copytree(stopped_run, tmp_path / stopped_run.name)

    def per_gpu(tensors, meta):
        for index in range(2):
            tensors[f"rng/cuda/{index}"] = torch.zeros(16, dtype=torch.uint8)

    newest = _resign_newest(run, per_gpu)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert "set aside" not in capsys.readouterr().out
    assert not newest.with_name(f"{newest.name}.corrupt").exists()
    assert_same_result(run, reference)


def test_a_checkpoint_of_another_device_is_refused_and_kept(tmp_path, stopped_run, capsys):
    """A device is the user's choice at resume, not damage: the checkpoint stays as it is."""
    run = shutil.copytree(stopped_run, tmp_path / stopped_run.name)

    def on_cuda(tensors, meta):
        meta["generator_device"] = "cuda"

    newest = _resign_newest(run, on_cuda)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    assert (
        f"error: {newest} was written on cuda and this run is on cpu; resume with --device cuda"
        in capsys.readouterr().err
    )
    assert newest.is_file()
    assert not list(run.glob("checkpoints/*.corrupt"))
