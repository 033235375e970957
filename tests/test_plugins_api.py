"""Your own model, data and checkpoint: plug-ins by import path, ``eval --arch``, ``eval
--resume DIR`` alone, and the public Python API (issue 32's "open doors").

Every plug-in module is written into the test's own folder under a name no other test uses,
so Python's module cache cannot hand one test another's class.
"""

from __future__ import annotations

import itertools
import json
import re
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from training_runs import TINY_DATA, only_run

import generalist
from generalist.cli import main
from generalist.config import build_config
from generalist.data import load_splits
from generalist.errors import ConfigError, DataError, GeneralistError
from generalist.evaluation.api import EvalRequest, run_eval
from generalist.models import create_model
from generalist.plugins import file_sha256

_names = itertools.count()

NETS = """
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes=10, in_channels=1, width=4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def wide(num_classes, **rest):
    return TinyNet(num_classes=num_classes, in_channels=rest["in_channels"], width=6)


NOT_CALLABLE = 3


def not_a_module(num_classes):
    return "a string"


def read(data_dir):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images[:, None] * 255 / 16).round().astype("uint8")
    return x[:300], digits.target[:300], torch.from_numpy(x[1500:]), digits.target[1500:]


def read_wrong(data_dir):
    return {"x_train": 1}
"""


