"""CURE: exact per-layer gradient conservation, the stochastic revision model, consistency,
warm-up and ``--init-from``, checked against brute-force computations on a tiny model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from generalist import cli
from generalist.attacks.threat import ThreatModel
from generalist.config import build_config
from generalist.errors import ConfigError
from generalist.schedules import PiecewiseLinear
from generalist.training import cure
from generalist.training.init import initialize_from
from generalist.training.learner import Learner
from generalist.training.tasks import TaskContext, TrainingAttack
from generalist.training.tasks.cure import CureParams, CureTask
from generalist.training.tasks.trades import trades_adversarial, trades_divergence
from generalist.weights import load_model, save_model

ATTACK = TrainingAttack(ThreatModel.of("Linf", "0.1"), steps=2, step_size=0.05)
TINY_SPEC = {
    "name": "tiny-cnn",
    "num_classes": 10,
    "in_channels": 1,
    "image_size": 8,
    "mean": None,
    "std": None,
}


def tiny_model(seed: int = 0) -> nn.Module:
    """Conv + BN + linear: masked kernels and matrices next to unmasked BN affine and biases."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 8 * 8, 10),
    )


def batch(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def cure_task(model: nn.Module, epochs: int = 1, *, pretrained: bool = False, **fields) -> CureTask:
    fields = {"beta": 5.0, "natural_warmup": 0.0, **fields}  # CURE from the first step
    context = TaskContext(attack=ATTACK, model=model, epochs=epochs, pretrained=pretrained)
    return CureTask.build(CureParams(**fields), context)


def learner_for(model: nn.Module, task: CureTask) -> Learner:
    return Learner(
        name="cure",
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4),
        lr_schedule=PiecewiseLinear.constant(0.1),
        gamma=PiecewiseLinear.constant(1.0),
        task=task,
        generator=torch.Generator().manual_seed(1),
    )


def lowest_by_brute_force(score: torch.Tensor, fraction: float) -> set[int]:
    values = score.reshape(-1).tolist()
    k = round(fraction * len(values))
    return set(sorted(range(len(values)), key=lambda i: (values[i], i))[:k])


def test_lowest_entries_is_an_exact_percentile_with_ties_broken_by_position():
    g = torch.Generator().manual_seed(0)
    # Few distinct values, so most of the cut falls inside a run of ties.
    score = torch.randint(0, 4, (7, 5, 3), generator=g).float()
    for fraction in (0.0, 0.3, 0.5, 0.999):
        mask = cure.lowest_entries(score, fraction)
        assert int(mask.sum()) == round(fraction * score.numel())
        chosen = set(mask.reshape(-1).nonzero().flatten().tolist())
        assert chosen == lowest_by_brute_force(score, fraction)
    # The memory format does not change which weights are chosen.
    channels_last = score.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    assert torch.equal(cure.lowest_entries(channels_last, 0.3)[0], cure.lowest_entries(score, 0.3))


def test_a_cure_step_zeroes_exactly_p_percent_of_each_weight_tensor_at_lowest_prominence():
    alpha, fraction, beta, gamma = 0.1, 0.3, 5.0, 1.0
    model = tiny_model()
    x, y = batch()
    reference = copy.deepcopy(model)
    learner = learner_for(model, cure_task(model, mask_fraction=fraction))
    generator_state = learner.generator.get_state()
    learner.train_step(x, y, position=0.5)

    # Brute force on the untouched copy: the same adversarial batch, then each gradient alone.
    x_adv = trades_adversarial(
        reference, x, y, ATTACK, torch.Generator().set_state(generator_state)
    )
    reference.train()
    revision = copy.deepcopy(reference)

    def gradients(loss_of) -> dict[str, torch.Tensor]:
        reference.zero_grad()
        loss_of(reference(x), reference(x_adv)).backward()
        return {n: p.grad.clone() for n, p in reference.named_parameters()}

    with torch.no_grad():
        revised = (revision(x), revision(x_adv))
    natural = gradients(lambda logits, adv: F.cross_entropy(logits, y))
    robust = gradients(lambda logits, adv: trades_divergence(logits, adv))
    total = gradients(
        lambda logits, adv: (
            F.cross_entropy(logits, y)
            + beta * trades_divergence(logits, adv)
            + gamma * cure.consistency(revised, (logits, adv))
        )
    )
    for name, param in model.named_parameters():
        if param.dim() < 2:  # BN affine and biases are never conserved
            torch.testing.assert_close(param.grad, total[name])
            continue
        score = alpha * natural[name].abs() + (1 - alpha) * robust[name].abs()
        zeroed = lowest_by_brute_force(score, fraction)
        assert len(zeroed) == round(0.3 * param.numel())
        flat_grad, flat_total = param.grad.reshape(-1), total[name].reshape(-1)
        kept = [i for i in range(param.numel()) if i not in zeroed]
        assert (flat_grad[sorted(zeroed)] == 0).all()
        torch.testing.assert_close(flat_grad[kept], flat_total[kept])
        assert (flat_total[sorted(zeroed)] != 0).sum() > 0  # the mask really removed something


