"""The traps a new user meets in the first hour, each fixed or said in one line at the start.

Own data (a tiny ``.npz``, a folder of small PNGs, made here) takes the recipe of its images'
resolution band and a folder decodes at its images' own size; float pixels, a PGD that cannot
reach its ε, a validation split too small to choose a model by and a loss stuck at chance level
are said once; fuzzed inputs that used to pass ``--dry-run`` are refused in one line; ``compare``
shows what the rows do not share.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from generalist.cli import main
from generalist.config import MIN_VALIDATION_IMAGES, build_config
from generalist.errors import ConfigError, DataError
from generalist.preflight import attack_reach_warnings, start_notes, validation_split_warning
from generalist.presets import BANDS, list_presets
from generalist.reporting.compare import comparison_table, render_markdown, render_text
from generalist.reporting.runs import Run
from generalist.schedules import parse_step_size
from generalist.training.chance import chance_level_warnings
from generalist.training.loop import train

README = Path(__file__).resolve().parents[1] / "README.md"


def _npz(path: Path, shape: tuple[int, ...], dtype: str = "uint8", n: int = 60) -> Path:
    rng = np.random.default_rng(0)
    if dtype == "uint8":
        x_train, x_test = (rng.integers(0, 256, (k, *shape), dtype=np.uint8) for k in (n, 20))
    else:
        x_train, x_test = (rng.random((k, *shape)).astype(dtype) for k in (n, 20))
    np.savez(
        path,
        x_train=x_train,
        y_train=np.arange(n) % 10,
        x_test=x_test,
        y_test=np.arange(20) % 10,
    )
    return path


def _png_folder(root: Path, side: int, per_class: int = 3) -> Path:
    for split in ("train", "val"):
        for label in range(2):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.full((side, side, 3), 40 * i + 100 * label, dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


# --------------------------------------------------------------------------- own data


def test_an_image_folder_decodes_at_its_images_own_size_unless_told(tmp_path):
    root = _png_folder(tmp_path / "pngs", side=32)
    config = build_config("pgd-at", dataset="imagefolder", overrides=[f"data.data_dir={root}"])
    assert config.data.image_size == 32
    assert any(
        "32 px, decoded at their own size (data.image_size)" in n for n in start_notes(config)
    )
    bigger = build_config(
        "pgd-at",
        dataset="imagefolder",
        overrides=[f"data.data_dir={root}", "data.image_size=224"],
    )
    assert bigger.data.image_size == 224  # the user's word wins, and is said before decoding
    (warning,) = [n for n in start_notes(bigger) if "upsamples" in n]
    assert warning.startswith("warning: data.image_size=224 upsamples the 32-px images")
    assert "--set data.image_size=32" in warning


@pytest.mark.parametrize(
    ("shape", "recipe_model", "epochs"),
    [
        ((8, 8), "tiny-cnn", 40),  # digits-sized grey: the digits recipe
        ((28, 28), "small-cnn", 50),  # MNIST-sized grey: MNIST's
        ((32, 32, 3), "resnet18", 120),  # CIFAR-sized colour: CIFAR's
        ((3, 128, 128), "resnet50", 90),  # larger: ImageNet's, without ImageNet's split sizes
    ],
)
def test_an_npz_run_takes_the_recipe_of_its_images_band_and_says_which(
    tmp_path, capsys, shape, recipe_model, epochs
):
    data = _npz(tmp_path / "d.npz", shape, n=12)
    config = build_config("pgd-at", dataset="npz", overrides=[f"data.data_dir={data}"])
    assert (config.model.name, config.epochs) == (recipe_model, epochs)
    assert config.data.val_size < 1 and config.eval.test_examples is None
    args = ["train", "--preset", "pgd-at", "--dataset", "npz", "--data-dir", str(data)]
    assert main([*args, "--dry-run"]) == 0
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("recipe: ")]
    assert line.startswith("recipe: x_train in d.npz holds ")
    assert re.search(rf"band '[a-z-]+' .*, so the \w+ recipe; this run: {recipe_model}, ", line)
    assert f", {epochs} epochs" in line
    changed = build_config("pgd-at", dataset="npz", overrides=[f"data.data_dir={data}", "epochs=3"])
    assert f"this run: {recipe_model}, 3 epochs" in start_notes(changed)[0]  # what it came to


def test_bands_cover_grey_and_colour_at_every_size():
    assert [band.like for band in BANDS] == ["digits", "mnist", "cifar10", "imagenet"]


def test_the_mnist_band_takes_the_method_presets_mnist_learning_rate(tmp_path):
    data = _npz(tmp_path / "m.npz", (28, 28))
    own = build_config("pgd-at", dataset="npz", overrides=[f"data.data_dir={data}"])
    mnist = build_config("pgd-at", dataset="mnist")
    assert own.learners["adv_linf"].optimizer.lr == mnist.learners["adv_linf"].optimizer.lr
    assert own.budgets == mnist.budgets


def test_float_npz_pixels_rounded_to_uint8_are_said_with_the_precision_lost(tmp_path):
    floats = _npz(tmp_path / "f.npz", (3, 16, 16), dtype="float32")
    config = build_config("pgd-at", dataset="npz", overrides=[f"data.data_dir={floats}"])
    (note,) = [n for n in start_notes(config) if "float32" in n]
    assert f"{1 / 510:.5f}" in note and "uint8" in note
    whole = _npz(tmp_path / "u.npz", (3, 16, 16))
    plain = build_config("pgd-at", dataset="npz", overrides=[f"data.data_dir={whole}"])
    assert not [n for n in start_notes(plain) if "pixels;" in n]


def test_readme_documents_the_npz_format():
    text = README.read_text()
    section = text[text.index("\n## Your own data\n") + 1 :]
    section = section[: section.index("\n## ")]
    for word in ("x_train", "y_train", "x_test", "y_test", "uint8", "(N, H, W, C)", "[0, 1]"):
        assert word in section, word


# --------------------------------------------------------------------------- attack reach


def test_changing_eps_alone_scales_the_profiles_step_size(capsys):
    config = build_config("pgd-at", dataset="cifar10", overrides=["budgets.Linf.eps=0.3"])
    threat, steps, step = config.threat_of(config.learners["adv_linf"].task, "adv")
    assert threat.eps == pytest.approx(0.3) and step == pytest.approx(0.3 / 4)
    assert steps * step >= threat.eps and not attack_reach_warnings(config)


def test_relative_step_sizes_are_bit_identical_to_the_numbers_they_replace():
    assert parse_step_size("eps/4", Fraction(8, 255), "k") == float(Fraction(2, 255))
    assert parse_step_size("eps/30", Fraction("0.3"), "k") == 0.01
    assert parse_step_size("7/31*eps", Fraction("0.031"), "k") == 0.007
    assert parse_step_size("2/3*eps", Fraction(4, 255), "k") == float(Fraction(8, 765))
    assert parse_step_size("0.5", Fraction(1), "k") == 0.5
    with pytest.raises(ConfigError, match="divides by zero"):
        parse_step_size("eps/0", Fraction(1), "k")


def test_no_shipped_recipe_has_an_attack_short_of_its_eps():
    for preset in list_presets():
        for dataset in ("cifar10", "mnist", "digits", "imagenet"):
            extra = ["data.unlabeled=rest", "data.train_limit=10"] if preset == "rst" else []
            config = build_config(preset, dataset=dataset, overrides=extra)
            assert attack_reach_warnings(config) == [], (preset, dataset)


def test_an_absolute_step_size_too_short_for_eps_is_said():
    config = build_config(
        "pgd-at",
        dataset="cifar10",
        overrides=["budgets.Linf.eps=0.3", "budgets.Linf.step_size=2/255"],
    )
    (warning,) = attack_reach_warnings(config)
    assert warning.startswith(
        "warning: learners.adv_linf.task: 10 PGD steps of 0.007843 reach 0.07843, short of ε = 0.3"
    )
    assert "budgets.Linf.step_size=eps/4" in warning


# --------------------------------------------------------------------------- validation split


def test_a_validation_split_under_a_hundred_images_is_named_and_none_refused():
    config = build_config("pgd-at", dataset="digits", overrides=["data.val_size=0.02"])
    warning = validation_split_warning(6, config)
    assert warning.startswith("warning: the validation split holds 6 images (data.val_size=0.02)")
    assert f"data.val_size={MIN_VALIDATION_IMAGES}" in warning
    assert validation_split_warning(MIN_VALIDATION_IMAGES, config) is None
    with pytest.raises(DataError, match=r"data\.val_size=0\.02 leaves no validation image"):
        validation_split_warning(0, config)


def test_val_size_zero_trains_without_validation_or_selection_and_says_so(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz", (1, 8, 8), n=40)
    config = build_config(
        "standard",
        dataset="npz",
        overrides=[
            f"data.data_dir={data}",
            "data.val_size=0",
            "epochs=2",
            "eval.test_steps=0",
            f"out_dir={tmp_path / 'runs'}",
        ],
    )
    lines: list[str] = []
    result = train(config, progress=False, echo=lines.append)
    assert lines.count(validation_split_warning(0, config)) == 1
    assert "no model-best is chosen (eval.select=clean+robust is not used)" in "\n".join(lines)
    assert [("val" in record) for record in result.run.read_metrics()] == [False, False]
    assert result.best is None and not (result.run.path / "model-best.safetensors").exists()
    assert main(["report", str(result.run.path)]) == 0  # the report reads such a run too
    capsys.readouterr()


def test_a_run_on_a_tiny_npz_says_its_traps_at_the_start_and_its_chance_level_loss(tmp_path):
    """One CPU-second run: small validation split, float pixels, recipe, and a learner that
    cannot learn (lr 0) named after its first epoch, while the run goes on to the end."""
    data = _npz(tmp_path / "tiny.npz", (1, 8, 8), dtype="float32", n=120)
    config = build_config(
        "standard",
        dataset="npz",
        overrides=[
            f"data.data_dir={data}",
            "data.val_size=20",
            "epochs=2",
            "learners.natural.optimizer.lr=0",
            "eval.val_steps=0",
            "eval.test_steps=0",
            f"out_dir={tmp_path / 'runs'}",
        ],
    )
    lines: list[str] = []
    result = train(config, progress=False, echo=lines.append)
    assert len(result.run.read_metrics()) == 2  # warned, not stopped
    text = "\n".join(lines)
    assert "recipe: x_train in tiny.npz holds 1-channel 8 px images, band 'tiny-gray'" in text
    assert "holds float32 pixels" in text
    assert "warning: the validation split holds 20 images (data.val_size=20)" in text
    (chance,) = [i for i, line in enumerate(lines) if "chance level" in line]
    assert lines[chance + 1].startswith("epoch 1/2")  # said after the first epoch, once
    assert lines[chance].startswith("warning: learner natural's training loss is ")
    assert "learners.natural.optimizer.lr" in lines[chance]


def test_chance_level_is_judged_by_loss_and_clean_accuracy():
    at_chance = torch.full((8, 2), math.log(10))
    at_chance[:, 1] = 1.2  # the second learner learns
    lines = chance_level_warnings(at_chance, ["a", "b"], 10, "small-cnn", {"a": 9.0})
    assert len(lines) == 1 and lines[0].startswith("warning: learner a's training loss is 2.303")
    assert "model.name, now small-cnn" in lines[0]
    # An adversarial learner whose PGD loss is still near ln K while clean accuracy climbs
    # is learning: not named.
    assert chance_level_warnings(at_chance, ["a", "b"], 10, "m", {"a": 25.0}) == []
    early = at_chance.clone()
    early[6:, 0] = 1.5  # left chance level during the epoch: its last quarter says so
    assert chance_level_warnings(early, ["a", "b"], 10, "m") == []


# --------------------------------------------------------------------------- fuzzed inputs


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.name=wrn-10-0", r"^model\.name: wrn-10-0: WRN depth must be 10, 16, 22"),
        ("model.name=wrn-0-0", r"^model\.name: wrn-0-0: WRN depth"),
        (
            "model.name=wrn-" + "1" * 5000 + "-10",
            r"^model\.name: 'wrn-1+… \([0-9,]+ characters\): WRN depth",
        ),
        ("model.name=wrn-1006-10", r"at most 1000"),
        ("learners.adv_linf=null", r"^learners\.adv_linf: the generalist-d preset without its"),
        ("learners.adv_l2=null", r"^--set learners\.adv_l2=null: there is no learner 'adv_l2'"),
    ],
)
def test_fuzzed_inputs_are_refused_in_one_line_by_dry_run(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config("generalist-d", dataset="digits", overrides=[override])


def test_a_device_this_machine_lacks_is_refused_at_dry_run(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^device: mps \(Apple's GPU\) is not available"):
        build_config("pgd-at", dataset="digits", overrides=["device=mps"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"^device: cuda:2 asks for GPU 2, but 2 are visible"):
        build_config("pgd-at", dataset="digits", overrides=["device=cuda:2"])


def test_a_wide_resnet_the_check_accepts_is_built():
    assert build_config("pgd-at", dataset="digits", overrides=["model.name=wrn-16-2"])


# --------------------------------------------------------------------------- compare


def _run(tmp_path: Path, name: str, dataset: str, model: str, epochs: int) -> Run:
    config = {"name": name, "preset": "pgd-at", "epochs": epochs}
    config |= {"data": {"dataset": dataset}, "model": {"name": model}}
    summary = {"test": {"clean": 90.0, "Linf:8/255": 40.0}, "test_pgd_steps": 20, "seconds": 5}
    metrics = [{"epoch": epochs}]
    return Run(tmp_path / name, config, metrics, summary, [])


def test_compare_shows_dataset_model_and_epochs_and_marks_runs_that_differ(tmp_path):
    runs = [
        _run(tmp_path, "a", "cifar10", "resnet18", 120),
        _run(tmp_path, "b", "cifar10", "resnet18", 120),
        _run(tmp_path, "c", "mnist", "small-cnn", 120),
    ]
    table = comparison_table(runs, ["a", "b", "c"])
    setup = [table.columns.index(name) for name in ("dataset", "model", "epochs")]
    assert [[row[i] for i in setup] for row in table.rows] == [
        ["cifar10", "resnet18", "120"],
        ["cifar10", "resnet18", "120"],
        ["mnist *", "small-cnn *", "120"],
    ]
    assert table.notes == [
        "* these runs differ in dataset (cifar10, mnist); model (resnet18, small-cnn): the "
        "marked rows do not compare like with like with the others"
    ]
    assert render_text(table).rstrip().endswith(table.notes[0])
    assert render_markdown(table).endswith("\n\n" + table.notes[0] + "\n")
    same = comparison_table(runs[:2], ["a", "b"])
    assert same.notes == [] and "*" not in render_text(same)


# --------------------------------------------------------------------------- README


def test_readme_says_the_demo_numbers_move_with_the_thread_count():
    text = README.read_text()
    results = text[text.index("## Results") :]
    results = results[: results.index("RESULTS.md holds")]
    assert re.search(r"--threads 2|2 threads", results)
    assert "thread count" in results
