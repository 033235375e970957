"""Adversarial-training throughput: our learners and merge against a plain PyTorch loop.

Four ways of spending the same training steps on the same CIFAR-shaped batches, measured in
interleaved rounds (plain, ours-nchw, ours, generalist-d, plain, ...) so that a noisy machine
slows them all alike and the *ratios* mean something:

- ``plain``: the reference a user would write by hand: NCHW model, a PGD loop with
  ``torch.autograd.grad``, SGD; batches sliced from an in-memory tensor, no framework at all.
- ``ours-nchw``: ``Learner.train_step`` with an ``adversarial`` task + ``GeneralistMerge`` of one
  learner (= our PGD-AT), NCHW — the same arithmetic as ``plain``: framework overhead only.
- ``ours``: the same with our speed settings (``model.channels_last: true``; bf16 autocast with
  ``--precision bf16``).
- ``natural``: one natural learner, channels_last (the cost Generalist-D adds to PGD-AT).
- ``generalist-d``: natural + ℓ∞ learners, teachers and global EMA updated every step.

Targets (issue 5): ours-nchw / plain <= 1.0, plain / ours >= 1.2 on the CPU,
generalist-d / ours <= 1.12 (ideal (k+2)/(k+1) = 1.09 for PGD-10). The natural learner's step
costs a full forward-backward while an attack step skips the weight gradients, so the real floor
is ours + natural; ``generalist-d / (ours + natural)`` isolates what the merge itself costs.
On a GPU it also counts the model FLOPs of one step (torch's FlopCounterMode) and reports the
fraction of bf16 peak.

    .venv/bin/python benchmarks/train_throughput.py --device cpu --model resnet18 --batch-size 32
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from generalist.attacks.threat import ThreatModel
from generalist.config import OptimizerConfig
from generalist.data import BatchAugment
from generalist.devices import training_autocast
from generalist.models import create_model
from generalist.schedules import PiecewiseLinear
from generalist.training.generalist import GeneralistMerge
from generalist.training.learner import Learner
from generalist.training.recipe import build_optimizer
from generalist.training.tasks import TaskContext, TrainingAttack, build_task, task_spec

THREAT = ThreatModel.parse("Linf:8/255")
STEP_SIZE = 2 / 255
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4))
"""Dense bf16 tensor-core peak from NVIDIA's data sheets (no sparsity); first match wins, and
a plain "H100 80GB HBM3" is the SXM part."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per variant")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--variants", default="plain,ours-nchw,ours,natural,generalist-d")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument(
        "--profile", default="", help="also print torch.profiler's top operators for this variant"
    )
    return parser.parse_args()