def test_revision_is_updated_at_rate_r_and_then_equals_the_ema_formula():
    rate, decay, steps = 0.2, 0.9, 2000
    model = nn.Linear(4, 3)
    revision = cure.RevisionModel(model, rate=rate, decay=decay, seed=5)
    g = torch.Generator().manual_seed(0)
    updates = 0
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        before = [p.clone() for p in revision.model.parameters()]
        updated = revision.step(model)
        updates += updated
        d = min(decay, updates / (updates + 1))  # warmed up over the updates made so far
        pairs = zip(revision.model.parameters(), model.parameters(), strict=True)
        for old, (new, live) in zip(before, pairs, strict=True):
            if updated:
                torch.testing.assert_close(new, d * old + (1 - d) * live)
            else:
                assert torch.equal(new, old)
    assert revision.steps == steps and revision.updates == updates
    # Binomial(2000, 0.2): mean 400, standard deviation 17.9; allow four of them.
    assert abs(revision.updates - rate * steps) <= 4 * math.sqrt(steps * rate * (1 - rate))


def test_consistency_is_zero_exactly_when_the_revision_equals_the_model():
    model = tiny_model().train()
    x, _ = batch()
    x_adv = x.flip(0)
    revision = cure.RevisionModel(model, rate=1.0, decay=0.5, seed=0)
    logits = (model(x), model(x_adv))
    assert cure.consistency((revision(x), revision(x_adv)), logits).abs() < 1e-6
    with torch.no_grad():
        model[4].weight.add_(0.05 * torch.randn(model[4].weight.shape))
    logits = (model(x), model(x_adv))
    assert cure.consistency((revision(x), revision(x_adv)), logits) > 1e-3


def test_natural_warmup_trains_plain_cross_entropy_then_cure_begins_from_that_model():
    model = tiny_model()
    x, y = batch()
    task = cure_task(model, epochs=4, natural_warmup=0.5)  # CURE from epoch position 2
    learner = learner_for(model, task)
    with torch.no_grad():
        expected_warmup_loss = F.cross_entropy(copy.deepcopy(model).train()(x), y)
    warm = learner.train_step(x, y, position=1.0)
    torch.testing.assert_close(warm, expected_warmup_loss)
    assert task.revision.steps == 0
    learner.train_step(x, y, position=1.9)
    start = [p.detach().clone() for p in model.parameters()]
    learner.train_step(x, y, position=2.1)
    assert task.revision.steps == 1  # the revision restarted from `start`, then flipped its coin
    d = task.revision.decay_at(1) if task.revision.updates else 1.0
    pairs = zip(task.revision.model.parameters(), model.parameters(), strict=True)
    for old, (new, live) in zip(start, pairs, strict=True):
        torch.testing.assert_close(new, d * old + (1 - d) * live)
    assert task.settings.warmup_epochs == 2.0
    skip = cure_task(model, epochs=4, pretrained=True, natural_warmup=0.5)
    assert skip.settings.warmup_epochs == 0.0


def test_task_state_round_trips_the_revision_and_its_coin():
    model = tiny_model()
    x, y = batch()
    task = cure_task(model, revision_rate=0.5)
    learner = learner_for(model, task)
    for _ in range(3):
        learner.train_step(x, y, position=0.5)
    state = task.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    other = cure_task(tiny_model(seed=9), revision_rate=0.5)
    other.load_state_dict(state)
    assert other.revision.steps == 3 and other.revision.updates == task.revision.updates
    for key, value in task.revision.model.state_dict().items():
        assert torch.equal(other.revision.model.state_dict()[key], value), key
    flips = [task.revision.step(model) for _ in range(20)]
    assert [other.revision.step(model) for _ in range(20)] == flips


