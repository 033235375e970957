"""The common-corruptions track: generation, the CIFAR-C reference layout, resumes, fetching."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_fetch import Server, _leftovers
from training_runs import train_tiny

from generalist.cli import main
from generalist.data import load_splits, to_float
from generalist.data.corruption_sets import read_cifar_c
from generalist.data.corruptions import (
    CORRUPTIONS,
    GENERATED,
    LEFT_OUT,
    SEVERITIES,
    corrupt_images,
    image_rng,
)
from generalist.data.fetch import SOURCES, Remote, Source, fetch
from generalist.errors import ConfigError, DataError
from generalist.evaluation.cli_eval import add_eval_parser, eval_from_args
from generalist.inference import predicts_correctly
from generalist.weights import load_model

N = 12


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny Generalist-D run on digits (8×8 grey images; eval reads the 360-image test set)."""
    return train_tiny(tmp_path_factory.mktemp("run"))


def eval_args(run_dir: Path, out: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    argv = ["eval", str(run_dir), "--no-progress", "--out", str(out), *extra]
    return parser.parse_args(argv)


def cells_only(record: dict) -> dict:
    """The results of the track, without timings."""
    section = {k: v for k, v in record["corruptions"].items() if k != "seconds"}
    return {"clean": record["clean"], "corruptions": section}


# --- generation -------------------------------------------------------------------------------


def _images(n: int, channels: int, size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=generator)


def test_at_least_12_of_the_15_are_generated_and_the_rest_say_why():
    assert len(CORRUPTIONS) == 15 and len(GENERATED) >= 12
    assert set(GENERATED) | set(LEFT_OUT) == set(CORRUPTIONS)
    assert all(reason for reason in LEFT_OUT.values())
    for name in LEFT_OUT:
        with pytest.raises(ConfigError, match=f"{name} cannot be generated"):
            corrupt_images(_images(1, 3, 32), name, 1, seed=0, indices=[0])


@pytest.mark.parametrize("name", GENERATED)
@pytest.mark.parametrize("shape", [(3, 32), (1, 8)])
def test_an_image_depends_on_its_index_only_not_on_the_batch(name, shape):
    images = _images(4, *shape)
    whole = corrupt_images(images, name, 3, seed=7, indices=range(4))
    part = corrupt_images(images[2:], name, 3, seed=7, indices=[2, 3])
    assert whole.dtype == torch.uint8 and whole.shape == images.shape
    assert torch.equal(whole[2:], part)
    assert torch.equal(whole, corrupt_images(images, name, 3, seed=7, indices=range(4)))


def test_the_seed_and_the_index_change_the_random_corruptions():
    images = _images(1, 3, 32).repeat(2, 1, 1, 1)
    noisy = corrupt_images(images, "gaussian_noise", 2, seed=0, indices=[0, 1])
    assert not torch.equal(noisy[0], noisy[1])  # same pixels, other index
    other_seed = corrupt_images(images[:1], "gaussian_noise", 2, seed=1, indices=[0])
    assert not torch.equal(noisy[:1], other_seed)
    assert image_rng(0, "snow", 5, 3).random() == image_rng(0, "snow", 5, 3).random()


@pytest.mark.parametrize(("size", "sigmas"), [(32, (0.04, 0.08)), (224, (0.08, 0.18))])
def test_small_images_get_the_cifar_constants_and_large_ones_imagenet(size, sigmas):
    """Gaussian noise on mid-grey: the noise's spread is σ·255 of the profile's constant."""
    grey = torch.full((1, 3, size, size), 128, dtype=torch.uint8)
    for severity, sigma in zip((1, 3), sigmas, strict=True):
        noisy = corrupt_images(grey, "gaussian_noise", severity, seed=0, indices=[0])
        spread = (noisy.float() - 128).std().item() / 255
        assert spread == pytest.approx(sigma, rel=0.1)


def test_severity_makes_a_corruption_stronger():
    images = _images(8, 3, 32)
    change = [
        (corrupt_images(images, "contrast", s, seed=0, indices=range(8)).float() - images.float())
        .abs()
        .mean()
        for s in SEVERITIES
    ]
    assert change == sorted(change) and change[0] < change[-1]


# --- the track in `generalist eval` -----------------------------------------------------------


def test_generated_track_writes_every_cell_and_the_means(run_dir, tmp_path, capsys):
    out, record = eval_from_args(
        eval_args(run_dir, tmp_path / "e", "--corruptions", "generated", "--n-examples", str(N))
    )
    section = record["corruptions"]
    assert section["covered"] == list(GENERATED) and set(section["left_out"]) == set(LEFT_OUT)
    assert len(section["cells"]) == len(GENERATED) * 5
    accuracies = [cell["accuracy"] for cell in section["cells"]]
    assert section["mean"] == pytest.approx(sum(accuracies) / len(accuracies), abs=1e-3)
    assert record["threats"] == []  # the corruption track alone: no attack was run
    clean = record["clean"]["accuracy"]
    assert section["clean"]["accuracy"] == clean
    if clean:
        assert section["mean_relative_to_clean"] == pytest.approx(
            100 * section["mean"] / clean, abs=1e-3
        )
    tables = (out / "results.md").read_text()
    assert "not CIFAR-10-C" in tables and "left out: frost" in tables
    assert all(f"| {name} |" in tables for name in GENERATED)
    info = json.loads((out / "model_info_corruptions.json").read_text())
    assert (
        info["corruptions_acc"] == f"{section['mean']:.2f}" and "not CIFAR-10-C" in info["footnote"]
    )
    assert json.loads((out / "eval.json").read_text())["corruptions"] == section


def test_generated_track_is_the_same_across_runs_batch_sizes_and_resumes(run_dir, tmp_path):
    base = ("--corruptions", "generated", "--n-examples", "6")
    _, first = eval_from_args(eval_args(run_dir, tmp_path / "a", *base, "--batch-size", "4"))
    _, again = eval_from_args(eval_args(run_dir, tmp_path / "b", *base, "--batch-size", "4"))
    _, other = eval_from_args(eval_args(run_dir, tmp_path / "c", *base, "--batch-size", "6"))
    assert cells_only(first) == cells_only(again) == cells_only(other)

    class Killed(Exception):
        pass

    def kill_in_snow(progress):
        if progress.attack == "snow/2" and progress.done >= 4:
            raise Killed

    killed = tmp_path / "killed"
    with pytest.raises(Killed):
        eval_from_args(
            eval_args(run_dir, killed, *base, "--batch-size", "4"), on_progress=kill_in_snow
        )
    state = json.loads((killed / "corruptions-state.json").read_text())
    assert state["jobs"]["snow/2"]["done"] == 4 and "snow/3" not in state["jobs"]
    resumed_calls = []
    _, resumed = eval_from_args(
        eval_args(run_dir, killed, *base, "--resume", str(killed), "--batch-size", "3"),
        on_progress=resumed_calls.append,
    )
    assert cells_only(resumed) == cells_only(first)
    assert {call.attack for call in resumed_calls} >= {"snow/2", "jpeg_compression/5"}
    assert "gaussian_noise/1" not in {call.attack for call in resumed_calls}  # not redone


def test_with_attacks_both_tracks_run_and_keep_their_own_state(run_dir, tmp_path):
    extra = ("--attacks", "pgd-5", "--threat", "Linf:0.1", "--n-examples", "3")
    out, record = eval_from_args(
        eval_args(run_dir, tmp_path / "e", "--corruptions", "generated", *extra)
    )
    assert [t["threat"] for t in record["threats"]] == ["Linf:0.1"] and record["corruptions"]
    assert {"state.json", "corruptions-state.json", "model_info.json"} <= set(record["files"])
    assert all((out / name).is_file() for name in record["files"])
    tables = (out / "results.md").read_text()
    assert "### Summary" in tables and "### Common corruptions" in tables
    _, again = eval_from_args(
        eval_args(run_dir, out, "--corruptions", "generated", *extra, "--resume", str(out))
    )
    assert (
        cells_only(again) == cells_only(record)
        and again["threats"][0]["worst_case"] == record["threats"][0]["worst_case"]
    )


def test_resume_needs_only_the_folder_of_a_corruption_only_eval(run_dir, tmp_path):
    """request.json records the source and that no attack was asked: `--resume DIR` alone
    continues the track, not an AutoAttack evaluation."""
    base = ("--corruptions", "generated", "--n-examples", "4", "--batch-size", "2")
    _, whole = eval_from_args(eval_args(run_dir, tmp_path / "whole", *base))

    class Killed(Exception):
        pass

    def kill_in_fog(progress):
        if progress.attack == "fog/1":
            raise Killed

    killed = tmp_path / "killed"
    with pytest.raises(Killed):
        eval_from_args(eval_args(run_dir, killed, *base), on_progress=kill_in_fog)
    assert not (killed / "state.json").exists()
    assert json.loads((killed / "request.json").read_text())["corruptions"] == "generated"
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    _, resumed = eval_from_args(
        parser.parse_args(["eval", "--resume", str(killed), "--no-progress"])
    )
    assert resumed["threats"] == [] and cells_only(resumed) == cells_only(whole)


def test_the_python_api_scores_corruptions_as_the_command_line_does(run_dir, tmp_path):
    from generalist import evaluate

    model, _ = load_model(run_dir / "model.safetensors", "cpu")
    test = load_splits("digits").test
    n = 5
    table = evaluate(
        model, test.images[:n], test.labels[:n], corruptions="generated", out=tmp_path / "py"
    )
    _, record = eval_from_args(
        eval_args(run_dir, tmp_path / "cli", "--corruptions", "generated", "--n-examples", str(n))
    )
    section = record["corruptions"]
    assert table.corruptions is not None and len(table.robust_accuracy) == 0
    assert table.corruptions.mean == section["mean"]
    assert table.corruptions.per_corruption == {
        name: entry["accuracy"] for name, entry in section["per_corruption"].items()
    }
    assert set(table.corruptions.per_corruption) == set(GENERATED)
    assert table.corruptions.cells[("snow", 3)] == next(
        c["accuracy"] for c in section["cells"] if (c["corruption"], c["severity"]) == ("snow", 3)
    )
    assert (tmp_path / "py" / "model_info_corruptions.json").is_file()
    assert "### Common corruptions" in str(table)


def test_a_resume_with_another_seed_is_refused(run_dir, tmp_path):
    base = ("--corruptions", "generated", "--n-examples", "3")
    out, _ = eval_from_args(eval_args(run_dir, tmp_path / "e", *base))
    with pytest.raises(ConfigError, match="different evaluation"):
        eval_from_args(eval_args(run_dir, out, *base, "--resume", str(out), "--seed", "1"))


def _fake_cifar_c(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """A folder with CIFAR-C's layout: each corruption's 5 severity blocks, every block a
    different transform of the test images so a wrong block offset changes the answer."""
    folder.mkdir()
    for k, name in enumerate(CORRUPTIONS):
        blocks = [
            np.clip(images.astype(int) * (1 + (k + s) % 3) - 40 * s, 0, 255).astype(np.uint8)
            for s in SEVERITIES
        ]
        np.save(folder / f"{name}.npy", np.concatenate(blocks))
    np.save(folder / "labels.npy", np.tile(labels.astype(np.uint8), len(SEVERITIES)))


def test_a_cifar_c_folder_is_read_with_the_reference_layout_and_mean(run_dir, tmp_path):
    test = load_splits("digits").test
    images = test.images.permute(0, 2, 3, 1).numpy()  # NHWC, as the .npy files store them
    folder = tmp_path / "CIFAR-10-C"
    _fake_cifar_c(folder, images, test.labels.numpy())
    n = 20
    _, record = eval_from_args(
        eval_args(run_dir, tmp_path / "e", "--corruptions", str(folder), "--n-examples", str(n))
    )
    section = record["corruptions"]
    assert section["covered"] == list(CORRUPTIONS) and section["left_out"] == {}
    assert not section["reference_protocol"] and section["warnings"] == []

    # RobustBench's protocol, written out: the first n images of each severity block, the
    # labels' first n, one accuracy per cell, the plain mean of the 75 cells
    model, _ = load_model(run_dir / "model.safetensors", "cpu")
    model.eval()
    labels = np.load(folder / "labels.npy")
    expected = {}
    for name in CORRUPTIONS:
        stack = np.load(folder / f"{name}.npy")
        for s in SEVERITIES:
            block = stack[(s - 1) * len(test) : s * len(test)][:n]
            x = to_float(torch.from_numpy(block).permute(0, 3, 1, 2).contiguous())
            y = torch.from_numpy(labels[:n].astype(np.int64))
            with torch.no_grad():
                expected[(name, s)] = 100 * predicts_correctly(model, x, y).float().mean().item()
    got = {(c["corruption"], c["severity"]): c["accuracy"] for c in section["cells"]}
    assert got == pytest.approx(expected, abs=1e-3)
    assert section["mean"] == pytest.approx(sum(expected.values()) / 75, abs=1e-3)
    assert len(set(got.values())) > 1  # the blocks differ, so the offsets were checked


def test_cifar_c_labels_that_do_not_match_the_split_are_a_warning(run_dir, tmp_path):
    test = load_splits("digits").test
    folder = tmp_path / "C"
    _fake_cifar_c(folder, test.images.permute(0, 2, 3, 1).numpy(), (test.labels.numpy() + 1) % 10)
    _, record = eval_from_args(
        eval_args(run_dir, tmp_path / "e", "--corruptions", str(folder), "--n-examples", "4")
    )
    assert (
        "differs from the evaluated split's labels at 4 of 4"
        in record["corruptions"]["warnings"][0]
    )


@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        (lambda d: None, "no such folder"),
        (lambda d: d.mkdir(), "neither a CIFAR-C folder"),
        (
            lambda d: (d.mkdir(), np.save(d / "labels.npy", np.zeros(10, np.uint8))),
            "lacks gaussian_noise.npy",
        ),
    ],
)
def test_a_bad_corruptions_folder_is_one_line(run_dir, tmp_path, make, phrase):
    folder = tmp_path / "C"
    make(folder)
    with pytest.raises((ConfigError, DataError), match=phrase) as error:
        eval_from_args(eval_args(run_dir, tmp_path / "e", "--corruptions", str(folder)))
    assert "\n" not in str(error.value)


