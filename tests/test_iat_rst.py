"""IAT and RST: the losses, the pseudo-labeled batches, where the labels come from, exact resume,
and one-line errors for unusable unlabeled data."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from training_runs import (
    STEPS_PER_EPOCH,
    assert_same_result,
    checkpoint_steps,
    quiet,
    sigterm_at_step,
    tiny_config,
    train_tiny,
)

from generalist.attacks.threat import ThreatModel
from generalist.config import build_config
from generalist.data import BatchAugment
from generalist.data.unlabeled import read_unlabeled
from generalist.errors import ConfigError, DataError
from generalist.models import create_model
from generalist.rundir import RunDir
from generalist.training import loop
from generalist.training.mixup import MixupDraw, draw_mixup, interpolated_loss
from generalist.training.pseudo_label import LABELS_FILE, predict
from generalist.training.save_and_resume import config_difference
from generalist.training.signals import TrainingInterrupted
from generalist.training.tasks import TrainingAttack, rst
from generalist.training.tasks.iat import InterpolatedAdversarialTask
from generalist.training.tasks.rst import RobustSelfTrainingTask
from generalist.training.unlabeled_pool import PseudoLabeledPool
from generalist.weights import load_model, save_model, sha256_file

RST = [
    "data.unlabeled=rest",
    "learners.rst.task.steps=2",
    "pseudo_labels.epochs=2",  # 16 labeler steps before the run's 24
]
LABELER_STEPS = 2 * STEPS_PER_EPOCH
DIGITS_TRAIN = 1438
"""scikit-learn digits' training set: 1797 images less the 359 held out for test."""


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


# ---- IAT ---------------------------------------------------------------------------------


def test_iat_loss_is_the_mean_of_the_two_mixup_losses_computed_by_hand():
    model = _linear()
    x = torch.tensor([[0.1, 0.9, 0.3, 0.0], [0.5, 0.2, 0.8, 1.0], [0.7, 0.7, 0.1, 0.4]])
    x_adv = (x + torch.tensor([0.05, -0.05, 0.05, -0.05])).clamp(0, 1)
    y = torch.tensor([2, 0, 1])
    clean = MixupDraw(0.3, torch.tensor([2, 0, 1]))
    adversarial = MixupDraw(0.8, torch.tensor([1, 2, 0]))

    def by_hand(inputs: torch.Tensor, draw: MixupDraw) -> float:
        weight, bias = model[1].weight.detach().double(), model[1].bias.detach().double()
        total = 0.0
        for i in range(3):
            j = int(draw.partners[i])
            mixed = draw.lam * inputs[i].double() + (1 - draw.lam) * inputs[j].double()
            logits = weight @ mixed + bias
            log_z = math.log(sum(math.exp(v) for v in logits.tolist()))
            total += -draw.lam * (logits[int(y[i])] - log_z)
            total += -(1 - draw.lam) * (logits[int(y[j])] - log_z)
        return float(total) / 3

    expected = 0.5 * (by_hand(x, clean) + by_hand(x_adv, adversarial))
    assert interpolated_loss(model, x, x_adv, y, clean, adversarial).item() == pytest.approx(
        expected, rel=1e-6
    )


