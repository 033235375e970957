"""The prepared GPU check (issue 18): everything a lent H200 must tell us, in one call.

In order of priority, each part skipped once the time budget is spent (the JSON says so):

1. ``cuda_tests``: ``pytest -m cuda`` (tests/test_cuda.py): attacks, merge, bf16, channels_last,
   resume and one-process NCCL on the GPU.
2. ``training``: ``pgd-at`` and ``generalist-d``, 2 epochs on the CIFAR-10 subset, ResNet-18, in
   fp32 (``deterministic: true``) and in bf16 + channels_last; each also stopped by SIGTERM in
   the middle of epoch 2 and resumed. Losses must be finite; a deterministic resume must end
   bit-identical, a non-deterministic one within :data:`RESUME_REL_TOL` (relative ℓ2 distance
   of the final weights) and :data:`RESUME_ACC_TOL` test-accuracy points.
3. ``throughput``: training steps/s of the loop's body on fixed CIFAR batches, img/s, model
   FLOPs (counted here: convolution and linear multiply-adds, by forward hooks), TFLOP/s, the
   fraction of the bf16 peak (790 TFLOP/s, and the peak this run measures), peak memory, for
   ResNet-18 and WRN-34-10 under ``pgd-at`` and ``generalist-d``.
4. ``autoattack``: our AutoAttack against ``pyautoattack`` on the same 500 test points of the
   model trained in 2 (generalist-d, bf16): robust accuracy, points broken by only one, wall
   time. Our random starts are per-point draws,
   not pyautoattack's, so a few points may differ between the two.
5. ``compiled``: ``model.compile: true``: throughput and a 2-epoch generalist-d run with resume.

On the device (one call of the ``run`` tool; BENCHMARKS.md "GPU check" has the preparation)::

    PYTHONPATH=src:.carry/site PYTHONUNBUFFERED=1 python3 benchmarks/device_check.py \\
        --data-dir .carry/cifar10-subset

On a CPU, CI-sized (tiny models and data, the same code paths; inductor replaced by
``aot_eager``, whose C++ build alone takes minutes on a small CPU)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/device_check.py --device cpu --quick

Writes ``device_check.json`` (everything) and ``device_check.md`` (the tables) to ``--out``
(default ``$OUT``, else ``device-check/``), after every part, so a run cut short keeps what it
measured.
"""

from __future__ import annotations

import os

# Before torch starts cuBLAS: the deterministic runs need this workspace setting, and cuBLAS
# reads it once (generalist.backends sets it too, but here the matrix-product probe comes first).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse
import json
import math
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import torch
from safetensors.torch import load_file
from torch import nn

from generalist import backends, compiling
from generalist.attacks import AutoAttack
from generalist.attacks.registry import create_attack
from generalist.attacks.threat import ThreatModel
from generalist.config import build_config
from generalist.data import BatchAugment, load_splits, to_float
from generalist.rundir import RunDir
from generalist.training import loop
from generalist.training.generalist import GeneralistMerge, generalist_step
from generalist.training.recipe import epoch_plan
from generalist.training.signals import TrainingInterrupted
from generalist.training.state import TrainingState
from generalist.weights import load_model

REPO = Path(__file__).resolve().parent.parent
H200_BF16_PEAK = 790.0
"""TFLOP/s: a bf16 8192³ matrix product measured on this workplace's H200 (2026-10-28)."""
RESUME_REL_TOL = 5e-2
"""Non-deterministic kernels round differently after a resume, and adversarial training
amplifies it over the remaining 1.5 epochs; this bounds the relative ℓ2 distance of the final
weights (a deterministic run must match exactly)."""
RESUME_ACC_TOL = 3.0
"""...and the test accuracies, in percentage points (932 test images: 1 point = 9 images)."""
THREAT = ThreatModel.parse("Linf:8/255")
PRESETS = ("generalist-d", "pgd-at")


@dataclass(frozen=True)
class Sizes:
    """How big each part is: the real check on a GPU, or a CI-sized one on a CPU."""

    model: str
    train_overrides: tuple[str, ...]
    step_models: tuple[tuple[str, int], ...]
    """(model, batch size) timed in ``throughput``."""
    step_pgd: int
    warmup_steps: int
    timed_steps: int
    aa_points: int
    aa_iters: int | None
    """None: AutoAttack standard as published; else every attack cut to this many iterations
    (Square to 10× as many queries)."""
    matmul_size: int
    budget_s: float


