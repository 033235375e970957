"""The official recipe keeps its shape at any length (docs/algorithm.md, "How each rule is laid
on E epochs"), and the schedules are read once per epoch unless a config asks per step."""

from __future__ import annotations

import json

import pytest
from training_runs import train_tiny

from generalist.config import build_config
from generalist.schedules import build_schedule, schedule_position
from generalist.training.recipe import (
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
