"""The official recipe keeps its shape at any length (docs/algorithm.md, "How each rule is laid
on E epochs"), and the schedules are read once per epoch unless a config asks per step."""

from __future__ import annotations

import itertools
import json
import math
from unittest import mock

import pytest
import yaml
from image_folders import write_jpeg_folder
from training_runs import tiny_cli, tiny_config, train_tiny

from generalist.cli import main
from generalist.config import build_config
from generalist.data import load_splits
from generalist.data.batches import EpochBatches
from generalist.data.splits import training_split_size
from generalist.errors import ConfigError
from generalist.schedules import build_schedule, schedule_position
from generalist.training import loop
from generalist.training.recipe import (
    ema_cap_record,
    ema_decay_cap,
    gamma_schedules,
    redistribution_epochs,
)

OFFICIAL_STEPS_PER_EPOCH = 391  # CIFAR-10's 50,000 training images in batches of 128
PLAN = {  # E: redistribution epochs of generalist-d (the table in docs/algorithm.md)
    3: [2, 3],
    8: [5, 6, 7, 8],
    40: [25, 27, 28, 30, 32, 33, 35, 37, 38, 40],
    120: list(range(75, 121, 5)),
    200: [125, 133, 142, 150, 158, 167, 175, 183, 192, 200],
}


def _config(epochs: int, *extra: str):
    return build_config("generalist-d", dataset="cifar10", overrides=[f"epochs={epochs}", *extra])


@pytest.mark.parametrize("epochs", sorted(PLAN))
def test_redistribution_keeps_the_official_shape(epochs):
    config = _config(epochs)
    plan = redistribution_epochs(config)
    assert plan == PLAN[epochs]
    assert plan[-1] == epochs  # the last epoch always redistributes, as the official 120th
    # as many of the official ten as there are epochs from t'·E on
    assert len(plan) == min(10, epochs - round(0.625 * epochs) + 1)
    _, gamma_adv = gamma_schedules(config)
    during_decay = [e for e in plan if gamma_adv(e) < 1]
    assert during_decay and len(during_decay) >= len(plan) - 2


def test_the_explicit_epoch_rule_is_the_official_formula():
    rule = ["merge.redistribute.unit=epoch", "merge.redistribute.start=75"]
    assert redistribution_epochs(_config(120, *rule, "merge.redistribute.every=5")) == PLAN[120]
    assert redistribution_epochs(_config(80, *rule, "merge.redistribute.every=5")) == [75, 80]
    assert redistribution_epochs(_config(8, "merge.redistribute.policy=never")) == []


@pytest.mark.parametrize("epochs", sorted(PLAN))
def test_a_minimum_gap_frees_epochs_in_short_runs_and_keeps_the_official_ones(epochs):
    """``min_gap`` spaces a short run's redistributions; a grid already that sparse (E = 120's
    every 5 epochs) is untouched, so the official run stays exactly official."""
    plan = redistribution_epochs(_config(epochs, "merge.redistribute.min_gap=2"))
    assert plan[-1] == epochs and plan[0] >= round(0.625 * epochs)
    assert all(later - earlier >= 2 for earlier, later in itertools.pairwise(plan))
    if all(b - a >= 2 for a, b in zip(PLAN[epochs], PLAN[epochs][1:], strict=False)):
        assert plan == PLAN[epochs]
    assert redistribution_epochs(_config(20, "merge.redistribute.min_gap=2")) == [14, 16, 18, 20]
    assert redistribution_epochs(_config(20, "merge.redistribute.min_gap=3")) == [14, 17, 20]


def test_a_minimum_gap_is_refused_where_it_means_nothing():
    with pytest.raises(ConfigError, match="min_gap"):
        _config(120, "merge.redistribute.unit=epoch", "merge.redistribute.min_gap=2")
    with pytest.raises(ConfigError, match="min_gap"):
        _config(20, "merge.redistribute.min_gap=0")


def test_a_config_from_before_the_unit_key_keeps_its_old_meaning():
    """Runs trained before ``unit`` existed (``every: 5`` meant epochs) still load and evaluate."""
    legacy = ["merge.redistribute.unit=null", "merge.redistribute.every=5"]
    assert redistribution_epochs(_config(16, *legacy)) == [10, 15]  # e >= 0.625·16, e mod 5 = 0
    assert redistribution_epochs(_config(16, "merge.redistribute.unit=null")) == list(range(10, 17))


@pytest.mark.parametrize("epochs", sorted(PLAN))
def test_the_ema_cap_averages_over_the_same_share_of_every_run(epochs):
    steps = epochs * OFFICIAL_STEPS_PER_EPOCH
    cap = ema_decay_cap(_config(epochs), steps)
    horizon = 1 / (1 - cap)  # steps an EMA with this decay averages over
    assert horizon / steps == pytest.approx(1000 / 46920)
    if epochs == 120:
        assert cap == 0.999  # exactly the official value, not merely close to it