def make_model(name: str, device: torch.device, channels_last: bool) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=3, image_size=32).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def plain_step_fn(model: nn.Module, pgd_steps: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """The hand-written reference: what PGD-AT looks like without any library."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    eps = THREAT.eps

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        model.eval()
        delta = torch.empty_like(x).uniform_(-eps, eps)
        x_adv = (x + delta).clamp(0, 1)
        for _ in range(pgd_steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + STEP_SIZE * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
        model.train()
        loss = F.cross_entropy(model(x_adv), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def learner(
    name: str, model: nn.Module, task: str, pgd_steps: int, precision: str = "fp32"
) -> Learner:
    attack = TrainingAttack(THREAT, pgd_steps, STEP_SIZE)
    if not task_spec(task).capabilities.attack:
        attack = None
    return Learner(
        name=name,
        model=model,
        optimizer=build_optimizer(model, OptimizerConfig(type="sgd", lr=0.01)),
        lr_schedule=PiecewiseLinear(((0.0, 0.01), (1.0, 0.01))),
        gamma=PiecewiseLinear(((0.0, 0.5), (1.0, 0.5))),
        task=build_task(task, TaskContext(attack=attack, model=model)),
        generator=torch.Generator(device=model_device(model)).manual_seed(1),
        autocast=training_autocast(precision, model_device(model)),
    )


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def ours_step_fn(
    args: argparse.Namespace, device: torch.device, tasks: list[str], channels_last: bool
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """Our loop's inner body: every learner steps on the batch, then the merge updates."""
    base = make_model(args.model, device, channels_last)
    learners = [
        learner(
            task,
            make_model(args.model, device, channels_last),
            task,
            args.pgd_steps,
            args.precision,
        )
        for task in tasks
    ]
    merge = GeneralistMerge([lr.model for lr in learners], base)
    gammas = [1.0 / len(learners)] * len(learners)
    counter = [0]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.contiguous(memory_format=memory_format)
        for learner in learners:  # each in its precision: forward passes and loss only
            learner.train_step(x, y, 0.5)
        merge.update(counter[0], gammas)
        counter[0] += 1

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n = args.batch_size * args.steps
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    images, labels = images.to(device), labels.to(device)
    augment = BatchAugment(crop_padding=4, flip=True)
    aug_gen = torch.Generator(device=device).manual_seed(0)

    builders = {
        "plain": lambda: plain_step_fn(make_model(args.model, device, False), args.pgd_steps),
        "ours-nchw": lambda: ours_step_fn(args, device, ["adversarial"], channels_last=False),
        "ours": lambda: ours_step_fn(args, device, ["adversarial"], channels_last=True),
        "natural": lambda: ours_step_fn(args, device, ["natural"], channels_last=True),
        "generalist-d": lambda: ours_step_fn(
            args, device, ["natural", "adversarial"], channels_last=True
        ),
    }
    names = [v for v in args.variants.split(",") if v]
    unknown = set(names) - set(builders)
    if unknown:
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; choose from {sorted(builders)}")
    steps = {name: builders[name]() for name in names}

    def epoch(step: Callable[[torch.Tensor, torch.Tensor], None]) -> float:
        synchronize(device)
        start = time.perf_counter()
        for b in range(args.steps):
            index = slice(b * args.batch_size, (b + 1) * args.batch_size)
            x = augment(images[index].float().div_(255), aug_gen)
            step(x, labels[index])
        synchronize(device)
        return time.perf_counter() - start

    for name in names:  # warm-up: allocator, cuDNN autotuning, lazy init
        epoch(steps[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            times[name].append(epoch(steps[name]))

    print(
        f"# {args.model}, batch {args.batch_size}, PGD-{args.pgd_steps}, {args.precision}, "
        f"{device} ({device_name(device)}), torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, {args.rounds} rounds x {args.steps} steps"
    )
    median = {name: statistics.median(ts) for name, ts in times.items()}
    print("| variant | median s / step | images/s |")
    print("| --- | ---: | ---: |")
    for name in names:
        per_step = median[name] / args.steps
        print(f"| {name} | {per_step:.4f} | {args.batch_size / per_step:.1f} |")
    for a, b, target in (
        ("ours-nchw", "plain", "<= 1.00"),
        ("plain", "ours", ">= 1.20"),
        ("generalist-d", "ours", "<= 1.12"),
    ):
        if a in median and b in median:
            print(f"ratio {a} / {b}: {median[a] / median[b]:.3f} (target {target})")
    if {"generalist-d", "ours", "natural"} <= set(median):
        # What the merge itself adds: Generalist-D minus its two learners' own steps.
        alone = median["ours"] + median["natural"]
        print(
            f"ratio generalist-d / (ours + natural): {median['generalist-d'] / alone:.3f} "
            f"(the merge's own cost; natural / ours = {median['natural'] / median['ours']:.3f})"
        )
    if device.type == "cuda" and "ours" in median:
        report_flops(args, device, median["ours"] / args.steps)
    if args.profile:
        if args.profile not in steps:
            raise SystemExit(f"--profile {args.profile}: not among the variants {names}")
        print_profile(args.profile, lambda: epoch(steps[args.profile]))


def print_profile(name: str, run: Callable[[], float]) -> None:
    """Where one round's time goes, by operator: shows whether anything but kernels costs."""
    with torch.profiler.profile() as profiler:
        run()
    print(f"# profile of one round of {name}, by self time")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU"


def report_flops(args: argparse.Namespace, device: torch.device, seconds_per_step: float) -> None:
    """Model FLOPs of one PGD-AT step (attack + update), counted by torch, against bf16 peak."""
    step = ours_step_fn(args, device, ["adversarial"], channels_last=True)
    x = torch.rand(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        step(x, y)
    flops = counter.get_total_flops()
    achieved = flops / seconds_per_step / 1e12
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in BF16_PEAK_TFLOPS if all(p in name for p in k.split())), None)
    line = f"model FLOPs per step {flops / 1e12:.3f} TFLOP -> {achieved:.1f} TFLOP/s achieved"
    if peak is not None:
        line += f" = {100 * achieved / peak:.1f} % of {name} dense bf16 peak ({peak} TFLOP/s)"
    print(line)


if __name__ == "__main__":
    main()
