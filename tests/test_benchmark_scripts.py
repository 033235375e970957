"""Every script in benchmarks/ still imports and parses its options: a library refactor that
moves a name the benchmarks use breaks them here, not in the next session that needs a number
(the AutoAttack comparison once imported a function the task refactor had moved). And the
AutoAttack comparison's floor replays exactly the passes it prices."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

import generalist
from generalist.attacks import ThreatModel
from generalist.attacks.cost import RecordingModel

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


def load_benchmark(name: str) -> ModuleType:
    """A benchmark script as a module (benchmarks/ is not a package), to call its functions."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_autoattack_floor_replays_exactly_the_passes_each_stage_made():
    """The floor of every stage, ours and the reference's, replays as many forward and backward
    passes over points as the stage was counted making, with the very kinds of call it made
    (shapes, memory layouts, with or without a graph)."""
    bench = load_benchmark("autoattack_vs_pyautoattack")
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    ).eval()
    for param in net.parameters():
        param.requires_grad_(False)
    spy = RecordingModel(net)  # sees the attacks' calls, then the replay's
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = net(x).argmax(1)  # every point starts correct, so every stage has work
    args = bench.parse_args(["--n-iter", "3", "--n-queries", "20", "--batch-size", "5"])
    threat = ThreatModel.parse("Linf:0.01")
    for run in (bench.run_ours, bench.run_reference):
        _, robust, stages = run(spy, x, y, threat, 0, args)
        assert 0 < int(robust.sum()) < len(x)  # some points broken, so batches shrink
        assert list(stages) == ["apgd-ce", "apgd-t", "fab-t", "square"]
        assert all(stage["points"] > 0 for stage in stages.values())
        timer = bench.FloorTimer(spy, torch.device("cpu"), repeats=1)
        spy.take()
        for name, stage in stages.items():
            seconds, replayed = timer.price(stage["calls"])
            assert (replayed.forward, replayed.backward) == (
                stage["forward"],
                stage["backward"],
            ), (run.__name__, name)
            assert (seconds > 0) == (stage["forward"] > 0), (run.__name__, name)
        recorded = set().union(*(stage["calls"].forward for stage in stages.values()))
        replayed_calls = spy.take()
        assert set(replayed_calls.forward) == recorded, run.__name__
        assert set(replayed_calls.backward) == {call for call in recorded if call.grad}
