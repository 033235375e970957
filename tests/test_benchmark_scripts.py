"""Every script in benchmarks/ still imports and parses its options: a library refactor that
moves a name the benchmarks use breaks them here, not in the next session that needs a number
(the AutoAttack comparison once imported a function the task refactor had moved)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import generalist

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SOURCE = Path(generalist.__file__).resolve().parent.parent


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_every_benchmark_script_imports_and_prints_its_help(script):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SOURCE)}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
