"""Two trainings on one machine: how much each slows the other, with and without ``--threads``.

Each job is a real ``generalist train`` process (a small Generalist-D on sklearn's digits), and
its training time is the ``seconds`` of its ``summary.json`` (imports excluded). Scenarios, run
in interleaved rounds so that background load hits them alike:

- ``alone/N``: one job with ``--threads N`` (N = every core is PyTorch's own default);
- ``pair/N``: two identical jobs started together, each with ``--threads N``;
- ``pair/auto``: two jobs with no ``--threads``, the second started once the first trains: the
  default, which gives a job only the cores other work leaves free (``generalist.threads``).

The slowdown of a pair is its mean job time over the ``alone`` time of the same setting; the
figure that matters to a user is a pair's time against one job alone with the default.

    .venv/bin/python benchmarks/threads_contention.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN = [
    "train",
    "--preset",
    "generalist-d",
    "--dataset",
    "digits",
    "--epochs",
    "2",
    "--no-progress",
    "--set",
    "eval.val_steps=2",
    "--set",
    "eval.test_steps=2",
    "--set",
    "data.train_limit=512",
    "--set",
    "device=cpu",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="tiny-cnn")
    return parser.parse_args()


def start(out: Path, threads: int | None, model: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    args = [*TRAIN, "--set", f"model.name={model}", "--out", str(out)]
    if threads is not None:
        args += ["--threads", str(threads)]
    return subprocess.Popen(
        [sys.executable, "-m", "generalist", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen, out: Path) -> dict:
    output, _ = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"a training job failed:\n{output}")
    (summary,) = out.glob("*/summary.json")
    (manifest,) = out.glob("*/manifest.json")
    threads = json.loads(manifest.read_text())["device"]["threads"]
    return {"seconds": json.loads(summary.read_text())["seconds"], "threads": threads}


def wait_until_training(out: Path, timeout: float = 120.0) -> None:
    """Until the job has written its manifest (its threads are chosen, its training begins)."""
    deadline = time.monotonic() + timeout
    while not list(out.glob("*/manifest.json")):
        if time.monotonic() > deadline:
            raise SystemExit("the first job never started training")
        time.sleep(0.1)
    time.sleep(1.0)  # let it reach full speed before the second job measures the machine


def run_scenario(name: str, root: Path, model: str) -> list[dict]:
    kind, setting = name.split("/")
    threads = None if setting == "auto" else int(setting)
    outs = [Path(tempfile.mkdtemp(dir=root)) for _ in range(1 if kind == "alone" else 2)]
    first = start(outs[0], threads, model)
    processes = [first]
    if kind == "pair":
        if setting == "auto":
            wait_until_training(outs[0])
        processes.append(start(outs[1], threads, model))
    return [finish(p, out) for p, out in zip(processes, outs, strict=True)]


def main() -> None:
    args = parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    scenarios = [f"alone/{cores}", "alone/1", f"pair/{cores}", "pair/1", "pair/auto"]
    results: dict[str, list[dict]] = {name: [] for name in scenarios}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name in scenarios:
                jobs = run_scenario(name, Path(tmp), args.model)
                results[name] += jobs
                print(f"round {round_ + 1} {name}: {jobs}", flush=True)
    print(
        f"# {cores} cores, {args.rounds} rounds, {args.model}, load average before "
        f"{load_before[0]:.1f} / after {os.getloadavg()[0]:.1f}"
    )
    alone = statistics.median(j["seconds"] for j in results[f"alone/{cores}"])
    print("| scenario | threads per job | median training s per job | vs. alone (default) |")
    print("| --- | --- | ---: | ---: |")
    for name in scenarios:
        seconds = statistics.median(j["seconds"] for j in results[name])
        threads = sorted({j["threads"] for j in results[name]})
        print(f"| {name} | {threads} | {seconds:.1f} | {seconds / alone:.2f}x |")


if __name__ == "__main__":
    main()
