"""FAT: early-stopped PGD stops attacking an example τ steps after it is first misclassified."""

from __future__ import annotations

import pytest
import torch
from conftest import linear_classifier

from generalist.attacks.base import feasible
from generalist.attacks.friendly_pgd import friendly_pgd
from generalist.attacks.pgd import pgd
from generalist.attacks.threat import ThreatModel
from generalist.config import build_config
from generalist.errors import ConfigError
from generalist.training import loop
from generalist.training.tasks import TaskContext, TrainingAttack, build_task
from generalist.training.tasks.fat import FriendlyAdversarialTask

THREAT = ThreatModel.of("Linf", "0.004")
STEPS = 8
STEP_SIZE = 0.0006


def expected_stops(fooled: torch.Tensor, tau: int) -> list[int]:
    """Brute force over the plain-PGD trajectory: ``fooled[k, i]`` says whether iterate k of
    example i is misclassified; each miss spends one unit of τ, a miss with none left stops."""
    stops = []
    for column in fooled.T.tolist():
        budget, stop = tau, STEPS
        for k, missed in enumerate(column[:STEPS]):
            if missed:
                if budget == 0:
                    stop = k
                    break
                budget -= 1
        stops.append(stop)
    return stops


@pytest.mark.parametrize("shrink_batch", [True, False], ids=["cpu-shrinks", "gpu-masks"])
@pytest.mark.parametrize("tau", [0, 2])
def test_each_example_is_frozen_tau_steps_after_its_first_misclassification(tau, shrink_batch):
    model, x, y, _ = linear_classifier(10, 96, seed=3)
    # Plain PGD without random start is deterministic, so iterate k is pgd(steps=k).
    trajectory = [
        pgd(model, x, y, THREAT, steps=k, step_size=STEP_SIZE, random_start=False)
        for k in range(STEPS + 1)
    ]
    with torch.no_grad():
        fooled = torch.stack([model(it).argmax(dim=1) != y for it in trajectory])
    stops = expected_stops(fooled, tau)
    # The batch mixes examples wrong from the start (they stop after exactly τ steps), broken
    # on the way, and never broken.
    assert min(stops) == tau and STEPS in stops and len(set(stops)) >= 4

    result = friendly_pgd(
        model,
        x,
        y,
        THREAT,
        steps=STEPS,
        step_size=STEP_SIZE,
        tau=tau,
        random_start=False,
        shrink_batch=shrink_batch,
    )
    assert result.steps_taken.tolist() == stops
    expected = torch.stack([trajectory[k][i] for i, k in enumerate(stops)])
    torch.testing.assert_close(result.x_adv, expected, rtol=0, atol=1e-6)
    assert feasible(THREAT, x, result.x_adv).all()
    with torch.no_grad():
        stopped_early = result.steps_taken < STEPS
        assert (model(result.x_adv[stopped_early]).argmax(1) != y[stopped_early]).all()


def test_tau_of_at_least_the_step_count_is_plain_pgd():
    model, x, y, _ = linear_classifier(10, 64, seed=4)
    generators = [torch.Generator().manual_seed(7) for _ in range(2)]
    friendly = friendly_pgd(
        model, x, y, THREAT, steps=STEPS, step_size=STEP_SIZE, tau=STEPS, generator=generators[0]
    )
    plain = pgd(model, x, y, THREAT, steps=STEPS, step_size=STEP_SIZE, generator=generators[1])
    torch.testing.assert_close(friendly.x_adv, plain, rtol=0, atol=1e-6)
    assert (friendly.steps_taken == STEPS).all()


def test_fat_preset_raises_tau_over_training_as_fat_py_does():
    config = build_config("fat", dataset="digits", overrides=["epochs=12"])
    attack = TrainingAttack(THREAT, STEPS, STEP_SIZE)
    task = build_task(
        "fat", TaskContext(attack=attack, epochs=12), config.learners["fat"].task.params
    )
    assert isinstance(task, FriendlyAdversarialTask)
    # 0 until 50/120 of the run, 1 until 90/120, then 2.
    assert [task.tau_at(e) for e in (0.5, 4.9, 5.1, 8.9, 9.1, 12.0)] == [0, 0, 1, 1, 2, 2]


def test_fat_preset_trains_on_digits(tmp_path):
    config = build_config(
        "fat",
        dataset="digits",
        overrides=[
            "epochs=1",
            "data.train_limit=256",
            "data.test_limit=128",
            "data.val_size=64",
            "eval.val_steps=2",
            "eval.test_steps=3",
            f"out_dir={tmp_path}",
        ],
    )
    result = loop.train(config, progress=False, echo=lambda *_: None)
    loss = result.run.read_metrics()[0]["train_loss"]["fat"]
    assert torch.isfinite(torch.tensor(loss))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("learners.fat.task.tau=-1", r"learners\.fat\.task\.params\.tau.*out of range"),
        ("learners.fat.task.tau={unit: epoch, points: [[0, 0], [5, -2]]}", r"params\.tau\.points"),
        ("learners.fat.task.params.tau=lots", r"learners\.fat\.task\.params\.tau.*not a number"),
        ("learners.fat.task.mask_fraction=0.3", r"unknown key .*params\.mask_fraction.*: tau$"),
    ],
)
def test_bad_fat_settings_are_rejected_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config("fat", dataset="digits", overrides=[override])


def test_tau_is_only_accepted_on_fat_tasks():
    with pytest.raises(ConfigError, match=r"unknown key .*trades\.task\.params\.tau.*: beta$"):
        build_config("trades", dataset="digits", overrides=["learners.trades.task.tau=1"])
