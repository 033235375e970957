"""`generalist eval` and the evaluation suite on a tiny CNN trained on scikit-learn's digits.

What users rely on: the record, tables and model_info carry clean, per-attack, worst-case and
union accuracies that obey the set algebra (union ≤ worst case ≤ every attack); the record
pins the exact model file, data and software; a killed evaluation resumed from its state file
ends with the same per-point results as an uninterrupted one; bad input is a one-line error.
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from generalist import compiling
from generalist.config import build_config
from generalist.data import load_splits, to_float
from generalist.errors import CheckpointError, ConfigError, GeneralistError
from generalist.evaluation.cli_eval import add_eval_parser, cmd_eval, eval_from_args
from generalist.evaluation.records import build_record, model_info
from generalist.evaluation.suite import EvaluationSuite, Progress
from generalist.evaluation.tables import render_markdown
from generalist.models import create_model
from generalist.weights import load_model, save_model, sha256_file

N = 40
BATCH = 16
CHEAP = ["--attacks", "pgd-5,apgd-ce", "--n-iter", "5", "--batch-size", str(BATCH)]
THREAT_LIST = ["Linf:0.1", "L2:1.0"]
THREATS = ["--threat", THREAT_LIST[0], "--threat", THREAT_LIST[1]]


@pytest.fixture(scope="module")
def digits():
    return load_splits("digits", val_size=0.1, split_seed=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits) -> Path:
    """A run directory like `generalist train` leaves: weights, spec and config.yaml."""
    torch.manual_seed(0)
    info = digits.info
    spec = {
        "name": "tiny-cnn",
        "num_classes": info.num_classes,
        "in_channels": info.image_shape[0],
        "image_size": info.image_shape[-1],
        "mean": list(info.mean),
        "std": list(info.std),
    }
    model = create_model(**spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = to_float(digits.train.images), digits.train.labels
    for _ in range(4):
        for idx in torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    path = tmp_path_factory.mktemp("run")
    save_model(model.eval(), path, {"model": spec, "dataset": "digits"})
    config = build_config("pgd-at", dataset="digits", overrides=["data.val_size=0.1"])
    (path / "config.yaml").write_text(config.to_yaml())
    return path


def eval_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    return parser.parse_args(["eval", *argv])


def cheap_args(run_dir: Path, out: Path, *extra: str) -> argparse.Namespace:
    return eval_args(
        str(run_dir),
        "--no-progress",
        "--n-examples",
        str(N),
        "--out",
        str(out),
        *CHEAP,
        *THREATS,
        *extra,
    )


def results_only(record: dict) -> dict:
    """The parts of a record that must not depend on interruptions (no timings, no dates)."""

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if "seconds" not in k}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return strip({k: record[k] for k in ("clean", "threats", "union", "warnings", "data")})


# --- outputs ----------------------------------------------------------------------------------


def test_eval_writes_record_tables_and_model_info(run_dir, digits, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cmd_eval(cheap_args(run_dir, out)) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "eval.json").read_text())

    # the record pins the model file, the evaluated images and the software
    assert record["model"]["sha256"] == sha256_file(run_dir / "model.safetensors")
    evaluated = digits.test.subset(torch.arange(N))
    assert record["data"]["fingerprint"] == evaluated.fingerprint()
    assert record["data"]["split"] == "test" and record["data"]["n_examples"] == N
    assert {"python", "torch", "numpy", "generalist"} <= set(record["software"])
    assert record["settings"]["seed"] == 0

    # clean accuracy is the model's, on exactly those images
    model, _ = load_model(run_dir)
    with torch.no_grad():
        correct = int((model(to_float(evaluated.images)).argmax(1) == evaluated.labels).sum())
    assert record["clean"]["count"] == correct > N // 2

    linf, l2 = record["threats"]
    assert (linf["threat"], linf["eps_text"], linf["eps"]) == ("Linf:0.1", "0.1", 0.1)
    assert (l2["norm"], l2["eps"]) == ("L2", 1.0)
    for entry in record["threats"]:
        assert [a["name"] for a in entry["attacks"]] == ["pgd-5", "apgd-ce"]
        for attack in entry["attacks"]:
            assert attack["parameters"]["seed"] == 0
            assert entry["worst_case"]["count"] <= attack["count"] <= correct
        assert record["union"]["count"] <= entry["worst_case"]["count"]
    # an undefended model on digits is broken by these budgets: the suite counts breaks
    assert linf["worst_case"]["count"] < correct

    table = (out / "results.md").read_text()
    assert table in printed
    for text in ("Linf:0.1", "L2:1.0", "pgd-5", "apgd-ce", "clean", "worst case", "union"):
        assert text in table
    union_row = next(line for line in table.splitlines() if "union" in line)
    assert f"{record['union']['accuracy']:.2f}" in union_row

    info = json.loads((out / "model_info.json").read_text())
    assert info["eps"] == "0.1" and info["dataset"] == "digits"
    assert info["clean_acc"] == f"{record['clean']['accuracy']:.2f}"
    assert info["autoattack_acc"] == f"{linf['worst_case']['accuracy']:.2f}"
    assert info["additional_data"] is False and info["number_forward_passes"] == 1
    assert info["reported"] is None and "unreliable" in info
    assert "not AutoAttack" in info["footnote"]
    assert json.loads((out / "model_info_L2_1.0.json").read_text())["eps"] == "1.0"


def test_default_threats_come_from_the_run_config(run_dir, tmp_path):
    _, record = eval_from_args(
        eval_args(
            str(run_dir), "--no-progress", "--n-examples", "8", "--out", str(tmp_path / "e"), *CHEAP
        )
    )
    expected = build_config(user_yaml=run_dir / "config.yaml").eval_threats()
    assert [t["threat"] for t in record["threats"]] == [str(t) for t in expected]


# --- per-point algebra ------------------------------------------------------------------------


class TrainModeSpy(nn.Module):
    """Wraps a model and remembers whether it was ever called in training mode."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.saw_training = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.saw_training |= self.training
        return self.inner(x)


