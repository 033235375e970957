"""Model selection on the validation split: model-best, what says which model, and resume."""

from __future__ import annotations

import json
import re

import pytest
import torch
from training_runs import (
    STEPS_PER_EPOCH,
    assert_same_result,
    only_run,
    sigterm_at_step,
    tiny_cli,
    tiny_config,
    train_tiny,
)

from generalist.cli import main
from generalist.data import load_splits
from generalist.errors import ConfigError
from generalist.evaluation.accuracy import accuracies
from generalist.evaluation.api import EvalRequest, run_eval
from generalist.evaluation.selection import selection_score
from generalist.reporting.runs import load_run
from generalist.weights import load_model, sha256_file


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("selection"))


def test_criteria_rank_by_what_they_say():
    val = {"clean": 90.0, "Linf:0.2": 40.0, "L2:1": 30.0}
    assert selection_score("clean+robust", val) == 120.0  # robust = the weakest threat
    assert selection_score("robust", val) == 30.0
    assert selection_score("clean_gated_robust", val, 85.0) == 30.0
    assert selection_score("clean_gated_robust", val, 95.0) is None
    assert selection_score("none", val) is None
    assert selection_score("robust", {"clean": 70.0}) == 70.0  # no threat: clean


def test_the_best_validated_model_is_saved_and_is_that_epochs_model(reference):
    metrics = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    scores = [selection_score("clean+robust", r["val"]["global"]) for r in metrics]
    best_epoch = metrics[scores.index(max(scores))]["epoch"]  # ties: the earliest
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["model"] == "last"
    assert summary["best"]["epoch"] == best_epoch and summary["best"]["criterion"] == "clean+robust"
    assert summary["best"]["val"] == metrics[best_epoch - 1]["val"]["global"]
    improved = [r["epoch"] for r, s in zip(metrics, scores, strict=True) if r.get("selected")]
    assert improved == [
        r["epoch"] for i, r in enumerate(metrics) if all(scores[i] > s for s in scores[:i])
    ]
    model, spec = load_model(reference / "model-best.safetensors")
    assert spec["selected"]["epoch"] == best_epoch and spec["selected"]["split"] == "val"
    config = tiny_config(reference.parent)
    splits = load_splits("digits", val_size=64, train_limit=256, test_limit=128)
    val = accuracies(
        model,
        splits.val,
        config.eval_threats(),
        steps=config.eval.val_steps,
        batch_size=config.data.eval_batch_size,
        device=torch.device("cpu"),
        seed=config.seed,
    )
    assert val == summary["best"]["val"]  # the file holds exactly the selected epoch's model


def test_eval_model_best_evaluates_the_selected_file_and_reports_say_so(reference, capsys):
    args = ["eval", str(reference), "--attacks", "pgd-2", "--n-examples", "20", "--no-progress"]
    assert main([*args, "--model", "best", "--out", str(reference / "eval-best")]) == 0
    record = json.loads((reference / "eval-best" / "eval.json").read_text())
    assert record["model"]["which"] == "best"
    assert record["model"]["sha256"] == sha256_file(reference / "model-best.safetensors")
    assert record["model"]["selected"]["criterion"] == "clean+robust"
    assert "(generalist eval, best model)" in load_run(reference).final_results().describe()
    assert main(["compare", str(reference)]) == 0
    assert "best model" in capsys.readouterr().out


def test_select_none_keeps_no_best_and_eval_best_says_why(tmp_path, capsys):
    run = train_tiny(tmp_path, "epochs=1", "eval.select=none")
    assert not (run / "model-best.safetensors").exists()
    assert json.loads((run / "summary.json").read_text())["best"] is None
    assert main(["eval", str(run), "--model", "best", "--attacks", "pgd-2", "--no-progress"]) != 0
    (line,) = capsys.readouterr().err.splitlines()
    assert re.search(r"no model-best\.safetensors.*--model last$", line)
    with pytest.raises(ConfigError, match=r"which best picks a model inside a run directory"):
        run_eval(EvalRequest(target=str(run / "model.safetensors"), which="best"))


def test_a_clean_gate_no_epoch_passes_selects_nothing(tmp_path):
    run = train_tiny(
        tmp_path, "epochs=1", "eval.select=clean_gated_robust", "eval.select_min_clean=100"
    )
    assert json.loads((run / "summary.json").read_text())["best"] is None


def test_resume_restores_the_best_from_the_checkpoint_not_from_the_files(tmp_path, reference):
    """A kill between writing model-best and the checkpoint (or mid-write) leaves files that
    disagree with the checkpoint; the resumed run continues from, and ends with, the latter."""
    out = tmp_path / "stopped"
    with sigterm_at_step(STEPS_PER_EPOCH + 2):
        main([*tiny_cli(out, "checkpoint.every_steps=100"), "--no-progress"])
    run = only_run(out)
    (run / "model-best.safetensors").write_bytes(b"torn")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same_result(run, reference)