def test_an_imagenet_c_folder_is_streamed_per_cell(run_dir, tmp_path):
    """<corruption>/<severity>/<class>/<image>: labels from the sorted class folders."""
    from PIL import Image

    test = load_splits("digits").test
    root = tmp_path / "ImageNet-C"
    for name in ("fog", "contrast"):
        for s in SEVERITIES:
            for label in range(10):  # every class folder, some of them empty
                (root / name / str(s) / f"class{label}").mkdir(parents=True)
            for i in range(6):
                folder = root / name / str(s) / f"class{int(test.labels[i])}"
                Image.fromarray(test.images[i, 0].numpy()).save(folder / f"img{i}.png")
    _, record = eval_from_args(
        eval_args(run_dir, tmp_path / "e", "--corruptions", str(root), "--n-examples", "6")
    )
    section = record["corruptions"]
    assert section["covered"] == ["fog", "contrast"]
    assert set(section["left_out"]) == set(CORRUPTIONS) - {"fog", "contrast"}
    assert len(section["cells"]) == 10


# --- fetching CIFAR-10-C ----------------------------------------------------------------------


def _cifar_c_archive() -> bytes:
    rng = np.random.default_rng(0)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        arrays = {
            name: rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8) for name in CORRUPTIONS
        }
        arrays["labels"] = np.arange(10, dtype=np.uint8) % 10
        for name, array in arrays.items():
            payload = io.BytesIO()
            np.save(payload, array)
            info = tarfile.TarInfo(f"CIFAR-10-C/{name}.npy")
            info.size = len(payload.getvalue())
            tar.addfile(info, io.BytesIO(payload.getvalue()))
    return raw.getvalue()