def test_worst_case_and_union_are_per_point_ands(run_dir, digits):
    model, _ = load_model(run_dir)
    spy = TrainModeSpy(model).train()
    suite = EvaluationSuite(THREAT_LIST, ["pgd-5", "apgd-ce"], n_iter=5, batch_size=BATCH)
    result = suite.run(spy, digits.test.subset(torch.arange(N)))
    assert not spy.saw_training and spy.training  # evaluated in eval mode, mode restored after

    worst = [t.worst_case for t in result.threats]
    assert torch.equal(result.union, worst[0] & worst[1])
    for outcome, mask in zip(result.threats, worst, strict=True):
        for attack in outcome.attacks:
            assert not (attack.robust & ~result.clean).any()  # robust implies clean-correct
            assert not (mask & ~attack.robust).any()  # worst case below every attack
    assert result.union.sum() < result.clean.sum()


# --- resume -----------------------------------------------------------------------------------


class Killed(Exception):
    pass


def test_resume_after_kill_equals_uninterrupted(run_dir, tmp_path):
    full_out, full = eval_from_args(cheap_args(run_dir, tmp_path / "full"))

    events: list[Progress] = []

    def kill_midway(progress: Progress) -> None:
        events.append(progress)
        if len(events) == 9:  # inside the second threat model's first attack
            raise Killed

    with pytest.raises(Killed):
        eval_from_args(cheap_args(run_dir, tmp_path / "killed"), on_progress=kill_midway)
    assert events[-1].threat == "L2:1.0" and 0 < events[-1].done < N
    assert not (tmp_path / "killed" / "eval.json").exists()

    resumed_events: list[Progress] = []
    out, resumed = eval_from_args(
        cheap_args(run_dir, tmp_path / "killed", "--resume", str(tmp_path / "killed")),
        on_progress=resumed_events.append,
    )
    assert results_only(resumed) == results_only(full)
    # nothing finished before the kill was attacked again
    total = len(events) + len(resumed_events)
    uninterrupted: list[Progress] = []
    eval_from_args(cheap_args(run_dir, tmp_path / "again"), on_progress=uninterrupted.append)
    assert total == len(uninterrupted)
    full_state = json.loads((full_out / "state.json").read_text())
    resumed_state = json.loads((out / "state.json").read_text())
    assert resumed_state["jobs"] == {
        key: {**job, "seconds": resumed_state["jobs"][key]["seconds"]}
        for key, job in full_state["jobs"].items()
    }