GPU_SIZES = Sizes(
    model="resnet18",
    train_overrides=("eval.every=2", "eval.test_steps=10"),
    step_models=(("resnet18", 128), ("wrn-34-10", 128)),
    step_pgd=10,
    warmup_steps=3,
    timed_steps=10,
    aa_points=500,
    aa_iters=None,
    matmul_size=8192,
    budget_s=420.0,
)
QUICK_SIZES = Sizes(
    model="tiny-cnn",
    train_overrides=(
        "data.train_limit=320",
        "data.test_limit=64",
        "data.val_size=64",
        "data.batch_size=64",
        "budgets.Linf.steps=2",
        "eval.val_steps=2",
        "eval.test_steps=2",
        "eval.every=2",
    ),
    step_models=(("resnet18", 4), ("wrn-34-10", 2)),
    step_pgd=1,
    warmup_steps=1,
    timed_steps=1,
    aa_points=32,
    aa_iters=5,
    matmul_size=512,
    budget_s=170.0,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="CI-sized: tiny models and data")
    parser.add_argument("--data-dir", help="the CIFAR-10 subset (default: found next to the repo)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "device-check")
    parser.add_argument("--budget-s", type=float, help="stop starting parts after this long")
    parser.add_argument(
        "--parts",
        default="cuda_tests,training,throughput,autoattack,compiled",
        help="comma-separated subset of the parts, in the order they run",
    )
    return parser.parse_args()


def find_cifar(given: str | None) -> Path:
    """The CIFAR-10 subset: ``--data-dir``, or shared/ inside or beside the checkout."""
    candidates = [Path(given)] if given else []
    candidates += [
        REPO / ".carry" / "cifar10-subset",
        REPO / "shared" / "data" / "cifar10-subset",
        REPO.parent / "shared" / "data" / "cifar10-subset",
        Path("/work/shared/data/cifar10-subset"),
    ]
    for path in candidates:
        if (path / "cifar-10-batches-py").is_dir():
            return path
    raise SystemExit(
        f"no CIFAR-10 subset at {', '.join(map(str, candidates))}; pass --data-dir (on the "
        "device: run `make device-carry` here first and carry .carry)"
    )


class Report:
    """The results so far, written out after every part."""

    def __init__(self, out: Path, header: dict[str, Any]) -> None:
        self.out = out
        self.data: dict[str, Any] = {**header, "parts": {}}
        out.mkdir(parents=True, exist_ok=True)

    def add(self, part: str, result: dict[str, Any]) -> None:
        self.data["parts"][part] = result
        (self.out / "device_check.json").write_text(json.dumps(self.data, indent=2) + "\n")
        (self.out / "device_check.md").write_text(markdown(self.data))


class Clock:
    def __init__(self, budget_s: float) -> None:
        self.started = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.budget_s - self.elapsed()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- environment


def environment(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": props.name,
            "capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "gpu_count": torch.cuda.device_count(),
        }
    info["bf16_matmul_tflops"] = measure_matmul(device, sizes.matmul_size)
    return info


def measure_matmul(device: torch.device, n: int) -> float:
    """bf16 n³ matrix products on random data: the ceiling the fraction of peak is read against."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=generator)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=generator)
    for _ in range(3):
        a @ b
    synchronize(device)
    repeats = 10
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return round(2 * n**3 * repeats / (time.perf_counter() - started) / 1e12, 2)


# ----------------------------------------------------------------------------- 1: cuda tests


def cuda_tests(clock: Clock) -> dict[str, Any]:
    timeout = max(30.0, min(240.0, clock.left()))
    # Only the file that holds them: collecting every test module would import pyautoattack,
    # which the device has only when .carry is carried.
    command = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-m", "cuda", "-q"]
    command += ["-o", "addopts=", "-p", "no:cacheprovider"]
    path = [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    try:
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as expired:
        return {"status": "failed", "error": f"timed out after {timeout:.0f} s",
                "tail": (expired.stdout or "")[-3000:]}  # fmt: skip
    output = done.stdout + done.stderr
    summary = r"(\d+) (passed|failed|skipped|deselected|errors?)"
    counts = {k: int(v) for v, k in re.findall(summary, output)}
    return {
        "status": "ok" if done.returncode == 0 else "failed",
        "returncode": done.returncode,
        "counts": counts,
        "tail": output[-3000:],
    }


# ----------------------------------------------------------------------------- 2: training


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]
    deterministic: bool


FP32 = Variant("fp32, deterministic", ("precision=fp32", "deterministic=true"), True)
BF16_CL = Variant("bf16 + channels_last", ("precision=bf16", "model.channels_last=true"), False)
COMPILED = Variant(
    "bf16 + channels_last, compiled",
    ("precision=bf16", "model.channels_last=true", "model.compile=true"),
    False,
)


def train_config(preset: str, variant: Variant, out: Path, ctx: SimpleNamespace):
    overrides = [
        f"model.name={ctx.sizes.model}",
        f"data.data_dir={ctx.data_dir}",
        f"device={ctx.device}",
        "epochs=2",
        "checkpoint.every_minutes=null",
        f"out_dir={out}",
        *ctx.sizes.train_overrides,
        *variant.overrides,
    ]
    return build_config(preset, dataset="cifar10", overrides=overrides)


@contextmanager
def sigterm_at_step(step: int) -> Iterator[None]:
    """SIGTERM to this process once training step ``step`` has been recorded: a preemption at
    an exact point (the loop finishes the step, saves and stops)."""
    original = TrainingState.record_step

    def record_step(self: TrainingState, losses: torch.Tensor) -> None:
        original(self, losses)
        if self.step == step:
            os.kill(os.getpid(), signal.SIGTERM)

    with mock.patch.object(TrainingState, "record_step", record_step):
        yield


def quiet(*_: Any) -> None:
    """Drops the training loop's lines."""


def train_and_resume(preset: str, variant: Variant, ctx: SimpleNamespace) -> dict[str, Any]:
    """One uninterrupted 2-epoch run and one stopped mid-epoch-2 and resumed; compared."""
    root = ctx.work / f"{preset}-{variant.name.replace(' ', '').replace(',', '-')}"
    config = train_config(preset, variant, root / "uninterrupted", ctx)
    started = time.perf_counter()
    result = loop.train(config, progress=False, echo=quiet)
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in (result.run.path / "metrics.jsonl").open()]
    losses = [record["train_loss"] for record in records]
    finite = all(math.isfinite(v) for epoch in losses for v in epoch.values())
    steps_per_epoch = records[0]["step"]
    examples = steps_per_epoch * config.data.batch_size  # the last batch may be smaller
    entry: dict[str, Any] = {
        "preset": preset,
        "variant": variant.name,
        "seconds": round(seconds, 1),
        "train_seconds_per_epoch": [round(r["train_seconds"], 2) for r in records],
        "img_per_s_epoch2": round(examples / records[-1]["train_seconds"], 1),
        "losses": losses,
        "finite": finite,
        "test": result.test,
        "run": str(result.run.path),
    }
    if not ctx.clock.left() > 0:
        entry["resume"] = "skipped: time budget spent"
        return entry
    stop_at = steps_per_epoch + steps_per_epoch // 2
    stopped = train_config(preset, variant, root / "resumed", ctx)
    with sigterm_at_step(stop_at):
        try:
            loop.train(stopped, progress=False, echo=quiet)
            raise AssertionError(f"the run did not stop at step {stop_at}")
        except TrainingInterrupted:
            pass
    (run_path,) = [p for p in (root / "resumed").iterdir() if p.is_dir()]
    resumed = loop.train(stopped, RunDir.open(run_path), resume=True, progress=False, echo=quiet)
    entry["resume"] = compare_runs(result, resumed, variant.deterministic, stop_at)
    return entry