@pytest.fixture
def nets(tmp_path, monkeypatch) -> str:
    """The name of a fresh plug-in module in the working directory (as ``PYTHONPATH=.``)."""
    name = f"mynets_{next(_names)}"
    (tmp_path / f"{name}.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


TRAIN = ("train", "--preset", "pgd-at", "--no-progress", "--out", "runs", "--dataset")


def tiny_sets(*extra: str) -> list[str]:
    items = [*TINY_DATA, "data.batch_size=64", "epochs=1", *extra]
    return [arg for item in items for arg in ("--set", item)]


def cli(*argv: str) -> int:
    return main([*argv])


def one_error_line(capsys) -> str:
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    return line


# --------------------------------------------------------------------------- model plug-ins


def test_a_model_by_import_path_gets_the_sizes_it_accepts_and_its_kwargs(nets):
    model = create_model(f"{nets}:TinyNet", num_classes=7, in_channels=3, kwargs={"width": 5})
    assert model.fc.out_features == 7 and model.conv.in_channels == 3
    assert model.conv.out_channels == 5
    factory = create_model(f"{nets}:wide", num_classes=4, in_channels=1, image_size=8)
    assert factory.conv.out_channels == 6 and factory(torch.rand(2, 1, 8, 8)).shape == (2, 4)


@pytest.mark.parametrize(
    ("name", "kwargs", "phrase"),
    [
        ("{nets}:Nope", None, "has no 'Nope'; check the name"),
        ("no_such_module_xyz:Net", None, "cannot import module 'no_such_module_xyz'"),
        ("{nets}:NOT_CALLABLE", None, "is a int, not a class or function"),
        ("{nets}:not_a_module", None, "returned a str, not a torch nn.Module"),
        ("{nets}:TinyNet", {"depth": 3}, "model.kwargs depth: '{nets}:TinyNet' takes no such"),
        ("{nets}:TinyNet", {"num_classes": 3}, "passes from the data; remove it"),
        ("tiny-cnn", {"width": 3}, "model.kwargs is only for a model given by import path"),
    ],
)
def test_a_bad_model_plugin_is_one_line(nets, name, kwargs, phrase):
    with pytest.raises(ConfigError) as info:
        create_model(name.format(nets=nets), num_classes=10, in_channels=1, kwargs=kwargs)
    assert phrase.format(nets=nets) in str(info.value) and "\n" not in str(info.value)
    if kwargs:  # the same refusal at config time, before any data is read
        values = {"model.name": name.format(nets=nets), "model.kwargs": kwargs}
        with pytest.raises(ConfigError, match=re.escape(phrase.format(nets=nets))):
            build_config("pgd-at", dataset="digits", values=values)


def test_dry_run_checks_the_import_path_before_anything_runs(nets, capsys):
    assert cli("train", "--preset", "pgd-at", "--dataset", "digits", "--dry-run",
               "--set", f"model.name={nets}:Nope") == 2  # fmt: skip
    assert one_error_line(capsys) == (
        f"error: model.name '{nets}:Nope': module '{nets}' has no 'Nope'; check the name"
    )
    assert cli("train", "--preset", "pgd-at", "--dataset", "digits", "--dry-run",
               *tiny_sets(f"model.name={nets}:TinyNet", "model.kwargs.width=3")) == 0  # fmt: skip
    assert f"name: {nets}:TinyNet" in capsys.readouterr().out


def test_the_issue_commands_train_eval_resume_and_refuse_an_edited_file(nets, tmp_path, capsys):
    """The "Done when" of issue 32: train a class from ./mynets.py, eval the run, continue an
    evaluation from its folder alone, resume the run; an edited file is one line each time."""
    assert cli(*TRAIN, "digits", *tiny_sets(f"model.name={nets}:TinyNet")) == 0
    run = only_run(tmp_path / "runs")
    spec = json.loads((run / "model.json").read_text())["model"]
    manifest = json.loads((run / "manifest.json").read_text())
    source = tmp_path / f"{nets}.py"
    assert spec["source"]["import_path"] == f"{nets}:TinyNet"
    assert spec["source"]["sha256"] == file_sha256(source)
    assert manifest["plugins"]["model.name"] == spec["source"]

    cheap = ["--attacks", "pgd-3", "--n-examples", "16", "--no-progress"]
    assert cli("eval", str(run), *cheap, "--out", "ev") == 0
    first = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert first["model"]["architecture"] == f"{nets}:TinyNet"
    (tmp_path / "ev" / "eval.json").unlink()  # resume needs only the folder's own files
    assert cli("eval", "--resume", "ev", "--no-progress") == 0
    again = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert again["threats"] == first["threats"] and again["data"] == first["data"]

    assert cli("report", str(run), "--out", "report") == 0
    assert cli("train", "--resume", str(run), "--epochs", "2", "--no-progress") == 0
    assert json.loads((run / "summary.json").read_text())["val"]
    capsys.readouterr()

    source.write_text(NETS + "\n# edited\n")
    assert cli("eval", str(run), *cheap) == 2
    line = one_error_line(capsys)
    assert f"{nets}.py changed since the run recorded it" in line
    assert line.endswith("(generalist eval --trust-changed-code)")
    assert cli("train", "--resume", str(run), "--epochs", "3", "--no-progress") == 2
    assert one_error_line(capsys).endswith("or start a new run to train with it as it is now")
    assert cli("eval", str(run), *cheap, "--trust-changed-code", "--out", "ev2") == 0


def test_a_moved_module_is_named_in_one_line(nets, tmp_path, capsys):
    assert cli(*TRAIN, "digits", *tiny_sets(f"model.name={nets}:TinyNet")) == 0
    run = only_run(tmp_path / "runs")
    (tmp_path / f"{nets}.py").rename(tmp_path / "elsewhere.py")
    import sys

    sys.modules.pop(nets, None)
    assert cli("eval", str(run), "--attacks", "pgd-1", "--n-examples", "4") == 2
    assert f"cannot import module '{nets}'; run from the folder that holds it" in (
        one_error_line(capsys)
    )


# --------------------------------------------------------------------------- eval --arch


def test_eval_a_plain_state_dict_with_arch(nets, tmp_path, capsys):
    module = __import__(nets)
    torch.manual_seed(0)
    torch.save(module.TinyNet().state_dict(), "mine.pt")
    argv = ["--attacks", "pgd-3", "--threat", "Linf:0.1", "--n-examples", "12", "--no-progress"]
    assert cli("eval", "mine.pt", "--arch", f"{nets}:TinyNet", "--dataset", "digits", *argv,
               "--out", "ev") == 0  # fmt: skip
    record = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert record["model"]["architecture"] == f"{nets}:TinyNet"
    assert record["model"]["spec"]["source"]["import_path"] == f"{nets}:TinyNet"
    assert record["data"]["n_examples"] == 12

    state = module.TinyNet().state_dict()  # a DataParallel/DDP save: keys prefixed "module."
    torch.save({f"module.{k}": v for k, v in state.items()}, "ddp.pt")
    assert cli("eval", "ddp.pt", "--arch", f"{nets}:TinyNet", "--dataset", "digits", *argv,
               "--out", "ev-ddp") == 0  # fmt: skip
    capsys.readouterr()

    assert cli("eval", "mine.pt", "--arch", "tiny-cnn", "--dataset", "digits", *argv) == 2
    assert one_error_line(capsys).startswith(
        "error: mine.pt does not fit the architecture tiny-cnn"
    )
    assert cli("eval", "mine.pt", "--dataset", "digits", *argv) == 2
    assert "name the architecture (generalist eval --arch NAME" in one_error_line(capsys)
    assert cli("eval", "mine.pt", "--arch", f"{nets}:TinyNet", "--dataset", "digits",
               "--num-classes", "12", *argv) == 2  # fmt: skip
    assert "'fc.weight' is float32[10, 4] where float32[12, 4] is expected" in one_error_line(
        capsys
    )


def test_arch_weights_are_still_never_unpickled(nets, tmp_path):
    import pickle

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(print, protocol=2))
    with pytest.raises(GeneralistError) as info:
        run_eval(
            EvalRequest(
                target="evil.pt", arch=f"{nets}:TinyNet", dataset="digits", threats=("Linf:0.1",)
            )
        )
    assert "\n" not in str(info.value)