def test_autoattack_resumes_mid_attack_and_reports_its_stages(run_dir, digits, tmp_path):
    model, _ = load_model(run_dir)
    data = digits.test.subset(torch.arange(24))
    suite = EvaluationSuite(["Linf:0.1"], ["autoattack"], n_iter=5, batch_size=BATCH)
    full = suite.run(model, data, state_path=tmp_path / "full.json")

    def kill_after_first_apgd_batch(progress: Progress) -> None:
        if progress.attack == "autoattack/apgd-ce":
            assert 0 < progress.done < progress.total
            raise Killed

    with pytest.raises(Killed):
        suite.run(
            model,
            data,
            state_path=tmp_path / "killed.json",
            on_progress=kill_after_first_apgd_batch,
        )
    resumed = suite.run(model, data, state_path=tmp_path / "killed.json")

    full_aa, resumed_aa = full.threats[0].attacks[0], resumed.threats[0].attacks[0]
    assert [s.name for s in full_aa.stages] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert torch.equal(full_aa.robust, resumed_aa.robust)
    for a, b in zip(full_aa.stages, resumed_aa.stages, strict=True):
        assert torch.equal(a.robust, b.robust)
    assert full_aa.robust.sum() < full.clean.sum()

    out, record = eval_from_args(
        eval_args(
            str(run_dir),
            "--no-progress",
            "--n-examples",
            "24",
            "--threat",
            "Linf:0.1",
            "--attacks",
            "autoattack",
            "--n-iter",
            "5",
            "--out",
            str(tmp_path / "cli"),
        )
    )
    entry = record["threats"][0]["attacks"][0]
    assert entry["parameters"]["name"] == "autoattack" and entry["parameters"]["n_iter"] == 5
    assert [s["name"] for s in entry["stages"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert "autoattack: after square" in (out / "results.md").read_text()
    assert "not AutoAttack" not in json.loads((out / "model_info.json").read_text())["footnote"]


def test_resume_with_other_settings_is_refused(run_dir, tmp_path):
    out, _ = eval_from_args(cheap_args(run_dir, tmp_path / "e"))
    with pytest.raises(ConfigError, match=r"different evaluation.*seed") as info:
        eval_from_args(cheap_args(run_dir, out, "--resume", str(out), "--seed", "1"))
    assert "\n" not in str(info.value)


# --- sanity checks ----------------------------------------------------------------------------


class QuantisedInput(nn.Module):
    """Rounds its input to 4 levels first: gradients w.r.t. the input are exactly zero."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * 3) / 3)


def test_gradient_masking_is_flagged_in_table_and_model_info(run_dir, digits):
    model, _ = load_model(run_dir)
    suite = EvaluationSuite(["Linf:0.1"], ["pgd-5"], batch_size=BATCH)
    data = digits.test.subset(torch.arange(N))
    result = suite.run(QuantisedInput(model), data)
    assert any("gradient" in w for w in result.warnings)
    record = build_record(
        result,
        model={"path": "m", "sha256": "0" * 64},
        settings={"seed": 0},
        data={"dataset": "digits", "split": "test", "fingerprint": data.fingerprint()},
        seconds=1.0,
    )
    table = render_markdown(record)
    warnings_at = table.index("Warnings")
    assert table.index("worst case") < warnings_at < table.index("Summary")
    info = model_info(record, 0, name="masked", architecture="tiny-cnn")
    assert info["unreliable"] is True


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "error", "phrase"),
    [
        (["{missing}"], CheckpointError, "does not exist"),
        (["{run}", "--attacks", "pgd-5,nope"], ConfigError, "unknown attack"),
        (["{run}", "--threat", "Linf:eight"], ConfigError, "8/255"),
        (["{run}", "--threat", "L3:0.1"], ConfigError, "unknown norm"),
        (["{run}", "--norm", "Linf"], ConfigError, "pairs"),
        (["{run}", "--n-examples", "100000"], ConfigError, "n-examples"),
        (["{run}", "--resume", "{missing}"], ConfigError, "state.json"),
        (["{weights}"], ConfigError, "--threat"),
    ],
)
def test_bad_input_is_a_one_line_error(run_dir, tmp_path, argv, error, phrase):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.safetensors", "model.json"):
        (bare / name).write_bytes((run_dir / name).read_bytes())
    paths = {"run": run_dir, "missing": tmp_path / "nowhere", "weights": bare / "model.safetensors"}
    argv = [a.format(**paths) for a in argv]
    if "--resume" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    with pytest.raises(error) as info:
        eval_from_args(eval_args(*argv, "--no-progress"))
    assert isinstance(info.value, GeneralistError)
    assert phrase in str(info.value) and "\n" not in str(info.value)


def test_bare_weights_evaluate_next_to_the_file(run_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.safetensors", "model.json"):
        (bare / name).write_bytes((run_dir / name).read_bytes())
    out, record = eval_from_args(
        eval_args(
            str(bare / "model.safetensors"),
            "--no-progress",
            "--n-examples",
            "8",
            "--threat",
            "Linf:0.1",
            *CHEAP,
        )
    )
    assert out.parent == bare and out.name.startswith("eval-")
    assert record["data"]["dataset"] == "digits"


def test_the_clean_pass_runs_once_for_the_suite_and_its_autoattacks(run_dir, digits, tmp_path):
    model, _ = load_model(run_dir)
    data = digits.test.subset(torch.arange(24))
    suite = EvaluationSuite(THREAT_LIST, ["autoattack"], n_iter=2, batch_size=BATCH)
    result = suite.run(model, data, state_path=tmp_path / "state.json")
    # one forward pass per point for the suite's clean pass, and no AutoAttack of the two
    # threat models classifies the points again: each starts from the suite's clean mask
    assert (result.clean_passes.forward, result.clean_passes.backward) == (24, 0)
    state = json.loads((tmp_path / "state.json").read_text())
    for threat in THREAT_LIST:
        spent = state["jobs"][f"{threat} autoattack"]["autoattack"]["cost"]
        assert set(spent) == {"apgd-ce", "apgd-t", "fab-t", "square"}
    with torch.no_grad():
        expected = model(to_float(data.images)).argmax(dim=1) == data.labels
    assert torch.equal(result.clean, expected)
    for threat in result.threats:
        assert not (threat.attacks[0].robust & ~expected).any()
        assert threat.attacks[0].robust.sum() < expected.sum()


def test_a_compiled_evaluation_with_its_own_threads_gives_the_same_results(
    run_dir, tmp_path, monkeypatch
):
    """``--compile`` compiles in place (same weights hash) and ``--threads`` only sets speed."""
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")  # no C++ build in a test
    pgd_only = ("--attacks", "pgd-5")
    _, plain = eval_from_args(cheap_args(run_dir, tmp_path / "plain", *pgd_only))
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # --threads 1 must bring it back to 1
    try:
        _, compiled = eval_from_args(
            cheap_args(run_dir, tmp_path / "compiled", *pgd_only, "--compile", "--threads", "1")
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert compiled["model"]["sha256"] == plain["model"]["sha256"]
    assert results_only(compiled) == results_only(plain)


# --- weights that do not fit, flags out of range, masking by scaled logits (issue 19) -------


def _with_spec(run_dir: Path, tmp_path: Path, edit) -> Path:
    """A copy of the run's weights whose model.json ``edit`` changed."""
    copy = tmp_path / "weights"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes((run_dir / "model.safetensors").read_bytes())
    spec = json.loads((run_dir / "model.json").read_text())
    edit(spec)
    (copy / "model.json").write_text(json.dumps(spec))
    return copy / "model.safetensors"


def _eval_error(target: Path, tmp_path: Path, *extra: str) -> str:
    with pytest.raises(GeneralistError) as failed:
        eval_from_args(
            eval_args(
                str(target),
                "--no-progress",
                "--dataset",
                "digits",
                "--n-examples",
                "8",
                "--out",
                str(tmp_path / "out"),
                *CHEAP,
                "--threat",
                "Linf:0.1",
                *extra,
            )
        )
    return str(failed.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda s: s["model"].pop("name"),
            "is not a valid model spec: its 'model' needs the architecture's 'name'",
        ),
        (
            lambda s: s["model"].update(depth=3),
            "asks for a model that cannot be built (",
        ),
        (
            lambda s: s["model"].update(name="resnet18"),
            "does not fit the architecture in {spec}: missing [",
        ),
        (
            lambda s: s["model"].update(num_classes=10**9),
            "does not fit the architecture in {spec}: 'net.classifier.weight' is "
            "float32[10, 32] where float32[1000000000, 32] is expected",
        ),
        (
            lambda s: s.pop("sha256"),
            "has no sha256 of model.safetensors, so a damaged or swapped file would load "
            "silently; re-save the model with generalist, add its sha256, or pass "
            "--trust-unhashed to generalist eval if you trust the file",
        ),
    ],
    ids=["no-name", "extra-key", "other-architecture", "huge", "no-hash"],
)
def test_weights_whose_spec_does_not_fit_are_one_line_before_any_allocation(
    run_dir, tmp_path, edit, message
):
    weights = _with_spec(run_dir, tmp_path, edit)
    error = _eval_error(weights, tmp_path)
    assert message.format(spec=weights.with_name("model.json")) in error
    assert "\n" not in error and len(error) < 400


