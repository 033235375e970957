"""The scripts in examples/ run as a user runs them (a fresh interpreter, from a folder of
their own), in their tiny setting: a broken example is a broken first hour."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import generalist

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SOURCE = Path(generalist.__file__).resolve().parent.parent


def run_example(name: str, cwd: Path) -> str:
    env = {
        **os.environ,
        "GENERALIST_EXAMPLES_TINY": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(SOURCE),
        "CUDA_VISIBLE_DEVICES": "",  # the CPU, as every other test
    }
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_own_model_and_data_trains_and_the_run_evaluates_from_the_shell(tmp_path):
    out = run_example("own_model_and_data.py", tmp_path)
    assert "AutoAttack Linf:0.1" in out
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "data.npz").is_file() and (run / "model.safetensors").is_file()
    evaluated = subprocess.run(
        [sys.executable, "-m", "generalist", "eval", str(run), "--attacks", "pgd-2",
         "--n-examples", "8", "--no-progress"],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SOURCE}:{EXAMPLES}"},
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]


def test_autoattack_on_any_model_writes_the_eval_folder(tmp_path):
    out = run_example("autoattack_any_model.py", tmp_path)
    assert "robust to both at once" in out
    assert (tmp_path / "autoattack-eval" / "model_info.json").is_file()


def test_the_merge_runs_around_your_own_loop(tmp_path):
    assert "global model after 20 steps" in run_example("merge_own_loop.py", tmp_path)