@pytest.fixture
def server():
    serving = Server({})
    yield serving
    serving.httpd.shutdown()


def test_cifar10_c_is_fetched_verified_and_unpacked_where_eval_reads_it(server, tmp_path):
    archive = _cifar_c_archive()
    server.files["CIFAR-10-C.tar"] = archive
    server.cut.add("CIFAR-10-C.tar")  # the first transfer stops half way
    official = SOURCES["cifar10-c"]
    source = Source(
        (Remote("CIFAR-10-C.tar", (server.url,), hashlib.md5(archive).hexdigest()),),
        official.folder,
        official.unpack,
        official.data_dir,
    )
    said = []
    with pytest.raises(DataError, match="run the same command again to resume"):
        fetch("cifar10-c", tmp_path, source=source, echo=said.append)
    data_dir = fetch("cifar10-c", tmp_path, source=source, echo=said.append)
    assert data_dir == tmp_path / "CIFAR-10-C" and _leftovers(tmp_path) == ["CIFAR-10-C"]
    assert read_cifar_c(data_dir).per_severity == 2
    assert f"--corruptions {data_dir}" in said[-1]


def test_the_official_cifar_c_entries_check_the_published_md5(server, tmp_path, capsys):
    assert SOURCES["cifar10-c"].files[0].md5 == "56bf5dcef84df0e2308c6dcbcbbd8499"
    assert SOURCES["cifar100-c"].files[0].md5 == "11f0ed0f1191edbf9fa23466ae6021d3"
    assert "zenodo.org/records/2535967" in SOURCES["cifar10-c"].files[0].urls[0]
    server.files["CIFAR-100-C.tar"] = _cifar_c_archive()
    status = main(["data", "fetch", "cifar100-c", str(tmp_path), "--mirror", server.url])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "not the published" in err
    assert not (tmp_path / "CIFAR-100-C").exists()