def compare_runs(reference, resumed, deterministic: bool, stop_at: int) -> dict[str, Any]:
    a = load_file(resumed.run.path / "model.safetensors")
    b = load_file(reference.run.path / "model.safetensors")
    floats = [k for k in b if b[k].is_floating_point()]
    diff = torch.cat([(a[k].double() - b[k].double()).flatten() for k in floats])
    norm = torch.cat([b[k].double().flatten() for k in floats]).norm()
    rel = float(diff.norm() / norm)
    acc_gap = max(abs(resumed.test[k] - reference.test[k]) for k in reference.test)
    identical = all(torch.equal(a[k], b[k]) for k in b)
    passed = identical if deterministic else rel <= RESUME_REL_TOL and acc_gap <= RESUME_ACC_TOL
    return {
        "stopped_at_step": stop_at,
        "bit_identical": identical,
        "max_abs_diff": float(diff.abs().max()),
        "rel_l2_diff": rel,
        "test_acc_gap_points": round(acc_gap, 2),
        "criterion": "bit-identical" if deterministic else
        f"rel ℓ2 <= {RESUME_REL_TOL} and test accuracy within {RESUME_ACC_TOL} points",
        "passed": passed,
    }  # fmt: skip


def training(ctx: SimpleNamespace, variants: tuple[Variant, ...]) -> dict[str, Any]:
    runs, errors = [], []
    for variant in variants:
        for preset in PRESETS:
            if ctx.clock.left() <= 0:
                errors.append(f"{preset} {variant.name}: skipped, time budget spent")
                continue
            try:
                runs.append(train_and_resume(preset, variant, ctx))
            except Exception as exc:  # one failing run must not hide the others' figures
                errors.append(f"{preset} {variant.name}: {type(exc).__name__}: {exc}")
                errors.append(traceback.format_exc(limit=6))
            finally:
                backends.configure(ctx.device, deterministic=False)
    good = all(
        r["finite"] and (not isinstance(r.get("resume"), dict) or r["resume"]["passed"])
        for r in runs
    )
    return {"status": "ok" if good and not errors else "failed", "runs": runs, "errors": errors}