def test_eval_resume_needs_the_folder_and_keeps_its_settings(nets, tmp_path, capsys):
    module = __import__(nets)
    torch.save(module.TinyNet().state_dict(), "mine.pt")
    argv = ["--arch", f"{nets}:TinyNet", "--dataset", "digits", "--attacks", "pgd-2"]
    assert cli("eval", "mine.pt", *argv, "--threat", "Linf:0.1", "--n-examples", "9",
               "--no-progress", "--out", "ev") == 0  # fmt: skip
    request = json.loads((tmp_path / "ev" / "request.json").read_text())
    assert request["threats"] == ["Linf:0.1"] and request["n_examples"] == 9
    assert request["dataset"] == "digits" and request["target"] == str(tmp_path / "mine.pt")
    assert cli("eval", "--resume", "ev", "--no-progress", "--seed", "5") == 2
    assert "seed: 0 there, 5 now" in one_error_line(capsys)
    assert cli("eval", "--resume", "ev", "--no-progress") == 0  # the refusal changed nothing
    assert cli("eval", "--resume", str(tmp_path / "nowhere")) == 2
    assert "no state.json or corruptions-state.json there" in one_error_line(capsys)


# --------------------------------------------------------------------------- dataset readers


def test_a_dataset_reader_by_import_path(nets, tmp_path):
    splits = load_splits(f"{nets}:read", val_size=50)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (250, 50, 297)
    assert splits.info.name == f"{nets}:read" and splits.info.image_shape == (1, 8, 8)
    config = build_config("pgd-at", dataset=f"{nets}:read", overrides=["model.name=tiny-cnn"])
    assert config.data.dataset == f"{nets}:read"
    with pytest.raises(DataError, match=r"returned no y_train, x_test, y_test; a reader returns"):
        load_splits(f"{nets}:read_wrong")
    with pytest.raises(ConfigError, match=r"data.dataset .*has no 'nothing'"):
        build_config("pgd-at", dataset=f"{nets}:nothing")


def test_a_run_on_a_reader_records_it(nets, tmp_path):
    assert cli(*TRAIN, f"{nets}:read", *tiny_sets()) == 0
    manifest = json.loads((only_run(tmp_path / "runs") / "manifest.json").read_text())
    assert manifest["plugins"]["data.dataset"]["import_path"] == f"{nets}:read"
    assert manifest["data"]["dataset"] == f"{nets}:read"


# --------------------------------------------------------------------------- Python API


def digits_tensors() -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    x = torch.tensor(digits.images[:, None] * 255 / 16).round().div(255).float()
    y = torch.tensor(digits.target)
    return x[:1400], y[:1400], x[1400:], y[1400:]