def test_iat_task_crafts_on_unmixed_inputs_then_draws_two_mixups_from_the_learner_generator():
    model = _linear()
    x = torch.rand(6, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    attack = TrainingAttack(ThreatModel.of("Linf", "0.1"), steps=2, step_size=0.05)
    task = InterpolatedAdversarialTask(attack, alpha=1.0)
    loss = task.loss(model, x, y, torch.Generator().manual_seed(5), 0.5)

    replay = torch.Generator().manual_seed(5)
    x_adv = attack.craft(model, x, y, replay)
    clean, adversarial = (draw_mixup(6, 1.0, replay, x.device) for _ in range(2))
    assert clean.lam != adversarial.lam  # each mixup has its own coefficient
    assert torch.equal(loss, interpolated_loss(model, x, x_adv, y, clean, adversarial))


def test_mixup_draws_follow_beta_alpha_alpha():
    generator = torch.Generator().manual_seed(0)
    small = [draw_mixup(4, 0.05, generator, torch.device("cpu")).lam for _ in range(200)]
    uniform = [draw_mixup(4, 1.0, generator, torch.device("cpu")).lam for _ in range(200)]
    # Beta(0.05, 0.05) piles up at 0 and 1; Beta(1, 1) is uniform on [0, 1].
    assert np.mean([min(v, 1 - v) < 0.05 for v in small]) > 0.8
    assert 0.35 < np.mean([v < 0.5 for v in uniform]) < 0.65


# ---- RST batches -------------------------------------------------------------------------


@pytest.mark.parametrize(("fraction", "labeled", "unlabeled"), [(0.5, 8, 8), (0.2, 8, 2)])
def test_rst_batches_hold_the_configured_unlabeled_fraction(
    monkeypatch, fraction, labeled, unlabeled
):
    pool = PseudoLabeledPool(
        torch.randint(0, 256, (40, 1, 2, 2), dtype=torch.uint8),
        torch.full((40,), 2, dtype=torch.int64),  # every pseudo-label is class 2
        BatchAugment(),
    )
    seen = {}

    def spy(model, x, y, attack, beta, generator):
        seen.update(x=x, y=y, beta=beta)
        return torch.zeros(())

    monkeypatch.setattr(rst, "trades_loss", spy)
    attack = TrainingAttack(ThreatModel.of("Linf", "0.1"), steps=1, step_size=0.1)
    task = RobustSelfTrainingTask(attack, beta=6.0, fraction=fraction, pool=pool)
    x, y = torch.rand(labeled, 1, 2, 2), torch.zeros(labeled, dtype=torch.int64)
    task.loss(nn.Identity(), x, y, torch.Generator().manual_seed(0), 0.0)
    assert len(seen["x"]) == labeled + unlabeled
    assert unlabeled / (labeled + unlabeled) == pytest.approx(fraction)
    assert torch.equal(seen["x"][:labeled], x)  # the labeled batch is the loop's, untouched
    assert seen["y"].tolist() == [0] * labeled + [2] * unlabeled
    images = {
        tuple((seen["x"][i] * 255).round().flatten().tolist())
        for i in range(labeled, len(seen["x"]))
    }
    assert len(images) == unlabeled  # distinct images from the pool
    assert seen["beta"] == 6.0


# ---- pseudo-labels -----------------------------------------------------------------------


def test_pseudo_labels_come_from_the_stated_model(tmp_path):
    labeler_dir = tmp_path / "labeler"
    labeler_dir.mkdir()
    torch.manual_seed(3)
    spec = {"name": "tiny-cnn", "num_classes": 10, "in_channels": 1, "image_size": 8}
    spec.update(mean=None, std=None)
    save_model(create_model(**spec), labeler_dir, {"model": spec, "dataset": "digits"})
    config = tiny_config(
        tmp_path / "out",
        *RST,
        f"pseudo_labels.model={labeler_dir}",
        "epochs=1",
        preset="rst",
    )
    run = loop.train(config, progress=False, echo=quiet).run
    manifest = json.loads(run.manifest_path.read_text())["pseudo_labels"]
    weights = labeler_dir / "model.safetensors"
    assert manifest["source"] == {"model": str(weights.resolve()), "sha256": sha256_file(weights)}
    assert not (run.path / "pseudo-labeler").exists()  # nothing trained: the model was given
    unlabeled = read_unlabeled("rest", (1, 8, 8), lambda: _rest_of(config))
    labeler, _ = load_model(weights)
    expected = predict(labeler, unlabeled.images, 100, torch.device("cpu"))
    assert torch.equal(load_file(run.path / LABELS_FILE)["labels"], expected)
    assert manifest["unlabeled"]["fingerprint"] == unlabeled.fingerprint()
    assert manifest["class_counts"] == torch.bincount(expected, minlength=10).tolist()


def _rest_of(config):
    from generalist.data.splits import unused_training_examples

    d = config.data
    return unused_training_examples(
        d.dataset, val_size=d.val_size, split_seed=d.split_seed, train_limit=d.train_limit
    )


def test_the_rest_is_what_the_labeled_and_validation_splits_leave_out():
    from generalist.data import load_splits
    from generalist.data.readers import read_digits

    splits = load_splits("digits", val_size=64, train_limit=256)
    rest = _rest_of(tiny_config("unused", *RST, preset="rst"))
    assert len(rest) == DIGITS_TRAIN - 64 - 256

    def rows(*parts):
        images = torch.cat([part.images.flatten(1) for part in parts])
        labels = torch.cat([part.labels for part in parts])
        return sorted(map(tuple, torch.cat([images.long(), labels[:, None]], 1).tolist()))

    assert rows(splits.train, splits.val, rest) == rows(read_digits().train)


# ---- exact resume ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rst_reference(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("rst-reference"), *RST, preset="rst")


def test_rst_run_trains_its_labeler_beside_it_and_records_it(rst_reference):
    labeler = rst_reference / "pseudo-labeler"
    assert (labeler / "summary.json").is_file()
    record = json.loads((rst_reference / "manifest.json").read_text())["pseudo_labels"]
    assert record["source"]["sha256"] == sha256_file(labeler / "model.safetensors")
    assert 0 <= record["labeler_val_accuracy"] <= 100
    assert record["unlabeled"]["examples"] == DIGITS_TRAIN - 64 - 256
    assert 0 <= record["agreement_with_true_labels"] <= 100


@pytest.mark.parametrize(
    "stop_at",
    [
        pytest.param(5, id="while-the-labeler-trains"),
        pytest.param(LABELER_STEPS + 4, id="mid-epoch-after-pseudo-labeling"),  # epoch 3
    ],
)
def test_rst_stopped_and_resumed_is_bit_identical(tmp_path, rst_reference, stop_at):
    config = tiny_config(tmp_path, *RST, "checkpoint.every_minutes=null", preset="rst")
    with sigterm_at_step(stop_at), pytest.raises(TrainingInterrupted) as stopped:
        loop.train(config, progress=False, echo=quiet)
    run = stopped.value.run
    assert (run / "config.yaml").is_file()  # the run, not its labeler, is what resumes
    assert "continue with: generalist train --resume " + str(run) in str(stopped.value)
    assert stopped.value.run.name.startswith("rst-")
    if stop_at <= LABELER_STEPS:  # stopped inside the labeler's run, before the run's own
        assert checkpoint_steps(run / "pseudo-labeler")[-1] == stop_at
        assert checkpoint_steps(run) == []
    else:
        assert checkpoint_steps(run)[-1] == stop_at  # step 20 of 24: the labeler has only 16
    loop.train(config, RunDir.open(run), resume=True, progress=False, echo=quiet)
    assert_same_result(run, rst_reference)
    labels = [load_file(r / LABELS_FILE)["labels"] for r in (run, rst_reference)]
    assert torch.equal(*labels)


def test_rst_killed_right_after_pseudo_labeling_resumes_without_labeling_again(
    tmp_path, rst_reference
):
    run = tmp_path / "run"
    shutil.copytree(rst_reference, run)
    for produced in ("checkpoints", "metrics.jsonl", "manifest.json", "model.safetensors"):
        path = run / produced
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (run / "summary.json").unlink()
    labels_written = (run / LABELS_FILE).stat().st_mtime_ns
    config = tiny_config(tmp_path, *RST, preset="rst")
    loop.train(config, RunDir.open(run), resume=True, progress=False, echo=quiet)
    assert_same_result(run, rst_reference)
    assert (run / LABELS_FILE).stat().st_mtime_ns == labels_written
    assert "pseudo_labels" in json.loads((run / "manifest.json").read_text())


def test_iat_stopped_mid_epoch_and_resumed_is_bit_identical(tmp_path):
    extra = ("learners.iat.task.steps=2",)
    reference = train_tiny(tmp_path / "reference", *extra, preset="iat")
    config = tiny_config(
        tmp_path / "stopped", "checkpoint.every_minutes=null", *extra, preset="iat"
    )
    with sigterm_at_step(STEPS_PER_EPOCH + 3), pytest.raises(TrainingInterrupted) as stopped:
        loop.train(config, progress=False, echo=quiet)
    assert checkpoint_steps(stopped.value.run)[-1] == STEPS_PER_EPOCH + 3
    loop.train(config, RunDir.open(stopped.value.run), resume=True, progress=False, echo=quiet)
    assert_same_result(stopped.value.run, reference)


# ---- as a Generalist base learner --------------------------------------------------------


@pytest.mark.parametrize(
    "robust",
    [
        pytest.param(["learners.adv_linf.task.type=iat"], id="iat"),
        pytest.param(
            ["learners.adv_linf.task.type=rst", "data.unlabeled=rest", "pseudo_labels.epochs=1"],
            id="rst",
        ),
    ],
)
def test_generalist_d_trains_with_iat_or_rst_as_its_robust_learner(tmp_path, robust):
    config = tiny_config(
        tmp_path, "epochs=1", "learners.adv_linf.task.steps=2", *robust, preset="generalist-d"
    )
    result = loop.train(config, progress=False, echo=quiet)
    (record,) = result.run.read_metrics()
    assert set(record["train_loss"]) == {"natural", "adv_linf"}
    assert all(math.isfinite(v) for v in record["train_loss"].values())


# ---- unusable unlabeled data: one line each ----------------------------------------------


def _one_line(error: Exception) -> str:
    message = str(error)
    assert "\n" not in message
    return message


def test_config_errors_for_unlabeled_sources(tmp_path):
    def build(*extra):
        return build_config("rst", dataset="digits", overrides=list(extra))

    with pytest.raises(ConfigError) as missing:
        build(f"data.unlabeled={tmp_path / 'nope.npz'}")
    assert _one_line(missing.value) == (
        f"data.unlabeled: {tmp_path / 'nope.npz'} does not exist; pass 'rest', an .npz holding "
        "x_unlabeled, or a folder of images"
    )
    with pytest.raises(ConfigError) as unset:
        build()
    assert _one_line(unset.value).startswith("learners.rst.task.type: rst needs unlabeled images")
    with pytest.raises(ConfigError) as no_limit:
        build("data.unlabeled=rest")
    assert "rest needs data.train_limit" in _one_line(no_limit.value)
    with pytest.raises(ConfigError) as unused:
        build_config("trades", dataset="digits", overrides=["data.unlabeled=rest"])
    assert _one_line(unused.value).startswith("data.unlabeled: no learner uses unlabeled images")
    with pytest.raises(ConfigError) as stray:
        build_config("trades", dataset="digits", overrides=["pseudo_labels.epochs=3"])
    assert _one_line(stray.value).startswith("pseudo_labels: only runs with data.unlabeled")
    with pytest.raises(ConfigError) as fraction:
        build("data.unlabeled=rest", "data.train_limit=9", "learners.rst.task.unlabeled_fraction=1")
    assert _one_line(fraction.value) == (
        "learners.rst.task.params.unlabeled_fraction: 1 must be in (0, 1)"
    )


def _read(path):
    return read_unlabeled(str(path), (1, 8, 8), rest=lambda: None)


def test_malformed_unlabeled_npz_and_folders_are_one_line_errors(tmp_path):
    wrong_key = tmp_path / "wrong_key.npz"
    np.savez(wrong_key, images=np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(DataError) as error:
        _read(wrong_key)
    assert _one_line(error.value) == (
        f"data.unlabeled: {wrong_key} has no x_unlabeled (has images); "
        "save the images as x_unlabeled with numpy.savez"
    )
    wrong_shape = tmp_path / "wrong_shape.npz"
    np.savez(wrong_shape, x_unlabeled=np.zeros((3, 1, 9, 9), np.uint8))
    with pytest.raises(DataError) as error:
        _read(wrong_shape)
    assert "holds images of shape (1, 9, 9) (C, H, W) but the labeled images are (1, 8, 8)" in (
        _one_line(error.value)
    )
    not_npz = tmp_path / "garbage.npz"
    not_npz.write_bytes(b"not a zip file at all")
    with pytest.raises(DataError) as error:
        _read(not_npz)
    assert _one_line(error.value) == (
        f"data.unlabeled: {not_npz} is not an .npz archive; "
        "save the images as x_unlabeled with numpy.savez"
    )
    objects = tmp_path / "objects.npz"
    np.savez(objects, x_unlabeled=np.array([np.zeros(3), np.zeros(4)], dtype=object))
    with pytest.raises(DataError) as error:
        _read(objects)
    _one_line(error.value)
    out_of_range = tmp_path / "floats.npz"
    np.savez(out_of_range, x_unlabeled=np.full((2, 8, 8), 2.0, np.float32))
    with pytest.raises(DataError) as error:
        _read(out_of_range)
    assert "outside [0, 1]" in _one_line(error.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(DataError) as error:
        _read(empty)
    assert _one_line(error.value).startswith(f"data.unlabeled: {empty} holds no image files")


def test_unlabeled_image_folders_are_read_in_sorted_order_and_checked(tmp_path):
    from PIL import Image

    folder = tmp_path / "pool"
    (folder / "b").mkdir(parents=True)
    for name, value in (("b/1.png", 30), ("a.png", 10), ("b/0.png", 20)):
        Image.fromarray(np.full((8, 8), value, np.uint8)).save(folder / name)
    images = _read(folder).images
    assert images.shape == (3, 1, 8, 8)
    assert images[:, 0, 0, 0].tolist() == [10, 20, 30]  # a.png, b/0.png, b/1.png
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(folder / "c.png")
    with pytest.raises(DataError) as error:
        _read(folder)
    assert _one_line(error.value) == (
        f"data.unlabeled: {folder / 'c.png'} is 8x9 but the labeled images are 8x8; "
        "resize the unlabeled images to match"
    )
    (folder / "c.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError) as error:
        _read(folder)
    assert _one_line(error.value).startswith(f"data.unlabeled: cannot decode {folder / 'c.png'} (")


def test_a_pool_too_small_for_one_batch_is_a_one_line_error(tmp_path):
    pool = tmp_path / "small.npz"
    np.savez(pool, x_unlabeled=np.zeros((5, 8, 8), np.uint8))
    config = tiny_config(tmp_path, *RST, f"data.unlabeled={pool}", preset="rst")
    with pytest.raises(DataError) as error:
        loop.train(config, progress=False, echo=quiet)
    assert _one_line(error.value) == (
        "data.unlabeled: 5 unlabeled images, but every batch of learner rst takes 32; add "
        "unlabeled images or lower the unlabeled share in learners.rst.task.params"
    )


def test_a_labeler_for_other_data_is_refused_in_one_line(tmp_path):
    spec = {"name": "tiny-cnn", "num_classes": 3, "in_channels": 1, "image_size": 8}
    spec.update(mean=None, std=None)
    save_model(create_model(**spec), tmp_path, {"model": spec, "dataset": "other"})
    config = tiny_config(tmp_path, *RST, f"pseudo_labels.model={tmp_path}", preset="rst")
    with pytest.raises(ConfigError) as error:
        loop.train(config, progress=False, echo=quiet)
    assert _one_line(error.value) == (
        f"pseudo_labels.model: {tmp_path / 'model.safetensors'} does not fit this run's data "
        "(num_classes 3 vs 10); give a labeler trained on the same dataset"
    )


def test_runs_started_before_these_options_existed_still_resume(tmp_path):
    """A checkpoint written before data.unlabeled, pseudo_labels and the iat/rst task fields
    existed holds no such keys (and its tasks are in the flat form of that time, before
    ``task.params``); their unset defaults must not count as a config change."""
    now = tiny_config(tmp_path).to_dict()
    before = json.loads(json.dumps(now))
    del before["pseudo_labels"], before["data"]["unlabeled"]
    for learner in before["learners"].values():
        task = learner["task"]
        del task["params"], task["source"]
        task.update(beta=6.0, tau=None, mask_fraction=None, prominence_alpha=None)
        task.update(consistency_weight=None, revision_rate=None, revision_decay=None)
        task.update(natural_warmup=None)
    assert config_difference(before, now) == ""
    now["pseudo_labels"]["epochs"] = 3
    assert config_difference(before, now) == "pseudo_labels.epochs is 3 here but null in the run"


def test_rst_under_torchrun_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = tiny_config(tmp_path / "out", *RST, preset="rst")
    with pytest.raises(ConfigError) as error:
        loop.train(config, progress=False, echo=quiet)
    assert _one_line(error.value) == (
        "data.unlabeled: RST's pseudo-labeling and unlabeled draws run in one process; "
        "start this run without torchrun or --nproc"
    )
    assert not (tmp_path / "out").exists()


def test_the_rest_of_an_image_folder_dataset_is_refused_in_one_line():
    from generalist.data.splits import unused_training_examples

    with pytest.raises(DataError) as error:
        unused_training_examples("imagefolder", "/nowhere", val_size=0, split_seed=0, train_limit=1)
    assert _one_line(error.value) == (
        "data.unlabeled: rest needs an in-memory dataset, not the imagefolder folder; put the "
        "unlabeled images in a folder of their own and pass that"
    )