# ----------------------------------------------------------------------------- 3: throughput


def count_macs(model: nn.Module, image_shape: tuple[int, ...], device: torch.device) -> int:
    """Multiply-adds of one forward pass of one image: convolutions and linear layers, the
    arithmetic that matters (BatchNorm, ReLU and adds are a few % of it)."""
    total = [0]

    def conv(module: nn.Conv2d, _inputs: Any, output: torch.Tensor) -> None:
        kernel = module.in_channels // module.groups * math.prod(module.kernel_size)
        total[0] += output.numel() * kernel

    def linear(module: nn.Linear, _inputs: Any, output: torch.Tensor) -> None:
        total[0] += output.numel() * module.in_features

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(conv))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(linear))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *image_shape, device=device))
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    return total[0]


def step_flops_per_image(macs: int, tasks: list[str], pgd_steps: int) -> int:
    """A forward or a backward pass is 2·MACs FLOPs per pass; an attack step is a forward and a
    backward to the input (2 passes), an update a forward and a backward to inputs and weights
    (3 passes)."""
    passes = sum(3 + (2 * pgd_steps if task != "natural" else 0) for task in tasks)
    return 2 * macs * passes


def time_steps(preset: str, model_name: str, batch: int, variant: Variant, ctx) -> dict[str, Any]:
    """The training loop's body (an augmented batch, then ``generalist_step``: every learner's
    step, the one NaN check, the merge) on a fixed CIFAR-shaped batch, timed after a warm-up."""
    device, sizes = ctx.device, ctx.sizes
    overrides = [
        f"model.name={model_name}",
        f"device={device}",
        f"budgets.Linf.steps={sizes.step_pgd}",
        f"data.batch_size={batch}",
        *variant.overrides,
    ]
    config = build_config(preset, dataset="cifar10", overrides=overrides)
    spec = {"name": model_name, "num_classes": 10, "in_channels": 3, "image_size": 32}
    spec |= {"mean": None, "std": None}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    backends.configure(device, deterministic=False)
    learners, global_model = loop.build_learners(config, spec, device)  # autocast inside
    merge = GeneralistMerge([lr.model for lr in learners], global_model, decay_max=0.999)
    if config.model.compile:  # where the loop compiles: after the teachers' copies
        compiling.compile_in_place(*(lr.model for lr in learners), global_model)
    memory_format = torch.channels_last if config.model.channels_last else torch.contiguous_format
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    augment = BatchAugment(crop_padding=4, flip=True)
    plan = epoch_plan(config, [lr.gamma for lr in learners], 1)

    def settle(losses: torch.Tensor) -> torch.Tensor:  # the loop's one host sync per step
        if not bool(torch.isfinite(losses).all()):
            raise FloatingPointError(f"non-finite loss {losses.tolist()}")
        return losses

    def step(t: int) -> None:
        x = augment(to_float(images), generator).contiguous(memory_format=memory_format)
        generalist_step(
            learners, merge, x, labels, position=0.5, step=t, plan=plan, settle_losses=settle
        )

    compile_started = time.perf_counter()
    for t in range(sizes.warmup_steps):
        step(t)
    synchronize(device)
    warmup = time.perf_counter() - compile_started
    started = time.perf_counter()
    for t in range(sizes.timed_steps):
        step(sizes.warmup_steps + t)
    synchronize(device)
    per_step = (time.perf_counter() - started) / sizes.timed_steps
    macs = count_macs(learners[0].model, (3, 32, 32), device)
    tasks = [lc.task.type for lc in config.learners.values()]
    flops = step_flops_per_image(macs, tasks, sizes.step_pgd) * batch
    tflops = flops / per_step / 1e12
    entry = {
        "preset": preset,
        "model": model_name,
        "variant": variant.name,
        "batch": batch,
        "pgd_steps": sizes.step_pgd,
        "warmup_s": round(warmup, 2),
        "s_per_step": round(per_step, 4),
        "img_per_s": round(batch / per_step, 1),
        "forward_gmacs_per_image": round(macs / 1e9, 3),
        "tflop_per_step": round(flops / 1e12, 3),
        "tflops": round(tflops, 2),
        "pct_of_790": round(100 * tflops / H200_BF16_PEAK, 2),
        "pct_of_measured_peak": round(100 * tflops / ctx.peak, 2) if ctx.peak else None,
    }
    if device.type == "cuda":
        entry["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return entry


def throughput(ctx: SimpleNamespace, variants: tuple[Variant, ...]) -> dict[str, Any]:
    rows, errors = [], []
    for model_name, batch in ctx.sizes.step_models:
        for variant in variants:
            for preset in PRESETS:
                if ctx.clock.left() <= 0:
                    errors.append(f"{preset} {model_name} {variant.name}: skipped, time spent")
                    continue
                try:
                    rows.append(time_steps(preset, model_name, batch, variant, ctx))
                except Exception as exc:
                    errors.append(f"{preset} {model_name} {variant.name}: {exc!r}")
                    errors.append(traceback.format_exc(limit=6))
    return {"status": "failed" if errors else "ok", "rows": rows, "errors": errors}


# ----------------------------------------------------------------------------- 4: autoattack


def autoattack(ctx: SimpleNamespace, model_dir: Path | None) -> dict[str, Any]:
    if model_dir is None:
        return {"status": "skipped", "reason": "no trained generalist-d model (training failed)"}
    device, sizes = ctx.device, ctx.sizes
    model, _ = load_model(model_dir, device)
    model.eval().requires_grad_(False)
    splits = load_splits("cifar10", ctx.data_dir, val_size=0)
    n = min(sizes.aa_points, len(splits.test))
    x, y = to_float(splits.test.images[:n]).to(device), splits.test.labels[:n].to(device)
    result: dict[str, Any] = {"points": n, "model": str(model_dir), "threat": str(THREAT)}
    params = {} if sizes.aa_iters is None else {"n_iter": sizes.aa_iters}
    attacks = [
        create_attack("apgd-ce", THREAT, **params),
        create_attack("apgd-t", THREAT, **params),
        create_attack("fab-t", THREAT, **params),
        create_attack("square", THREAT, **reduced_square(sizes)),
    ]
    ours = AutoAttack(THREAT, attacks=attacks)
    synchronize(device)
    started = time.perf_counter()
    run = ours.run(model, x, y, batch_size=500)
    synchronize(device)
    result["ours"] = {
        "seconds": round(time.perf_counter() - started, 2),
        "robust_accuracy": round(100 * run.robust_accuracy, 2),
        "clean_accuracy": round(100 * run.clean_accuracy, 2),
        "seconds_per_attack": {k: round(v, 2) for k, v in run.seconds.items()},
    }
    try:
        from pyautoattack import AutoAttack as Reference
    except ImportError:
        result["pyautoattack"] = (
            "not installed on this machine: run `make device-carry` where pip works and carry "
            ".carry (PYTHONPATH=src:.carry/site)"
        )
        result["status"] = "partial"
        return result
    reference = Reference(model, norm="Linf", eps=THREAT.eps, version="standard", seed=0,
                          device=device)  # fmt: skip
    reference.verbose = False
    if sizes.aa_iters is not None:
        for owner in (reference.apgd, reference.apgd_targeted, reference.fab):
            owner.n_iter = sizes.aa_iters
        reference.square.n_queries = reduced_square(sizes)["n_queries"]
    synchronize(device)
    started = time.perf_counter()
    x_adv, _ = reference.run_standard_evaluation(x, y, batch_size=500)
    synchronize(device)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        ref_robust = (model(x_adv.to(device)).argmax(1) == y).cpu()
    our_robust = run.robust
    result["pyautoattack"] = {
        "seconds": round(seconds, 2),
        "robust_accuracy": round(100 * ref_robust.float().mean().item(), 2),
    }
    result["broken_only_by_ours"] = int((ref_robust & ~our_robust).sum())
    result["broken_only_by_pyautoattack"] = int((our_robust & ~ref_robust).sum())
    result["speedup_vs_pyautoattack"] = round(seconds / result["ours"]["seconds"], 2)
    result["status"] = "ok"
    return result


def reduced_square(sizes: Sizes) -> dict[str, int]:
    return {} if sizes.aa_iters is None else {"n_queries": 10 * sizes.aa_iters}


# ----------------------------------------------------------------------------- output


def markdown(data: dict[str, Any]) -> str:
    env = data.get("environment", {})
    lines = [
        f"# device check {data['started']} ({data['mode']})",
        "",
        f"{env.get('gpu', 'CPU')}, torch {env.get('torch')}, CUDA {env.get('cuda', '-')}; bf16 "
        f"matmul measured {env.get('bf16_matmul_tflops')} TFLOP/s; wall {data.get('wall_s')} s",
        "",
        "| part | status |",
        "| --- | --- |",
    ]
    parts = data["parts"]
    lines += [f"| {name} | {part.get('status')} |" for name, part in parts.items()]
    tests = parts.get("cuda_tests", {})
    if "counts" in tests:
        lines += ["", f"CUDA tests: {tests['counts']}"]
    for part in ("training", "compiled"):
        runs = parts.get(part, {}).get("runs", [])
        if runs:
            lines += [
                "",
                f"## {part}",
                "",
                "| preset | variant | s | img/s (epoch 2) | final losses | finite | test "
                "| resume |",
                "| --- | --- | ---: | ---: | --- | --- | --- | --- |",
            ]
            for r in runs:
                resume = r.get("resume")
                if isinstance(resume, dict):
                    resume = (
                        f"{'pass' if resume['passed'] else 'FAIL'}: rel {resume['rel_l2_diff']:.2e}"
                        f", Δacc {resume['test_acc_gap_points']}"
                    )
                final = {k: round(v, 3) for k, v in r["losses"][-1].items()}
                test = {k: round(v, 1) for k, v in r["test"].items()}
                lines.append(
                    f"| {r['preset']} | {r['variant']} | {r['seconds']} | "
                    f"{r['img_per_s_epoch2']} | {final} | {r['finite']} | {test} | {resume} |"
                )
    for part in ("throughput", "compiled"):
        rows = parts.get(part, {}).get("rows", [])
        if rows:
            lines += [
                "",
                f"## {part}: training steps",
                "",
                "| model | preset | variant | batch | img/s | TFLOP/s | % of 790 | % measured "
                "| peak GiB | warm-up s |",
                "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            ]
            for r in rows:
                lines.append(
                    f"| {r['model']} | {r['preset']} | {r['variant']} | {r['batch']} | "
                    f"{r['img_per_s']} | {r['tflops']} | {r['pct_of_790']} | "
                    f"{r['pct_of_measured_peak']} | {r.get('peak_memory_gib', '-')} | "
                    f"{r['warmup_s']} |"
                )
    plain = {
        (r["model"], r["preset"]): r["img_per_s"]
        for r in parts.get("throughput", {}).get("rows", [])
        if r["variant"] == BF16_CL.name
    }
    for r in parts.get("compiled", {}).get("rows", []):
        if plain.get((r["model"], r["preset"])):
            gain = r["img_per_s"] / plain[r["model"], r["preset"]]
            lines.append(f"\ncompile gain, {r['model']} {r['preset']}: {gain:.2f}x img/s")
    aa = parts.get("autoattack", {})
    if "ours" in aa:
        ref = aa.get("pyautoattack")
        lines += ["", "## AutoAttack", "", "| | s | robust % |", "| --- | ---: | ---: |"]
        lines.append(f"| ours | {aa['ours']['seconds']} | {aa['ours']['robust_accuracy']} |")
        if isinstance(ref, dict):
            lines.append(f"| pyautoattack | {ref['seconds']} | {ref['robust_accuracy']} |")
            lines.append(
                f"\n{aa['points']} points; broken only by ours {aa['broken_only_by_ours']}, "
                f"only by pyautoattack {aa['broken_only_by_pyautoattack']}; ours is "
                f"{aa['speedup_vs_pyautoattack']}x as fast"
            )
        else:
            lines.append(f"\npyautoattack: {ref}")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no GPU is visible; use --device cpu --quick")
    sizes = QUICK_SIZES if args.quick else GPU_SIZES
    if device.type == "cpu":
        compiling.BACKEND = "aot_eager"  # inductor's C++ build takes minutes on a small CPU
    clock = Clock(args.budget_s or sizes.budget_s)
    out = Path(args.out)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report = Report(out, {"started": stamp, "mode": "quick" if args.quick else "full"})
    report.data["environment"] = environment(device, sizes)
    ctx = SimpleNamespace(
        device=device,
        sizes=sizes,
        clock=clock,
        data_dir=find_cifar(args.data_dir),
        work=Path(tempfile.mkdtemp(prefix="device-check-runs-")),  # not under $OUT: 8 files
        peak=report.data["environment"]["bf16_matmul_tflops"] if device.type == "cuda" else None,
    )
    parts: dict[str, Callable[[], dict[str, Any]]] = {
        "cuda_tests": lambda: cuda_tests(clock),
        "training": lambda: training(ctx, (FP32, BF16_CL)),
        "throughput": lambda: throughput(ctx, (FP32, BF16_CL)),
        "autoattack": lambda: autoattack(ctx, trained_model(report)),
        "compiled": lambda: compiled(ctx),
    }
    for name in [p for p in args.parts.split(",") if p]:
        if name not in parts:
            raise SystemExit(f"--parts: unknown part {name!r}; choose from {', '.join(parts)}")
        if clock.left() <= 0:
            report.add(name, {"status": "skipped", "reason": "time budget spent"})
            continue
        began = time.perf_counter()
        print(f"[{clock.elapsed():6.1f} s] {name} ...", flush=True)
        try:
            result = parts[name]()
        except Exception as exc:
            result = {"status": "failed", "error": repr(exc), "trace": traceback.format_exc()}
        result["seconds"] = round(time.perf_counter() - began, 1)
        report.data["wall_s"] = round(clock.elapsed(), 1)
        report.add(name, result)
        print(f"[{clock.elapsed():6.1f} s] {name}: {result['status']}", flush=True)
    print(markdown(report.data))
    print(f"wrote {out / 'device_check.json'} and {out / 'device_check.md'}")


def trained_model(report: Report) -> Path | None:
    """The run of part 2 AutoAttack is compared on: the most robust one on its test split.

    After 2 epochs a model at 0 % robust accuracy (the first H200 run's generalist-d) is broken
    by APGD-CE alone, so FAB-T and Square, where the time goes, would never run."""
    runs = report.data["parts"].get("training", {}).get("runs", [])

    def robust(run: dict[str, Any]) -> float:
        test = run.get("test") or {}
        return min((v for k, v in test.items() if k != "clean"), default=0.0)

    return Path(max(runs, key=robust)["run"]) if runs else None


def compiled(ctx: SimpleNamespace) -> dict[str, Any]:
    """``model.compile: true``: generalist-d's steps timed like part 3 (ResNet-18), its trained
    and resumed run, then pgd-at's steps; each only while the budget lasts (a first compile
    takes a minute or more)."""
    model_name, batch = ctx.sizes.step_models[0]
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    errors: list[str] = []

    def steps(preset: str) -> None:
        rows.append(time_steps(preset, model_name, batch, COMPILED, ctx))

    items: list[tuple[str, Callable[[], None]]] = [
        ("generalist-d steps", lambda: steps("generalist-d")),
        (
            "generalist-d training",
            lambda: runs.append(train_and_resume("generalist-d", COMPILED, ctx)),
        ),
        ("pgd-at steps", lambda: steps("pgd-at")),
    ]
    for what, item in items:
        if ctx.clock.left() <= 0:
            errors.append(f"{what}: skipped, time budget spent")
            continue
        try:
            item()
        except Exception as exc:
            errors.append(f"{what}: {exc!r}")
            errors.append(traceback.format_exc(limit=6))
    good = all(r["finite"] for r in runs)
    return {
        "status": "ok" if good and not errors else "failed",
        "backend": compiling.BACKEND,
        "rows": rows,
        "runs": runs,
        "errors": errors,
    }


if __name__ == "__main__":
    main()
