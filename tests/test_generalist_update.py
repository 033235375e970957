"""The Generalist merge math, checked against the formulas of docs/algorithm.md computed by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from generalist.config import build_config
from generalist.errors import ConfigError
from generalist.training.generalist import START_RULES, GeneralistMerge, ema_decay, start_models


def tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def perturb(model: nn.Module, seed: int) -> None:
    """Stand-in for an optimizer step: move every float tensor, bump the BN counter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=gen))
            else:
                tensor.add_(1)


def test_decay_warms_up_then_saturates():
    assert ema_decay(0, 0.999, True) == pytest.approx(1 / 10)
    assert ema_decay(10, 0.999, True) == pytest.approx(11 / 20)
    assert ema_decay(10**6, 0.999, True) == 0.999
    assert ema_decay(0, 0.99, False) == 0.99


def test_global_equals_hand_computed_formula_over_several_steps():
    base = tiny_model(0)
    learners = [copy.deepcopy(base), copy.deepcopy(base)]
    merge = GeneralistMerge(learners, copy.deepcopy(base))
    keys = [k for k, v in base.state_dict().items() if v.is_floating_point()]
    teachers = [{k: base.state_dict()[k].clone() for k in keys} for _ in learners]
    global_ = {k: base.state_dict()[k].clone() for k in keys}
    schedule = [(0.3, 0.7), (0.5, 0.5), (1.0, 0.0)]
    for step, gammas in enumerate(schedule):
        for i, learner in enumerate(learners):
            perturb(learner, 100 * step + i)
        d = merge.update(step, gammas)
        assert d == pytest.approx(min(0.999, (step + 1) / (step + 10)))
        for i, learner in enumerate(learners):
            for k in keys:
                teachers[i][k] = d * teachers[i][k] + (1 - d) * learner.state_dict()[k]
        for k in keys:
            mix = sum(g * t[k] for g, t in zip(gammas, teachers, strict=True))
            global_[k] = d * global_[k] + (1 - d) * mix
    got = merge.global_model.state_dict()
    for k in keys:  # includes the BatchNorm running mean and variance
        torch.testing.assert_close(got[k], global_[k], rtol=1e-5, atol=1e-6)
        for i in range(2):
            torch.testing.assert_close(merge.teachers[i].state_dict()[k], teachers[i][k])


def test_integer_buffers_are_copied_not_averaged():
    base = tiny_model(0)
    learners = [copy.deepcopy(base), copy.deepcopy(base)]
    merge = GeneralistMerge(learners, copy.deepcopy(base))
    for step in range(3):
        for learner in learners:
            perturb(learner, step)
        merge.update(step, [0.5, 0.5])
    counter = merge.global_model.state_dict()["1.num_batches_tracked"]
    assert counter.dtype == torch.int64 and int(counter) == 3


def test_redistribute_copies_global_state_and_keeps_optimizer_momentum():
    base = tiny_model(0)
    learners = [copy.deepcopy(base), copy.deepcopy(base)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in learners]
    merge = GeneralistMerge(learners, copy.deepcopy(base))
    x = torch.randn(8, 3)
    for model, opt in zip(learners, optimizers, strict=True):
        model(x).sum().backward()
        opt.step()
    merge.update(0, [0.5, 0.5])
    momentum_before = [
        [opt.state[p]["momentum_buffer"].clone() for p in m.parameters()]
        for m, opt in zip(learners, optimizers, strict=True)
    ]
    merge.redistribute()
    for model, opt, before in zip(learners, optimizers, momentum_before, strict=True):
        for key, value in merge.global_model.state_dict().items():
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
        for p, m in zip(model.parameters(), before, strict=True):
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], m)
    # Redistribution copies: later learner updates do not leak into the global model.
    snapshot = copy.deepcopy(merge.global_model.state_dict())
    perturb(learners[0], 9)
    for key, value in merge.global_model.state_dict().items():
        assert torch.equal(value, snapshot[key])


def test_wrong_number_of_gammas_is_rejected():
    base = tiny_model(0)
    merge = GeneralistMerge([base], copy.deepcopy(base))
    with pytest.raises(ValueError, match="mixing weights"):
        merge.update(0, [0.5, 0.5])


def test_same_start_gives_every_learner_and_the_global_one_initialisation():
    base = tiny_model(0)
    models, global_model = start_models("same", base, lambda: tiny_model(1), [0.5, 0.5], seed=0)
    for model in [*models, global_model]:
        assert model is not base
        for key, value in base.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key


def test_independent_start_draws_each_learner_and_mixes_the_global_by_gamma():
    base = tiny_model(0)
    gammas = [0.25, 0.75]

    def fresh() -> nn.Module:
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))

    models, global_model = start_models("independent", base, fresh, gammas, seed=5)
    again, _ = start_models("independent", base, fresh, gammas, seed=5)
    weights = [m.state_dict()["0.weight"] for m in models]
    assert not torch.equal(weights[0], weights[1])  # each learner its own draw ...
    assert torch.equal(weights[1], again[1].state_dict()["0.weight"])  # ... fixed by the seed
    torch.manual_seed(5 + 2000)  # learner i's draw is seeded s + 1000·(i+1)
    assert torch.equal(weights[1], fresh().state_dict()["0.weight"])
    for key, value in global_model.state_dict().items():
        if value.is_floating_point():
            mix = 0.25 * models[0].state_dict()[key] + 0.75 * models[1].state_dict()[key]
            torch.testing.assert_close(value, mix, rtol=0, atol=0)
        else:
            assert torch.equal(value, base.state_dict()[key])


@pytest.mark.parametrize("rule", [*START_RULES, "shared"])
def test_the_config_accepts_exactly_the_start_rules(rule):
    def build():
        return build_config("generalist-d", dataset="digits", overrides=[f"merge.init={rule}"])

    if rule in START_RULES:
        assert build().merge.init == rule
    else:
        with pytest.raises(ConfigError, match=r"merge\.init"):
            build()