def test_an_explicit_cap_is_kept_and_a_tiny_run_does_not_average():
    assert ema_decay_cap(_config(8, "merge.ema_decay=0.99"), 10) == 0.99
    assert ema_decay_cap(_config(1), 20) == 0.0  # 1000/46920 of 20 steps is under one step


@pytest.mark.parametrize(
    ("dataset", "training_images", "stated"),
    [("cifar10", 50_000, 0.99898), ("imagenet", 1_281_167, 0.999895)],
)
def test_the_caps_docs_algorithm_states(dataset, training_images, stated):
    """docs/algorithm.md's d_max for the profiles: CIFAR-10 with its 2 % validation split is not
    the official 0.999 (383 batches per epoch, not 391), ImageNet's 90 epochs average longer."""
    config = build_config("generalist-d", dataset=dataset)
    val = config.data.val_size
    held_out = round(val * training_images) if val < 1 else val
    steps = EpochBatches(training_images - held_out, config.data.batch_size, 0).num_batches
    record = ema_cap_record(config, steps)
    assert record["ema_decay"] == "auto" and record["total_steps"] == config.epochs * steps
    assert round(record["d_max"], len(str(stated)) - 2) == stated


def _dry_run(capsys, argv: list[str]) -> str:
    assert main([*argv, "--dry-run"]) == 0
    return capsys.readouterr().out


def test_dry_run_prints_the_cap_the_run_trains_with_and_the_manifest_records_it(tmp_path, capsys):
    horizon = ["merge.ema_horizon=1/4"]  # the tiny run's 24 steps would give d_max 0 otherwise
    out = _dry_run(capsys, tiny_cli(tmp_path, *horizon))
    config = tiny_config(tmp_path, *horizon)
    assert yaml.safe_load(out) == yaml.safe_load(config.to_yaml())  # still a loadable config
    line = out.splitlines()[-1]
    used = []
    original = loop.generalist_step

    def recording_step(here, merge, x, y, **kwargs):
        used.append(merge.decay_max)
        return original(here, merge, x, y, **kwargs)

    with mock.patch.object(loop, "generalist_step", recording_step):
        run = train_tiny(tmp_path, *horizon)
    manifest = json.loads((run / "manifest.json").read_text())
    steps = math.ceil(manifest["data"]["train"]["examples"] / config.data.batch_size)
    expected = 1 - 1 / (steps * config.epochs / 4)
    assert manifest["ema"]["d_max"] == pytest.approx(expected, abs=1e-15)
    assert set(used) == {manifest["ema"]["d_max"]}
    assert manifest["ema"]["steps_per_epoch"] == steps
    assert manifest["ema"]["ema_horizon"] == "1/4"
    assert line.startswith(f"# EMA cap d_max = {expected:.6g} (merge.ema_decay auto")
    assert f"{config.epochs} epochs x {steps} steps" in line


def test_dry_run_without_the_data_says_when_the_cap_is_resolved(tmp_path, capsys):
    argv = ["train", "--preset", "generalist-d", "--dataset", "cifar10"]
    line = _dry_run(capsys, [*argv, "--data-dir", str(tmp_path / "absent")]).splitlines()[-1]
    assert line.startswith("# EMA cap d_max: merge.ema_decay auto resolves it from the training")
    assert str(tmp_path / "absent") in line  # the reader's own error says what is missing
    given = _dry_run(capsys, [*argv, "--set", "merge.ema_decay=0.999"]).splitlines()[-1]
    assert given == "# EMA cap d_max = 0.999 (merge.ema_decay as given)"


def test_the_planned_training_split_is_the_one_training_gets(tmp_path):
    limits = {"val_size": 0.1, "train_limit": None}, {"val_size": 30, "train_limit": 50}
    for kwargs in limits:
        assert training_split_size("digits", **kwargs) == len(load_splits("digits", **kwargs).train)
    folder = write_jpeg_folder(tmp_path / "images", per_class=12, val_per_class=2)
    assert training_split_size("imagefolder", folder, val_size=8) == len(
        load_splits("imagefolder", folder, val_size=8, echo=lambda _: None).train
    )


def test_schedules_are_read_at_the_epoch_unless_asked_per_step():
    assert [schedule_position("epoch", 3, n, 4) for n in (1, 4)] == [3.0, 3.0]
    assert [schedule_position("step", 3, n, 4) for n in (1, 4)] == [2.25, 3.0]


@pytest.mark.parametrize("granularity", ["epoch", "step"])
def test_metrics_record_the_learning_rate_the_steps_used(tmp_path, granularity):
    run = train_tiny(tmp_path, f"schedule_granularity={granularity}", "eval.learners=false")
    config = build_config(user_yaml=run / "config.yaml")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        for name, learner in config.learners.items():
            lr = build_schedule(learner.optimizer.lr, config.epochs, name)
            epoch = record["epoch"]
            assert record["lr"][name] == lr(epoch)  # the last step's value, both ways
            if granularity == "step":
                assert record["lr_first"][name] == lr(epoch - 1 + 1 / 8)
            else:
                assert "lr_first" not in record
