"""The Generalist merge math, checked against the formulas of docs/algorithm.md computed by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from generalist.training.generalist import GeneralistMerge, ema_decay


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