def test_init_from_copies_saved_weights_and_refuses_another_architecture(tmp_path):
    from generalist.models import create_model

    kwargs = {k: v for k, v in TINY_SPEC.items() if k != "name"}
    torch.manual_seed(3)
    saved = create_model("tiny-cnn", **kwargs)
    save_model(saved, tmp_path, {"model": TINY_SPEC})
    torch.manual_seed(4)
    fresh = create_model("tiny-cnn", **kwargs)
    initialize_from(fresh, str(tmp_path), TINY_SPEC)
    for key, value in saved.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with pytest.raises(ConfigError, match=r"model\.init_from: .*num_classes 10 vs 5"):
        initialize_from(
            create_model("tiny-cnn", **{**kwargs, "num_classes": 5}),
            str(tmp_path),
            {**TINY_SPEC, "num_classes": 5},
        )


def test_cure_preset_trains_from_init_from_on_the_command_line(tmp_path, capsys):
    common = [
        "--dataset", "digits", "--epochs", "1", "--no-progress",
        "--set", "data.train_limit=256", "--set", "data.test_limit=128",
        "--set", "data.val_size=64", "--set", "eval.val_steps=2", "--set", "eval.test_steps=3",
    ]  # fmt: skip
    assert cli.main(["train", "--preset", "standard", *common, "--out", str(tmp_path / "a")]) == 0
    (natural_run,) = (tmp_path / "a").iterdir()
    assert cli.main(
        ["train", "--preset", "cure", *common, "--init-from", str(natural_run),
         "--out", str(tmp_path / "b")]
    ) == 0  # fmt: skip
    (cure_run,) = (tmp_path / "b").iterdir()
    config = build_config(user_yaml=cure_run / "config.yaml")
    assert config.model.init_from == str(natural_run)
    trained, _ = load_model(cure_run)
    start, _ = load_model(natural_run)
    assert any(not torch.equal(v, start.state_dict()[k]) for k, v in trained.state_dict().items())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("learners.cure.task.mask_fraction=1.0", r"mask_fraction: 1 is out of range.*\[0, 1\)"),
        ("learners.cure.task.mask_fraction=-0.1", r"learners\.cure\.task\.params\.mask_fraction"),
        ("learners.cure.task.params.mask_fraction=-0.1", r"task\.params\.mask_fraction: -0\.1"),
        ("learners.cure.task.prominence_alpha=1.5", r"prominence_alpha: 1\.5 .*\[0, 1\]"),
        ("learners.cure.task.revision_rate=1.2", r"revision_rate: 1\.2 .*\[0, 1\]"),
        ("learners.cure.task.revision_decay=1", r"revision_decay: 1 .*\[0, 1\)"),
        ("learners.cure.task.consistency_weight=-1", r"consistency_weight: -1 .*>= 0"),
        ("learners.cure.task.natural_warmup=1", r"natural_warmup: 1 .*\[0, 1\)"),
        ("learners.cure.task.revision_rate=often", r"revision_rate.*not a number"),
        ("learners.cure.task.norm=L1", r"cure supports Linf and L2"),
        ("learners.cure.task.tau=1", r"unknown key 'learners\.cure\.task\.params\.tau'.*beta"),
        ("model.init_from=/nonexistent/run", r"model\.init_from: /nonexistent/run does not"),
    ],
)
def test_bad_cure_settings_are_rejected_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config("cure", dataset="digits", overrides=[override])


def test_cure_fields_are_only_accepted_on_cure_tasks():
    with pytest.raises(ConfigError, match=r"unknown key 'learners\.adv_linf\.task\.params\.rev"):
        build_config(
            "pgd-at", dataset="digits", overrides=["learners.adv_linf.task.revision_rate=0.2"]
        )


def test_cure_defaults_live_in_one_place_and_the_preset_uses_them():
    config = build_config("cure", dataset="cifar10")
    params = config.learners["cure"].task.params
    assert params == CureParams(beta=5.0)  # the preset restates nothing but the official beta
    assert (params.mask_fraction, params.prominence_alpha, params.consistency_weight) == (
        0.3,
        0.1,
        1.0,
    )
    built = cure_task(tiny_model(), epochs=config.epochs, natural_warmup=params.natural_warmup)
    # CURE starts from a naturally trained model: 10 % of the budget, unless init_from gives one
    assert params.natural_warmup == 0.1
    assert built.settings.warmup_epochs == pytest.approx(0.1 * config.epochs)
    pretrained = cure_task(tiny_model(), epochs=config.epochs, pretrained=True, natural_warmup=0.1)
    assert pretrained.settings.warmup_epochs == 0.0
    digits = build_config("cure", dataset="digits").learners["cure"].task
    assert digits.params.natural_warmup == 0  # measured: digits has too few steps for the jump
