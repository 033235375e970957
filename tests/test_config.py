"""Presets resolve to the published recipes, and bad configs fail early, naming the key."""

from __future__ import annotations

import pytest

from generalist.config import build_config
from generalist.errors import ConfigError
from generalist.presets import list_presets
from generalist.schedules import build_schedule
from generalist.training.recipe import ema_decay_cap, gamma_schedules, redistributes_in


def test_paper_defaults_resolve_to_the_official_recipe():
    config = build_config("generalist-d", dataset="cifar10")
    assert config.epochs == 120 and config.data.batch_size == 128
    assert config.model.name == "resnet18" and config.model.normalize is False
    assert list(config.learners) == ["natural", "adv_linf"]
    adv = config.learners["adv_linf"]
    threat, steps, step_size = config.threat_of(adv.task, "adv")
    assert (threat.norm, threat.eps, steps, step_size) == ("Linf", 0.031, 10, 0.007)
    assert adv.task.random_start is True
    nat = config.learners["natural"]
    assert adv.optimizer.weight_decay == 3.5e-3 and nat.optimizer.weight_decay == 5e-4
    for learner in (adv, nat):
        assert learner.optimizer.type == "sgd" and learner.optimizer.momentum == 0.9
        lr = build_schedule(learner.optimizer.lr, 120, "lr")
        assert [lr(e) for e in (0, 20, 40, 60, 80, 100, 120)] == pytest.approx(
            [0.01, 0.01, 0.01, 0.0055, 0.001, 0.00055, 0.0001]
        )
    nat_gamma, adv_gamma = gamma_schedules(config)
    assert [adv_gamma(e) for e in (1, 40, 80, 100, 120)] == pytest.approx([1, 1, 1, 0.7, 0.4])
    assert [nat_gamma(e) for e in (1, 80, 100, 120)] == pytest.approx([0, 0, 0.3, 0.6])
    assert config.schedule_granularity == "epoch"
    assert ema_decay_cap(config, 120 * 391) == 0.999 and config.merge.init == "same"
    assert config.merge.redistribute.policy == "per_step_in_epoch"
    assert [e for e in range(1, 121) if redistributes_in(config, e)] == list(range(75, 121, 5))


def test_schedules_scale_with_the_number_of_epochs():
    config = build_config("generalist-d", dataset="cifar10", overrides=["epochs=16"])
    assert [e for e in range(1, 17) if redistributes_in(config, e)] == list(range(10, 17))
    _, adv_gamma = gamma_schedules(config)
    assert adv_gamma(16) == pytest.approx(0.4)
    once = build_config(
        "generalist-d",
        dataset="cifar10",
        overrides=[
            "merge.redistribute.policy=once_per_c_epochs",
            "merge.redistribute.unit=epoch",
            "merge.redistribute.start=3",
            "merge.redistribute.every=2",
            "epochs=8",
        ],
    )
    assert [e for e in range(1, 9) if redistributes_in(once, e)] == [4, 6, 8]


@pytest.mark.parametrize("preset", list_presets())
@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "mnist", "digits"])
def test_every_preset_resolves_for_every_dataset(preset, dataset):
    # rst needs to be told where its unlabeled images are; nothing else needs more than a name
    unlabeled = ["data.unlabeled=rest", "data.train_limit=100"] if preset == "rst" else []
    config = build_config(preset, dataset=dataset, overrides=unlabeled)
    assert config.data.dataset == dataset
    assert config.eval_threats(), "every preset must validate against at least one threat"


def test_mnist_uses_the_usual_budget_and_small_cnn():
    config = build_config("generalist-t", dataset="mnist")
    threat, steps, step_size = config.threat_of(config.learners["adv_linf"].task, "adv")
    assert (threat.eps, steps, step_size, config.model.name) == (0.3, 40, 0.01, "small-cnn")


