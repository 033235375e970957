"""experiments/ladder.sh's records: the weightless copy of each finished run that is committed so
that RESULTS.md's ladder tables regenerate in a later session, on a machine whose run folders
are gone. No training here: the runs are finished folders made by hand, so ladder.sh only
records and summarises them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LADDER = ROOT / "experiments" / "ladder.sh"
sys.path.insert(0, str(ROOT / "experiments"))
import corruptions_summary  # noqa: E402
import ladder_summary  # noqa: E402


def eval_record(clean: float, linf: float, l2: float) -> dict:
    """The part of `generalist eval`'s eval.json that the ladder table reads."""
    return {
        "clean": {"accuracy": clean},
        "threats": [
            {"threat": "Linf:0.2", "worst_case": {"accuracy": linf}},
            {"threat": "L2:1.0", "worst_case": {"accuracy": l2}},
        ],
        "union": {"accuracy": min(linf, l2)},
        "data": {"n_examples": 359},
    }


def finished_run(runs: Path, name: str, best: dict, last: dict | None) -> Path:
    """A finished, evaluated run folder; ``last=None``: the last model is the best one (same
    weights, evaluated once, as ladder.sh does)."""
    run = runs / f"{name}-20261201-000000"
    (run / "eval-aa-best").mkdir(parents=True)
    summary = {
        "best": {"epoch": 4, "test": {"clean": 51.0}},
        "seconds": 12.5,
        "test": {"clean": 50.0},
        "test_examples": 359,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "eval-aa-best" / "eval.json").write_text(json.dumps(best))
    (run / "model-best.safetensors").write_bytes(b"best weights")
    (run / "model-best.json").write_text(json.dumps({"sha256": "b" * 64}))
    if last is None:
        (run / "model.safetensors").write_bytes(b"best weights")
        (run / "model.json").write_text(json.dumps({"sha256": "b" * 64}))
    else:
        (run / "eval-aa-last").mkdir()
        (run / "eval-aa-last" / "eval.json").write_text(json.dumps(last))
        (run / "model.safetensors").write_bytes(b"last weights")
        (run / "model.json").write_text(json.dumps({"sha256": "a" * 64}))
    return run


def ladder(tmp_path: Path, stages: str, **env: str) -> subprocess.CompletedProcess[str]:
    settings = {
        **os.environ,
        "DATASET": "digits",
        "RUNS": str(tmp_path / "runs"),
        "RECORDS": str(tmp_path / "records"),
        "RUNGS": "2 5",
        "SEEDS": "0",
        "JOBS": "1",
        "STAGES": stages,
        "PYTHON": sys.executable,
        **env,
    }
    return subprocess.run(
        ["bash", str(LADDER)], env=settings, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def recorded(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    finished_run(runs, "r2-s0", eval_record(60.0, 20.0, 10.0), None)
    finished_run(runs, "r5-s0", eval_record(55.0, 15.0, 8.0), eval_record(50.0, 18.0, 9.0))
    result = ladder(tmp_path, "eval summary")
    assert result.returncode == 0, result.stderr
    return tmp_path


def test_records_hold_no_weights_and_give_the_run_folders_table(recorded: Path) -> None:
    records = recorded / "records"
    names = sorted(p.name for p in records.iterdir() if p.is_dir())
    assert names == ["r2-s0-20261201-000000", "r5-s0-20261201-000000"]
    assert not list(records.rglob("*.safetensors"))
    assert (records / "r5-s0-20261201-000000" / "eval-aa-last" / "eval.json").is_file()
    table = ladder_summary.build(records)
    assert table == ladder_summary.build(recorded / "runs")
    assert (recorded / "runs" / "ladder.md").read_text() == table  # the summary stage's table
    # Rung 2's last model is its best one: its row repeats best's numbers without a file of its
    # own, read from the sha256 in the sidecars, not from weights the record does not have.
    assert "| 2 | + deployed EMA | last | 0 | 60.0 | 20.0 | 10.0 | 10.0 |" in table
    assert "| 5 | Generalist-D as shipped | last | 0 | 50.0 | 18.0 | 9.0 | 9.0 |" in table
    assert "| 5 − 2 (goal: vs PGD-AT) | last | 0 | -10.0 | -2.0 | -1.0 |" in table


def test_a_recorded_run_is_not_run_again(recorded: Path) -> None:
    for run in (recorded / "runs").iterdir():
        if run.is_dir():
            shutil.rmtree(run)
    # A python that fails on any call: training or evaluating would fail the ladder.
    result = ladder(recorded, "train eval", PYTHON="false")
    assert result.returncode == 0, result.stderr
    assert "recorded r2-s0" in result.stdout and "recorded r5-s0" in result.stdout
    assert not [p for p in (recorded / "runs").iterdir() if p.is_dir()]


def test_other_settings_stop_with_one_line_and_keep_the_records(recorded: Path) -> None:
    before = sorted(p.name for p in (recorded / "records").iterdir())
    result = ladder(recorded, "eval summary", EPOCHS="11")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "set RECORDS to a new folder" in result.stderr
    assert "epochs=10" in result.stderr and "epochs=11" in result.stderr
    assert sorted(p.name for p in (recorded / "records").iterdir()) == before


def test_a_rung_and_seed_recorded_twice_is_refused_not_averaged(recorded: Path) -> None:
    records = recorded / "records"
    shutil.copytree(records / "r5-s0-20261201-000000", records / "r5-s0-20261202-000000")
    with pytest.raises(SystemExit, match="rung 5 seed 0 was run twice"):
        ladder_summary.build(records)


def tables(markdown: str) -> list[str]:
    """The Markdown tables of a text, each as its block of consecutive ``|`` lines."""
    blocks, block = [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            blocks.append("\n".join(block))
            block = []
    return blocks


@pytest.mark.parametrize(
    "records",
    # A folder holding only its protocol.txt is a ladder whose runs are still under way.
    sorted(
        p.name
        for p in (ROOT / "experiments" / "records").iterdir()
        if p.is_dir() and any(run.is_dir() for run in p.iterdir())
    ),
)
def test_results_md_prints_the_committed_records_tables_as_they_regenerate(records: str) -> None:
    """Every ladder table that RESULTS.md says comes from committed records is what
    ladder_summary.py prints from them now: a record added, changed or a figure typed by hand
    makes the page disagree with its source and fails here."""
    # Whole tables, not substrings: a printed table with rows the records no longer hold fails.
    printed = set(tables((ROOT / "RESULTS.md").read_text(encoding="utf-8")))
    # experiments/corruptions.sh's records have their own summary; every other folder is a ladder's.
    summary = corruptions_summary if records.startswith("corruptions") else ladder_summary
    regenerated = tables(summary.build(ROOT / "experiments" / "records" / records))
    assert regenerated, f"{records}: {summary.__name__} printed no table"
    for table in regenerated:
        assert table in printed, f"{records}: this table is not in RESULTS.md as printed:\n{table}"
