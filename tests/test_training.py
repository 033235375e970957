"""End-to-end training on real digits: run directory, determinism, redistribution, tasks."""

from __future__ import annotations

import json

import pytest
import torch
from training_runs import TINY_DATA

from generalist.config import build_config
from generalist.data import load_splits
from generalist.errors import TrainingError
from generalist.evaluation.accuracy import accuracies
from generalist.training import loop
from generalist.training.generalist import GeneralistMerge
from generalist.weights import load_model

FAST = [*TINY_DATA, "data.batch_size=64"]


def fast_config(tmp_path, preset="quickstart", extra=()):
    return build_config(preset, dataset="digits", overrides=[*FAST, f"out_dir={tmp_path}", *extra])


def test_quickstart_writes_a_complete_run_directory(tmp_path):
    config = fast_config(tmp_path, extra=["epochs=2"])
    result = loop.train(config, progress=False, echo=lambda *_: None)
    run = result.run.path
    assert {p.name for p in run.iterdir()} >= {
        "config.yaml",
        "metrics.jsonl",
        "model.safetensors",
        "model.json",
        "summary.json",
    }
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert set(record["train_loss"]) == {"natural", "adv_linf"}
        assert set(record["val"]) == {"global", "natural", "adv_linf"}
        assert set(record["val"]["global"]) == {"clean", "Linf:0.2"}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"] == result.test
    # The saved global model reproduces the reported test accuracy exactly.
    model, spec = load_model(run)
    assert spec["model"]["name"] == "tiny-cnn" and spec["dataset"] == "digits"
    splits = load_splits("digits", val_size=64, train_limit=256, test_limit=128)
    again = accuracies(
        model,
        splits.test,
        config.eval_threats(),
        steps=3,
        batch_size=500,
        device=torch.device("cpu"),
        seed=config.seed,
    )
    assert again == result.test
    # The resolved config in the run directory rebuilds the same config.
    assert build_config(user_yaml=run / "config.yaml").to_dict() == config.to_dict()


def test_same_seed_gives_identical_weights(tmp_path):
    weights = []
    for i in range(2):
        config = fast_config(tmp_path / str(i), extra=["epochs=1"])
        result = loop.train(config, progress=False, echo=lambda *_: None)
        weights.append(load_model(result.run.path)[0].state_dict())
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


@pytest.mark.parametrize(
    ("policy", "expected_calls"), [("per_step_in_epoch", 4), ("once_per_c_epochs", 1)]
)
def test_redistribution_happens_exactly_when_configured(
    tmp_path, monkeypatch, policy, expected_calls
):
    calls = []
    original = GeneralistMerge.redistribute
    monkeypatch.setattr(
        GeneralistMerge, "redistribute", lambda self: (calls.append(1), original(self))
    )
    config = fast_config(
        tmp_path,
        extra=[
            "epochs=3",
            f"merge.redistribute.policy={policy}",
            "merge.redistribute.unit=epoch",
            "merge.redistribute.start=2",
            "merge.redistribute.every=2",
            "eval.learners=false",
            "eval.every=3",
        ],
    )
    result = loop.train(config, progress=False, echo=lambda *_: None)
    # 256 training examples at batch 64 = 4 steps per epoch; only epoch 2 redistributes.
    assert [r["redistributed"] for r in result.run.read_metrics()] == [False, True, False]
    assert len(calls) == expected_calls


@pytest.mark.parametrize("preset", ["trades", "mart", "generalist-t", "standard"])
def test_every_task_trains_with_finite_losses(tmp_path, preset):
    config = fast_config(tmp_path, preset, extra=["epochs=1", "eval.learners=false"])
    result = loop.train(config, progress=False, echo=lambda *_: None)
    record = result.run.read_metrics()[0]
    assert all(torch.isfinite(torch.tensor(v)) for v in record["train_loss"].values())


def test_diverging_learner_stops_with_a_clear_error(tmp_path):
    config = fast_config(
        tmp_path, "standard", extra=["epochs=1", "learners.natural.optimizer.lr=1e30"]
    )
    with pytest.raises(TrainingError, match=r"natural.*learners\.natural\.optimizer\.lr"):
        loop.train(config, progress=False, echo=lambda *_: None)