def test_multi_norm_presets_use_the_literature_budgets():
    config = build_config("generalist-m", dataset="cifar10")
    threats = {str(t) for t in config.eval_threats()}
    assert threats == {"Linf:8/255", "L2:0.5"}


def test_overrides_reach_nested_learner_values():
    config = build_config(
        "generalist-d",
        overrides=[
            "epochs=30",
            "learners.adv_linf.optimizer.lr=0.05",
            "learners.adv_linf.task.eps=4/255",
        ],
    )
    assert config.epochs == 30 and config.learners["adv_linf"].optimizer.lr == 0.05
    threat, _, step = config.threat_of(config.learners["adv_linf"].task, "adv")
    assert threat.eps == pytest.approx(4 / 255) and step == pytest.approx(2.5 * 4 / 255 / 10)


def test_user_yaml_layers_over_the_preset_and_can_remove_a_learner(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("epochs: 3\nlearners:\n  natural: null\n  adv_linf: {gamma: 1.0}\n")
    config = build_config("generalist-d", user_yaml=user)
    assert config.epochs == 3 and list(config.learners) == ["adv_linf"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["learners.adv_linf.gamma=0.5", "learners.natural.gamma=0.3"], r"sum to 0\.8"),
        (["learners.adv_linf.task.eps=-0.1"], r"learners\.adv_linf\.task\.eps: .*positive"),
        (["learners.adv_linf.task.eps=-8/255"], r"learners\.adv_linf\.task\.eps: .*positive"),
        (["budgets.Linf.eps=-0.1"], r"budgets\.Linf\.eps: .*positive"),
        (["learners.adv_linf.task.eps=abc"], r"learners\.adv_linf\.task\.eps: .*8/255"),
        (["learners.adv_linf.task.type=fgsm"], r"learners\.adv_linf\.task\.type"),
        (["model.name=resnet9000"], r"model\.name"),
        (["model.name=wrn-34-wide"], r"model\.name.*wrn-DEPTH-WIDTH"),
        (["learners.adv_linf.optimizr.lr=0.1"], r"learners\.adv_linf\.optimizr"),
        (["learners.adv_l2.gamma=0.5"], "no learner 'adv_l2'"),
        (["epochs=0"], "epochs"),
        (["learners.natural.optimizer.lr=-1"], r"learners\.natural\.optimizer\.lr"),
        (["learners.natural.optimizer.type=lion"], r"optimizer\.type"),
        (["data.dataset=imagenet21k"], r"data\.dataset"),
        (["merge.redistribute.policy=sometimes"], r"redistribute\.policy"),
        (["learners.adv_linf.gamma=1.5"], r"gamma.*out of range"),
        (["epochs=ten"], "whole number"),
        (["merge.ema_decay=1.0"], r"ema_decay"),
        (["merge.ema_decay=often"], r"merge\.ema_decay"),
        (["merge.ema_horizon=2"], r"merge\.ema_horizon.*1000/46920"),
        (["merge.redistribute.every=5"], r"merge\.redistribute.*unit=epoch"),
        (["merge.redistribute.unit=epoch", "merge.redistribute.every=1/2"], r"whole number"),
        (["merge.redistribute.unit=steps"], r"merge\.redistribute\.unit"),
        (["schedule_granularity=batch"], r"schedule_granularity"),
        (["eval.select=best"], r"eval\.select"),
        (["eval.select=clean_gated_robust"], r"eval\.select_min_clean.*88"),
        (["eval.select_min_clean=88"], r"eval\.select_min_clean.*remove"),
        (["seed"], "key=value"),
    ],
)
def test_bad_values_fail_before_training_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config("generalist-d", overrides=overrides)


def test_unknown_preset_and_bad_yaml_give_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown preset 'generalist-x'.*generalist-d"):
        build_config("generalist-x")
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config("generalist-d", user_yaml=broken)
    with pytest.raises(ConfigError, match="does not exist"):
        build_config("generalist-d", user_yaml=tmp_path / "missing.yaml")
