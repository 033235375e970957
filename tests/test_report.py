"""`generalist report` and `generalist compare` on real tiny runs, and TensorBoard logging.

Two runs are trained once for the module (a second each on one CPU thread): Generalist-D
(quickstart: natural + ℓ∞, every base learner validated) and Generalist-T (natural + ℓ∞ + ℓ2,
only the global model validated), the latter also evaluated with PGD so it has per-norm and
union results. Both redistribute in epoch 2 of 3.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import struct
import sys
import types
from pathlib import Path

import pytest
import yaml
from training_runs import quiet, tiny_config, train_tiny

from generalist.cli import main
from generalist.config import build_config
from generalist.errors import CheckpointError, ConfigError
from generalist.reporting import figures
from generalist.reporting.runs import load_run, load_runs, run_labels
from generalist.tensorboard import MISSING
from generalist.training import loop

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REDISTRIBUTE_IN_EPOCH_2 = ("merge.redistribute.unit=epoch", "merge.redistribute.every=2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("runs")
    duo = train_tiny(out, *REDISTRIBUTE_IN_EPOCH_2)
    trio = train_tiny(out, *REDISTRIBUTE_IN_EPOCH_2, "eval.learners=false", preset="generalist-t")
    evaluate = ["eval", str(trio), "--attacks", "pgd-5", "--n-examples", "40", "--no-progress"]
    assert main(evaluate) == 0
    return duo, trio


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which a valid PNG has right after its signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_writes_each_figure_as_a_png_linked_from_report_md(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"report: {out / 'report.md'}"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["curves-generalist-t.png", "curves-quickstart.png", "norms.png", "tradeoff.png"]
    report = (out / "report.md").read_text()
    for name in pngs:
        width, height = png_size(out / name)
        assert 900 <= width <= 2400 and 500 <= height <= 1200, (name, width, height)
        assert (out / name).stat().st_size > 20_000  # drawn content, not an empty canvas
        assert f"]({name})" in report  # relative link: the folder can move as a whole
    # The results table has a row per run; the eval's tables are embedded, union included.
    assert "| quickstart | quickstart |" in report
    assert "| generalist-t | generalist-t |" in report
    assert "PGD-3 (summary)" in report
    assert "**union** (robust to all at once)" in report


def test_one_run_reports_into_its_own_folder(runs, capsys):
    duo = runs[0]
    assert main(["report", str(duo)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"report: {duo / 'report' / 'report.md'}"
    # One single-norm run: its curves and a one-point trade-off; no per-norm bars.
    assert sorted(p.name for p in (duo / "report").glob("*.png")) == [
        "curves-quickstart.png",
        "tradeoff.png",
    ]


def test_curves_mark_redistribution_and_say_when_learners_were_not_validated(runs):
    duo, trio = load_runs(runs)
    for run in (duo, trio):
        figure = figures.training_curves(run, run.name)
        *accuracy_axes, gamma_axes = sorted(figure.axes, key=lambda a: a.get_position().y0)[::-1]
        assert [r["epoch"] for r in run.metrics if r["redistributed"]] == [2]
        for axes in [*accuracy_axes, gamma_axes]:
            assert [p.get_x() for p in axes.patches] == [1.0]  # epoch 2 = the span (1, 2]
        assert len(gamma_axes.lines) == len(run.metrics[0]["gamma"])
        legend = [t.get_text() for t in figure.legends[0].get_texts()]
        assert any("not validated" in text for text in legend) == (run is trio)
    # One panel for clean and one per threat; every validated model is a line in each.
    assert [len(a.lines) for a in figures.training_curves(duo, "d").axes[1:]] == [3, 3]
    assert [len(a.lines) for a in figures.training_curves(trio, "t").axes[1:]] == [1, 1, 1]


def test_tradeoff_draws_runs_differing_only_in_seed_as_mean_and_std(runs, tmp_path):
    duo = runs[0]
    for seed, clean in ((1, 40.0), (2, 60.0)):
        copy = shutil.copytree(duo, tmp_path / f"seed{seed}")
        config = (copy / "config.yaml").read_text().replace("\nseed: 0\n", f"\nseed: {seed}\n")
        config = re.sub(r"(?m)^name: quickstart$", f"name: quickstart-s{seed}", config)
        assert f"name: quickstart-s{seed}" in config  # named by seed, as users do
        (copy / "config.yaml").write_text(config)
        summary = json.loads((copy / "summary.json").read_text())
        summary["test"]["clean"] = clean
        (copy / "summary.json").write_text(json.dumps(summary))
    loaded = load_runs([tmp_path / "seed1", tmp_path / "seed2", runs[1]])
    figure = figures.tradeoff(loaded, run_labels(loaded))
    labels = {t.get_text() for axes in figure.axes for t in axes.texts}
    assert "quickstart (mean ± std, 2 seeds)" in labels
    assert "generalist-t" in labels
    linf = figure.axes[0]
    (error_bars,) = linf.containers
    assert error_bars.lines[0].get_xdata()[0] == pytest.approx(50.0)


def test_compare_prints_one_row_per_run_naming_where_numbers_come_from(runs, tmp_path, capsys):
    duo, trio = runs
    markdown = tmp_path / "compare.md"
    assert main(["compare", str(duo), str(trio), "--out", str(markdown)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, rule, first, second = lines[:4]
    assert header.split()[:3] == ["run", "preset", "clean"] and set(rule) == {"-", " "}
    (threat,) = [k for k in json.loads((duo / "summary.json").read_text())["test"] if k != "clean"]
    assert f"{threat} PGD-3 (summary)" in header and "union" in header
    eval_record = json.loads(next(trio.glob("eval-*/eval.json")).read_text())
    assert first.startswith("quickstart ") and "(training summary, last model)" in first
    assert (
        second.startswith("generalist-t ")
        and "pgd-5, 40 test points (generalist eval, last model)" in second
    )
    assert f"{eval_record['union']['accuracy']:.2f}" in second.split()
    table = markdown.read_text().splitlines()
    assert len(table) == 4 and table[1].startswith("| --- | --- | ---: |")


def test_a_torn_metrics_line_is_skipped_with_a_warning_naming_it(runs, tmp_path, capsys):
    copy = shutil.copytree(runs[0], tmp_path / "torn")
    with open(copy / "metrics.jsonl", "a") as handle:
        handle.write('{"epoch": 4, "step": 3')  # a kill in the middle of appending epoch 4
    run = load_run(copy)
    assert [r["epoch"] for r in run.metrics] == [1, 2, 3]
    assert run.warnings == [
        f"{copy / 'metrics.jsonl'}:4 is not a metrics record; skipped that line"
    ]
    assert main(["compare", str(copy)]) == 0
    assert capsys.readouterr().err == f"warning: {run.warnings[0]}\n"


def test_bad_inputs_are_one_line_errors(runs, tmp_path, capsys):
    with pytest.raises(ConfigError, match="does not exist"):
        load_runs([tmp_path / "missing"])
    with pytest.raises(ConfigError, match="no run directories given"):
        load_runs([])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is not a run directory"):
        load_runs([tmp_path / "empty"])
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(runs[0] / "config.yaml", fresh)
    with pytest.raises(ConfigError, match="has no metrics yet"):
        load_runs([fresh])
    # A folder that holds runs stands for them; one that holds none is an error.
    assert len(load_runs([runs[0].parent])) == 2
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("name", "damage", "problem"),
    [
        (
            "summary.json",
            lambda d: d["test"].update(clean="high"),
            "test.clean: not a finite number",
        ),
        ("summary.json", lambda d: d.pop("test"), "test: missing"),
        ("config.yaml", lambda d: d.update(epochs=[3]), "epochs: unexpected list"),
    ],
)
def test_a_damaged_run_is_skipped_with_one_line_and_the_others_compared(
    runs, tmp_path, capsys, name, damage, problem
):
    duo, trio = runs
    copy = shutil.copytree(duo, tmp_path / "damaged")
    path = copy / name
    data = (
        yaml.safe_load(path.read_text()) if name.endswith(".yaml") else json.loads(path.read_text())
    )
    damage(data)
    path.write_text(yaml.safe_dump(data) if name.endswith(".yaml") else json.dumps(data))
    assert main(["compare", str(copy), str(trio)]) == 0
    captured = capsys.readouterr()
    assert captured.err == (
        f"warning: skipped {copy.resolve()}: {path.resolve()} is damaged ({problem}); fix or "
        "remove it\n"
    )
    assert captured.out.count("\n") == 3  # header, rule, the intact run
    assert main(["compare", str(copy)]) == 2  # nothing left to compare: one error line
    assert capsys.readouterr().err.startswith("error: no run could be read (skipped ")


def test_a_damaged_evaluation_is_left_out_and_the_run_reported_from_its_summary(
    runs, tmp_path, capsys
):
    copy = shutil.copytree(runs[1], tmp_path / "evaluated")
    record_path = next(copy.glob("eval-*/eval.json"))
    record = json.loads(record_path.read_text())
    record["threats"][0]["worst_case"]["accuracy"] = float("nan")
    record_path.write_text(json.dumps(record))
    assert main(["compare", str(copy)]) == 0
    captured = capsys.readouterr()
    assert captured.err == (
        f"warning: {record_path.resolve()} is damaged (threats[0].worst_case.accuracy: not a "
        "finite number); left it out\n"
    )
    assert "(training summary, last model)" in captured.out


def test_compare_and_report_out_must_be_the_right_kind_of_path(runs, tmp_path, capsys):
    duo = str(runs[0])
    assert main(["compare", duo, "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"error: --out {tmp_path} is a folder; give a file name, e.g. {tmp_path / 'results.md'}\n"
    )
    nested = tmp_path / "new" / "folder" / "table.md"
    assert main(["compare", duo, "--out", str(nested)]) == 0  # a missing folder is made
    assert nested.read_text().startswith("| run |")
    afile = tmp_path / "afile"
    afile.write_text("x")
    capsys.readouterr()
    assert main(["report", duo, "--out", str(afile)]) == 2
    assert (
        capsys.readouterr().err == f"error: --out {afile} is a file; give a folder for the report\n"
    )
    assert main(["report", duo, "--out", str(afile / "below")]) == 2
    assert capsys.readouterr().err == (
        f"error: cannot use {afile / 'below'} (Not a directory); a file stands where a folder is "
        "needed; choose another --out\n"
    )


def test_tensorboard_without_the_package_fails_before_training(tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a),
    )
    with pytest.raises(ConfigError, match=r"needs `pip install generalist-at\[tensorboard\]`"):
        build_config("quickstart", dataset="digits", overrides=["logging.tensorboard=true"])
    argv = ["train", "--preset", "quickstart", "--dataset", "digits", "--out", str(tmp_path)]
    assert main([*argv, "--set", "logging.tensorboard=true"]) == 2
    assert MISSING in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # refused before a run directory was made


def test_tensorboard_gets_every_epoch_record_as_scalars(tmp_path, monkeypatch):
    made = []

    class FakeWriter:
        def __init__(self, log_dir: str) -> None:
            self.log_dir, self.scalars, self.flushes = log_dir, [], 0
            made.append(self)

        def add_scalar(self, tag: str, value: float, global_step: int) -> None:
            self.scalars.append((global_step, tag, value))

        def flush(self) -> None:
            self.flushes += 1

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "tensorboard" else find_spec(name, *a),
    )
    monkeypatch.setitem(
        sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter)
    )
    config = tiny_config(tmp_path, "epochs=2", "logging.tensorboard=true")
    run = loop.train(config, progress=False, echo=quiet).run.path
    (writer,) = made
    assert writer.log_dir == str(run / "tensorboard") and writer.flushes == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        logged = {tag: value for step, tag, value in writer.scalars if step == record["epoch"]}
        assert logged["val/global/clean"] == record["val"]["global"]["clean"]
        assert logged["gamma/adv_linf"] == record["gamma"]["adv_linf"]
        assert logged["train_loss/natural"] == pytest.approx(record["train_loss"]["natural"])