def test_unhashed_weights_load_when_the_user_says_so(run_dir, tmp_path):
    weights = _with_spec(run_dir, tmp_path, lambda s: s.pop("sha256"))
    with pytest.raises(CheckpointError):
        load_model(weights)
    model, _ = load_model(weights, trust_unhashed=True)
    reference, _ = load_model(run_dir)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True)
    )


def test_a_plain_pickle_is_called_what_it_is(run_dir, tmp_path):
    weights = tmp_path / "m.pt"
    weights.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=2))
    spec = json.loads((run_dir / "model.json").read_text())
    spec["sha256"] = sha256_file(weights)
    (tmp_path / "model.json").write_text(json.dumps(spec))
    assert _eval_error(weights, tmp_path) == (
        f"{weights} is a plain Python pickle, not a PyTorch state dict (torch.save writes a zip "
        "archive of tensors); save the weights with safetensors.torch.save_file("
        "model.state_dict(), ...)"
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--batch-size", "0"],
            "--batch-size 0: must be at least 1 (leave it out for the default)",
        ),
        (["--n-iter", "-1"], "--n-iter -1: must be at least 1 (leave it out for the default)"),
        (
            ["--threat", "Linf:2"],
            "epsilon '2' is larger than the whole [0, 1] pixel range, so the Linf ball holds "
            "every image; write it like 2/255 for pixel levels",
        ),
    ],
)
def test_eval_flags_out_of_range_are_refused(run_dir, tmp_path, extra, message):
    assert _eval_error(run_dir, tmp_path, *extra) == message


class ScaledLogits(nn.Module):
    """Logits ×1e4: the softmax saturates, cross-entropy gradients vanish in float32."""

    def __init__(self, model: nn.Module, scale: float) -> None:
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.scale


def test_scaled_logits_that_hide_from_cross_entropy_are_flagged(run_dir, digits):
    model, _ = load_model(run_dir)
    data = digits.test.subset(torch.arange(N))
    suite = EvaluationSuite(["Linf:0.3"], ["apgd-ce", "apgd-t"], n_iter=10, batch_size=BATCH)
    masked = suite.run(ScaledLogits(model, 1e4), data).threats[0]
    ce, margin = (int(a.robust.sum()) for a in masked.attacks)
    assert ce > margin  # the masking is real: CE leaves points the margin attack breaks
    assert any("cross-entropy gradients probably vanish" in w for w in masked.warnings)
    honest = suite.run(ScaledLogits(model, 1.0), data).threats[0]
    assert not any("cross-entropy" in w for w in honest.warnings)
