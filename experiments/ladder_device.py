"""The CIFAR ladder at E = 120 (issue 28) on a lent GPU, in one call of the device tool.

A 120-epoch ladder run takes 60-100 minutes at one CPU thread here; a lent GPU trains several at
once. This script is the call's whole command: it runs `experiments/ladder.sh` (the same
protocol, the same records) for the (rung, seed) pairs asked for, JOBS at a time, each trained
and then evaluated with AutoAttack, until BUDGET seconds have passed. Then every run still
going gets SIGTERM (training saves a checkpoint and exits; an unfinished evaluation is dropped
and redone later), and what came of the call is packed into at most eight files under $OUT,
which is all the device tool brings back:

    runs-K.tar      the run folders (weights, config, manifest, metrics, evaluations; of an
                    unfinished run only its newest checkpoint), in parts of at most 15 MiB
    logs.tar        the ladder's logs and the CUDA tests' report

Runs a caller sends along (unfinished ones from this machine, in --resume-from) continue where
they stopped: resuming may change the device, and the manifest records it. The data is found
at the path the runs were configured with here (/work/shared/data/...), linked to the carried
copy, so a run moves between the two machines without edits.

On the device (the `run` tool, carry [".carry"], timeout_s 570):
    PYTHONPATH=src python3 experiments/ladder_device.py run --budget-s 450
Here, after the call, with the folder the tool put the files in:
    .venv/bin/python experiments/ladder_device.py unpack FILES_AT
which adds the runs to experiments/runs/ladder-cifar10-e120 and the finished ones' records to
experiments/records/ladder-cifar10-e120 (never overwriting a run already there).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from ladder_summary import RUN_NAME

ROOT = Path(__file__).resolve().parent.parent
LADDER = "ladder-cifar10-e120"
# The order: the four rungs on the seeds still missing, rung 0, then the ablations.
DEFAULT_PAIRS = "2:0 3:0 4:0 2:1 3:1 4:1 5:1 2:2 3:2 4:2 5:2 0:0 9:0 10:0 11:0 12:0"
DATA_HERE = Path("/work/shared/data/cifar10-subset")
PART_BYTES = 15 * 2**20
MAX_PARTS = 6  # and logs.tar: the tool brings back eight files of 16 MiB, 64 MiB in all


def short_name(run: Path) -> str:
    """``r5-s0`` of ``r5-s0-20261204-153205``: the (rung, seed) a run folder belongs to."""
    match = RUN_NAME.match(run.name)
    if match is None:
        raise SystemExit(f"{run}: not a ladder run folder (rRUNG-sSEED-DATE-TIME)")
    return f"r{match['rung']}-s{match['seed']}"


def trim(run: Path) -> None:
    """What a run needs on another machine: the newest checkpoint while it trains (all a resume
    reads), none once it has finished (its weights are in model*.safetensors)."""
    folder = run / "checkpoints"
    if not folder.is_dir():
        return
    stems = sorted({p.name.rsplit(".", 1)[0] for p in folder.iterdir()})
    if (run / "summary.json").exists():
        stems.append("")  # none kept
    for stale in stems[:-1]:
        for path in folder.glob(stale + ".*"):
            path.unlink()


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A process group of its own (so one signal reaches its children), output to ``log``."""
    with open(log, "w") as stream:
        return subprocess.Popen(
            command, env=env, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True
        )