class DigitNet(nn.Module):
    """Defined at module level: the run records ``test_plugins_api:DigitNet``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


PATH = "test_plugins_api:DigitNet"
TINY_API = {
    "epochs": 1,
    "device": "cpu",
    "threads": 1,
    "data.train_limit": 200,
    "data.val_size": 40,
    "data.batch_size": 50,
    "eval.val_steps": 2,
    "eval.test_steps": 2,
    "eval.test_examples": 40,
}


def test_the_issue_snippet_runs_as_written(tmp_path, capsys):
    x_train, y_train, x_test, y_test = digits_tensors()
    torch.manual_seed(0)
    start = DigitNet()
    result = generalist.train(
        "generalist-d",
        data=(x_train, y_train, x_test, y_test),
        model=start,
        overrides=TINY_API,
        out=tmp_path / "runs",
        progress=False,
    )
    table = generalist.evaluate(
        result.model, x_test[:24], y_test[:24], threats=["Linf:8/255", "L2:0.5"],
        attacks=["pgd-3"],
    )  # fmt: skip
    assert set(table.robust_accuracy) == {"Linf:8/255", "L2:0.5"}
    assert table.robust_accuracy["linf:8/255"] == table.robust_accuracy["Linf:8/255"]
    assert table.union <= min(table.robust_accuracy.values()) <= table.clean_accuracy
    assert table.n_examples == 24 and "union" in str(table)

    run = result.run.path
    config = (run / "config.yaml").read_text()
    assert "dataset: npz" in config and str(run / "data.npz") in config
    assert json.loads((run / "model.json").read_text())["model"]["name"] == (
        "test_plugins_api:DigitNet"
    )
    capsys.readouterr()
    assert main(["eval", str(run), "--attacks", "pgd-2", "--n-examples", "8", "--no-progress"]) == 0


def test_every_learner_starts_from_the_given_instance():
    from generalist.training.loop import build_learners

    config = build_config("generalist-d", dataset="digits", values={"model.name": PATH})
    spec = {"name": PATH, "num_classes": 10, "in_channels": 1, "image_size": 8,
            "mean": None, "std": None}  # fmt: skip
    torch.manual_seed(1)
    start = DigitNet()
    learners, global_model = build_learners(config, spec, torch.device("cpu"), initial=start)
    for model in [*(learner.model for learner in learners), global_model]:
        for key, value in start.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(GeneralistError, match=r"model: the given DigitNet is not what model.name"):
        build_learners(config, spec, torch.device("cpu"), initial=DigitNet(num_classes=3))


def test_train_takes_torch_datasets_and_a_registered_name(tmp_path):
    from torch.utils.data import TensorDataset

    x_train, y_train, x_test, y_test = digits_tensors()
    result = generalist.train(
        "pgd-at",
        data=(TensorDataset(x_train, y_train), TensorDataset(x_test, y_test)),
        model="tiny-cnn",
        overrides=TINY_API,
        out=tmp_path / "runs",
        progress=False,
    )
    assert result.test["clean"] >= 0 and isinstance(result.model, nn.Module)


@pytest.mark.parametrize(
    ("kwargs", "error", "phrase"),
    [
        ({"model": lambda: DigitNet()}, ConfigError, "defined inside a function (or is a lambda)"),
        ({"data": (np.zeros((4, 1, 8, 8)),)}, DataError, "data has 1 parts"),
        ({"data": "digits", "overrides": {"epochs": "many"}}, ConfigError, "epochs"),
        ({"data": "digits", "overrides": {"learners.nope.task.type": "x"}}, ConfigError,
         "overrides learners.nope.task.type: there is no learner 'nope'"),
    ],
)  # fmt: skip
def test_train_errors_name_its_parameters(tmp_path, kwargs, error, phrase):
    x = digits_tensors()
    kwargs.setdefault("data", x)
    with pytest.raises(error) as info:
        generalist.train("pgd-at", out=tmp_path, progress=False, **kwargs)
    assert phrase in str(info.value) and "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())  # refused before any run directory exists


class Noisy(nn.Module):
    """Random in its forward pass: the randomness check must warn."""

    def __init__(self) -> None:
        super().__init__()
        self.net = DigitNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + 0.05 * torch.randn_like(x))


def test_evaluate_restores_the_mode_and_batchnorm_and_warns_like_the_cli(tmp_path):
    x_train, y_train, *_ = digits_tensors()
    model = Noisy().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="random"):
        table = generalist.evaluate(
            model, x_train[:16], y_train[:16], threats=["Linf:0.1"], out=tmp_path / "ev"
        )  # AutoAttack standard, the default
    assert model.training and model.net.bn.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert table.warnings and table.record["settings"]["attacks"] == ["autoattack"]
    files = {p.name for p in (tmp_path / "ev").iterdir()}
    assert {"eval.json", "results.md", "model_info.json", "state.json"} <= files


def test_autoattack_run_restores_the_callers_mode():
    x_train, y_train, *_ = digits_tensors()
    model = DigitNet().train()
    before = model.bn.running_mean.clone()
    attack = generalist.AutoAttack("Linf:0.1", n_iter=2)
    attack.run(model, x_train[:8], y_train[:8])
    assert model.training and torch.equal(model.bn.running_mean, before)


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"batch_size": 0}, "batch_size 0: must be a whole number of at least 1"),
        ({"threats": []}, "threats: give at least one threat model"),
        ({"n_iter": -2}, "n_iter -2"),
    ],
)
def test_evaluate_errors_name_its_parameters(kwargs, phrase):
    x, y, *_ = digits_tensors()
    kwargs.setdefault("threats", ["Linf:0.1"])
    with pytest.raises(ConfigError) as info:
        generalist.evaluate(DigitNet(), x[:4], y[:4], **kwargs)
    assert phrase in str(info.value) and "--" not in str(info.value)


def test_evaluate_says_when_float_images_are_rounded():
    x, y, *_ = digits_tensors()
    off_grid = x[:4] * 0.999
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generalist.evaluate(DigitNet().eval(), off_grid, y[:4], threats=["Linf:0.1"],
                            attacks=["pgd-1"])  # fmt: skip
    assert any("not on the 8-bit grid" in str(w.message) for w in caught)


def test_every_public_name_is_exported():
    for name in generalist.__all__:
        assert getattr(generalist, name) is not None, name
    assert callable(generalist.train) and callable(generalist.evaluate)
    with pytest.raises(AttributeError):
        generalist.no_such_name  # noqa: B018


def test_load_model_takes_an_architecture_for_foreign_weights(nets, tmp_path):
    module = __import__(nets)
    torch.save(module.TinyNet(num_classes=3).state_dict(), "w.pt")
    arch = {"name": f"{nets}:TinyNet", "num_classes": 3, "in_channels": 1, "image_size": 8}
    model, spec = generalist.load_model("w.pt", arch=arch)
    assert not model.training and spec["model"]["num_classes"] == 3


class Stop(Exception):
    """Raised from on_progress: the evaluation is killed mid-way, its state saved."""


def test_a_killed_evaluation_resumes_from_its_folder_alone_to_the_same_result(nets, tmp_path):
    module = __import__(nets)
    torch.manual_seed(0)
    torch.save(module.TinyNet().state_dict(), "mine.pt")
    request = EvalRequest(
        target="mine.pt",
        arch=f"{nets}:TinyNet",
        dataset="digits",
        threats=("Linf:0.1", "L2:0.5"),
        attacks=("pgd-3", "apgd-ce"),
        n_iter=3,
        n_examples=24,
        batch_size=8,
        progress=False,
    )
    _, whole = run_eval(request.with_values(out="whole"))
    calls = []

    def kill(progress):
        calls.append(progress)
        if len(calls) == 4:
            raise Stop

    with pytest.raises(Stop):
        run_eval(request.with_values(out="killed"), on_progress=kill)
    assert not (tmp_path / "killed" / "eval.json").exists()
    assert main(["eval", "--resume", "killed", "--no-progress"]) == 0
    resumed = json.loads((tmp_path / "killed" / "eval.json").read_text())
    assert without_seconds(resumed["threats"]) == without_seconds(whole["threats"])
    assert resumed["union"] == whole["union"]


def without_seconds(value):
    """A record part without its timings, the one thing a resume may change."""
    if isinstance(value, dict):
        return {k: without_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_seconds(v) for v in value]
    return value