# --- report and compare -----------------------------------------------------------------------


def test_report_draws_the_heat_map_and_compare_gets_a_column(run_dir, tmp_path, capsys):
    """An evaluation of the corruptions alone adds to a run's results; it does not replace its
    ℓp numbers (it has no threat models)."""
    from generalist.reporting.runs import load_run

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = load_run(run).final_results()
    _, record = eval_from_args(
        eval_args(run, run / "eval-corruptions", "--corruptions", "generated", "--n-examples", "3")
    )
    after = load_run(run)
    assert after.final_results() == before and after.corruptions == record["corruptions"]
    assert main(["compare", str(run)]) == 0
    header, _, row = capsys.readouterr().out.splitlines()[:3]
    assert "corruptions (generated)" in header
    assert f"{record['corruptions']['mean']:.2f}" in row
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "corruptions.png").stat().st_size > 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Common corruptions" in text and "(corruptions.png)" in text


# --- experiments/corruptions_summary.py -------------------------------------------------------


def _record(folder: Path, mean: float, clean: float, kind: str = "generated") -> None:
    section = {
        "source": {"kind": kind},
        "n_examples": 100,
        "covered": ["gaussian_noise", "fog"],
        "left_out": {"frost": "no photographs"},
        "clean": {"accuracy": clean, "count": int(clean)},
        "mean": mean,
        "mean_relative_to_clean": 100 * mean / clean,
        "per_corruption": {
            name: {"accuracy": mean, "relative_to_clean": 100 * mean / clean}
            for name in ("gaussian_noise", "fog")
        },
        "cells": [],
    }
    (folder / "eval-corruptions-best").mkdir(parents=True)
    (folder / "eval-corruptions-best" / "eval.json").write_text(
        json.dumps({"corruptions": section})
    )
    (folder / "config.yaml").write_text("epochs: 20\n")