def run(args: argparse.Namespace) -> int:
    out = Path(os.environ.get("OUT") or args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    runs, records = work / "runs", work / "records"
    runs.mkdir(parents=True, exist_ok=True)
    for sent in sorted(Path(args.resume_from).glob("r*-s*-2*")) if args.resume_from else []:
        shutil.copytree(sent, runs / sent.name, dirs_exist_ok=True)
        log = sent.parent / f"{short_name(sent)}.log"
        if log.exists():  # ladder.sh appends the resumed run's output to it
            shutil.copy(log, runs)
    if not DATA_HERE.exists():
        DATA_HERE.parent.mkdir(parents=True, exist_ok=True)
        DATA_HERE.symlink_to(Path(args.data).resolve())

    env = dict(os.environ, PYTHON=sys.executable, RUNS=str(runs), RECORDS=str(records))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env.update(EPOCHS=str(args.epochs), STAGES="train eval", JOBS="1", PYTHONUNBUFFERED="1")
    started = time.monotonic()
    tests = None
    if args.cuda_tests:  # the device check's first part, beside the ladder (seconds of GPU)
        tests = start(
            [sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--parts",
             "cuda_tests", "--out", str(work / "device-check")],
            env, work / "cuda-tests.log",
        )  # fmt: skip
    pending = [pair.split(":") for pair in args.pairs.split()]
    active: dict[str, subprocess.Popen] = {}
    while (pending or active) and time.monotonic() - started < args.budget_s:
        for name, proc in list(active.items()):
            if proc.poll() is not None:
                print(f"{time.monotonic() - started:6.0f} s  {name} ended ({proc.returncode})")
                del active[name]
        while pending and len(active) < args.jobs:
            rung, seed = pending.pop(0)
            name = f"r{rung}-s{seed}"
            active[name] = start(
                ["bash", str(ROOT / "experiments" / "ladder.sh")],
                dict(env, RUNGS=rung, SEEDS=seed),
                work / f"ladder-{name}.log",
            )
            print(f"{time.monotonic() - started:6.0f} s  {name} started")
        time.sleep(2)
    for name, proc in active.items():  # the budget is spent: save and stop
        print(f"{time.monotonic() - started:6.0f} s  {name} stopped (budget)")
        os.killpg(proc.pid, signal.SIGTERM)
    for proc in active.values():
        try:
            proc.wait(timeout=args.grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    if tests is not None and tests.poll() is None:
        tests.kill()
    pack(runs, records, work, out)
    print(f"{time.monotonic() - started:6.0f} s  packed into {out}")
    return 0


def without_locks(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if member.name.endswith(".lock") else member


def pack(runs: Path, records: Path, work: Path, out: Path) -> None:
    """The run folders in tars of at most 15 MiB each, finished runs first; logs in one more."""
    finished, unfinished = [], []
    for run_dir in sorted(p for p in runs.glob("r*-s*-2*") if p.is_dir()):
        trim(run_dir)
        (finished if (records / run_dir.name).is_dir() else unfinished).append(run_dir)
    parts: list[list[Path]] = []
    room = 0
    for run_dir in finished + unfinished:
        size = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file()) + 2**16
        if not parts or size > room:
            if len(parts) == MAX_PARTS:
                print(f"{run_dir.name}: left on the device ({MAX_PARTS} parts are full)")
                continue
            parts.append([])
            room = PART_BYTES
        parts[-1].append(run_dir)
        room -= size
    for index, part in enumerate(parts):
        with tarfile.open(out / f"runs-{index}.tar", "w") as tar:
            for run_dir in part:
                # A run lock names a process of the device machine: never carried here.
                tar.add(run_dir, arcname=run_dir.name, filter=without_locks)
    with tarfile.open(out / "logs.tar", "w") as tar:
        for log in sorted(runs.glob("*.log")) + sorted(work.glob("*.log")):
            tar.add(log, arcname=log.name)
        for report in (work / "device-check").glob("device_check.*"):
            tar.add(report, arcname=report.name)
    print(f"finished: {[p.name for p in finished]}; unfinished: {[p.name for p in unfinished]}")


def progress(run: Path) -> tuple[bool, int]:
    """How far a run got: finished or not, then the step of its newest checkpoint."""
    steps = [int(p.name.split("-")[1]) for p in run.glob("checkpoints/step-*.json")]
    return (run / "summary.json").exists(), max(steps, default=-1)


def unpack(args: argparse.Namespace) -> int:
    got = Path(args.files_at)
    parts = sorted(got.glob("runs-*.tar"))
    if not parts:
        raise SystemExit(f"{got} has no runs-K.tar: give the folder the device tool returned")
    runs = Path(args.runs)
    staging = Path(args.work) / "unpacked"
    shutil.rmtree(staging, ignore_errors=True)
    for part in parts:
        with tarfile.open(part) as tar:
            tar.extractall(staging, filter="data")
    for run_dir in sorted(staging.iterdir()):
        here = sorted(runs.glob(short_name(run_dir) + "-2*"))
        if here and max(map(progress, here)) >= progress(run_dir):
            print(f"{run_dir.name}: {runs} has {here[-1].name}, as far or further: left as it is")
            continue
        for older in here:  # an earlier, less advanced attempt of the same rung and seed
            print(f"{run_dir.name}: replaces {older.name} (its continuation)")
            shutil.rmtree(older)
        shutil.move(str(run_dir), runs / run_dir.name)
        print(f"{run_dir.name}: into {runs}")
    if (got / "logs.tar").exists():
        with tarfile.open(got / "logs.tar") as tar:
            tar.extractall(runs / "device-logs", filter="data")
    # Recording is ladder.sh's job (only runs with both evaluations); STAGES=eval records them.
    print("record the finished runs with: RUNS=experiments/runs/ladder-cifar10-e120 "
          "RECORDS=experiments/records/ladder-cifar10-e120 EPOCHS=120 STAGES='eval summary' "
          "RUNGS=... SEEDS=... experiments/ladder.sh")  # fmt: skip
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run", help="on the device: train and evaluate, then pack into $OUT")
    go.add_argument("--pairs", default=DEFAULT_PAIRS, help="RUNG:SEED pairs, in this order")
    go.add_argument("--jobs", type=int, default=10, help="runs at once")
    go.add_argument("--budget-s", type=float, default=450, help="then stop, save and pack")
    go.add_argument("--grace-s", type=float, default=40, help="for the stopped runs to save")
    go.add_argument("--epochs", type=int, default=120)
    go.add_argument("--data", default=str(ROOT / ".carry" / "cifar10-subset"))
    go.add_argument("--resume-from", default=str(ROOT / ".carry" / "ladder-runs"))
    go.add_argument("--work", default="/tmp/ladder-device")
    go.add_argument("--out", default="ladder-device-out", help="where $OUT is unset")
    go.add_argument("--cuda-tests", action="store_true", help="also run the CUDA tests")
    back = sub.add_parser("unpack", help="here: the returned files into experiments/runs")
    back.add_argument("files_at")
    back.add_argument("--work", default="/tmp/ladder-device-unpack")
    back.add_argument("--runs", default=str(ROOT / "experiments" / "runs" / LADDER))
    args = parser.parse_args()
    return run(args) if args.command == "run" else unpack(args)


if __name__ == "__main__":
    sys.exit(main())