def test_the_claim_table_pairs_generalist_d_with_each_pgd_at_rung_by_seed(tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))
    import corruptions_summary

    means = {(2, 0): 40.0, (2, 1): 42.0, (3, 0): 44.0, (3, 1): 45.0, (5, 0): 50.0, (5, 1): 49.0}
    for (rung, seed), mean in means.items():
        _record(tmp_path / f"r{rung}-s{seed}-20261204-120000", mean, clean=80.0)
    text = corruptions_summary.build(tmp_path)
    assert "**not CIFAR-10-C**" in text and "left out: frost" in text and "20 epochs" in text
    assert "| 5 | Generalist-D | best | 0,1 | 80.0 ± 0.0 | 49.5 ± 0.7 | 61.9 ± 0.9 |" in text
    assert "| rung 5 − rung 2 | best | 2 | 0.0 ± 0.0 | 8.5 ± 2.1 |" in text  # 10 and 7 points
    assert "| rung 5 − rung 3 | best | 2 | 0.0 ± 0.0 | 5.0 ± 1.4 |" in text  # 6 and 4 points
    _record(tmp_path / "r2-s2-20261204-120000", 40.0, 80.0, kind="cifar-c")
    with pytest.raises(SystemExit, match="mix sources"):
        corruptions_summary.build(tmp_path)
