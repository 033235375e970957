"""Our AutoAttack against the reference ``pyautoattack``, side by side, per stage.

Both run in one process on the same model, the same images, the same device and batch size, one
after the other, so the time ratio compares implementations, not machines (on a shared machine
the ratio is what to quote, not the seconds). Per stage it prints the points attacked, forward
and backward passes per attacked point (counted at the model for both), seconds and the ratio
ours / reference; then both robust accuracies and the points only one of them broke. With
``--seeds 0 1 2`` it repeats everything per seed, ours first for even-indexed seeds and the
reference first for odd ones (so a load that drifts favours neither), and prints the spread of
both accuracies (Square's random search is the only stage whose draws differ between the two)
and the ratio per seed.

Per stage it also prints the floor of both: the model alone replaying the stage's calls (every
call's input shape, memory layout and whether it was backpropagated is recorded while the
attacks run), each kind of call timed after a warm-up call and multiplied by how often the stage
made it. ``ours/floor`` is what a stage spends beyond its passes; a stage near 1.0 can only get
faster through fewer or cheaper passes.

Models (trained once and cached under ``--cache-dir``, reused afterwards):

- ``cifar10``: ``small-cnn`` on the CIFAR-10 subset, FGSM with a random start (Wong et al.,
  2020), 6 epochs, the model of BENCHMARKS.md's first AutoAttack table;
- ``mnist``: ``small-cnn`` on MNIST trained with TRADES (β = 6, PGD-5 with step 0.1 at ℓ∞ 0.3
  inside), on the first 5 000 training images for 2 epochs.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/autoattack_vs_pyautoattack.py \\
        --dataset cifar10 --threat Linf:8/255 --n-examples 500 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from generalist.attacks import AutoAttack, AutoAttackProgress, ThreatModel
from generalist.attacks.cost import CallTally, CountingModel, ModelCall, PassCount, RecordingModel
from generalist.attacks.pgd import pgd
from generalist.data import load_splits, to_float
from generalist.models import create_model
from generalist.training.tasks import TrainingAttack
from generalist.training.tasks.trades import trades_loss
from generalist.weights import load_model, save_model

DATA = {"cifar10": "/work/shared/data/cifar10-subset", "mnist": "/work/shared/data/mnist"}
TRAINING_EPS = {"cifar10": "Linf:8/255", "mnist": "Linf:0.3"}
REFERENCE_OWNERS = {
    "apgd-ce": "apgd",
    "apgd-dlr": "apgd",
    "fab": "fab",
    "square": "square",
    "apgd-t": "apgd_targeted",
    "fab-t": "fab",
}
"""Which attribute of the reference's AutoAttack runs each stage."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATA), default="cifar10")
    parser.add_argument("--threat", default=None, help="default: Linf:8/255 (cifar10), Linf:0.3")
    parser.add_argument("--version", choices=["standard", "plus", "rand"], default="standard")
    parser.add_argument("--n-examples", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", help="default: the shared copy of the dataset")
    parser.add_argument("--cache-dir", default="runs/bench-autoattack")
    parser.add_argument("--batch-size", type=int, default=500, help="attack batch size")
    parser.add_argument("--n-iter", type=int, default=100, help="iterations (quick checks only)")
    parser.add_argument("--n-queries", type=int, default=5000, help="Square (quick checks only)")
    parser.add_argument(
        "--floor-repeats",
        type=_positive,
        default=3,
        help="timed replays per kind of model call for the floor (median; default 3)",
    )
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def model_spec(dataset: str, info) -> dict:
    return {
        "name": "small-cnn",
        "num_classes": info.num_classes,
        "in_channels": info.image_shape[0],
        "image_size": info.image_shape[-1],
        "mean": list(info.mean),
        "std": list(info.std),
    }


def train(dataset: str, splits, device: torch.device, save_dir: Path) -> torch.nn.Module:
    """FGSM-RS (CIFAR-10 subset) or TRADES (MNIST): non-trivial robustness in minutes on a CPU,
    so that points survive APGD and the later, costlier stages have work to do."""
    torch.manual_seed(0)
    spec = model_spec(dataset, splits.info)
    model = create_model(spec["name"], **{k: v for k, v in spec.items() if k != "name"})
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3 if dataset == "cifar10" else 1e-3)
    threat = ThreatModel.parse(TRAINING_EPS[dataset])
    x_all, y_all = to_float(splits.train.images), splits.train.labels
    if dataset == "mnist":
        x_all, y_all = x_all[:5_000], y_all[:5_000]
    generator = torch.Generator().manual_seed(0)
    inner = TrainingAttack(threat, steps=5, step_size=0.1)
    epochs = 6 if dataset == "cifar10" else 2
    started = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(y_all), generator=generator).split(128):
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            if dataset == "cifar10":
                flip = torch.rand(len(x), 1, 1, 1, generator=generator).to(device) < 0.5
                x = torch.where(flip, x.flip(3), x)
                x_adv = pgd(model, x, y, threat, steps=1, step_size=1.25 * threat.eps)
                loss = F.cross_entropy(model(x_adv), y)
            else:
                loss = trades_loss(model, x, y, inner, beta=6.0, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        elapsed = time.perf_counter() - started
        print(f"  epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} ({elapsed:.0f} s)", flush=True)
    save_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, save_dir, {"model": spec, "dataset": dataset})
    return model


def cached_model(args: argparse.Namespace, splits, device: torch.device) -> torch.nn.Module:
    save_dir = Path(args.cache_dir) / args.dataset
    if (save_dir / "model.safetensors").exists():
        model, _ = load_model(save_dir, device)
        print(f"model: {save_dir} (cached)")
    else:
        print(f"model: training {save_dir} ...", flush=True)
        model = train(args.dataset, splits, device, save_dir)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def run_ours(model, x, y, threat, seed, args) -> tuple[float, torch.Tensor, dict]:
    """Our AutoAttack; each stage's calls are binned by the progress reports, which come after
    each batch of each stage, as the stage's pass counts are."""
    attack = AutoAttack(threat, version=args.version, seed=seed, n_iter=args.n_iter)
    for sub in attack.attacks:
        if sub.name == "square":
            sub.n_queries = args.n_queries
    recorder = RecordingModel(model)
    calls: dict[str, CallTally] = {}

    def bin_calls(progress: AutoAttackProgress) -> None:
        calls.setdefault(progress.attack, CallTally()).add(recorder.take())

    started = time.perf_counter()
    result = attack.run(recorder, x, y, batch_size=args.batch_size, on_progress=bin_calls)
    seconds = time.perf_counter() - started
    stages = {
        name: {**result.cost[name], "points": int(before.sum()), "calls": calls[name]}
        for name, before in zip(
            result.attacks,
            [result.clean_correct, *[result.robust_after[n] for n in result.attacks[:-1]]],
            strict=True,
        )
    }
    return seconds, result.robust.cpu(), stages


def run_reference(model, x, y, threat, seed, args) -> tuple[float, torch.Tensor, dict]:
    """The reference with each stage's ``perturb`` wrapped to add up its points, passes, calls
    and seconds (FAB and FAB-T share one object; the stage name is read from its mode)."""
    from pyautoattack import AutoAttack as ReferenceAutoAttack

    recorder = RecordingModel(model)
    reference = ReferenceAutoAttack(
        recorder, norm=threat.norm, eps=threat.eps, version=args.version, seed=seed,
        device=args.device,
    )  # fmt: skip
    for owner in (reference.apgd, reference.apgd_targeted, reference.fab):
        owner.n_iter = args.n_iter
    reference.square.n_queries = args.n_queries
    if args.version == "plus":
        reference.square.n_restarts = 5  # the paper's plus; pyautoattack 0.2.0 leaves it at 1
    stages: dict[str, dict] = {}
    wrapped = set()
    for owner_name in dict.fromkeys(REFERENCE_OWNERS.values()):
        owner = getattr(reference, owner_name)
        if id(owner) in wrapped:
            continue
        wrapped.add(id(owner))

        def timed(x, y, owner=owner, perturb=owner.perturb):
            if owner is reference.fab:
                name = "fab-t" if owner.targeted else "fab"
            elif owner is reference.apgd:
                name = f"apgd-{owner.loss}"
            else:
                name = "square" if owner is reference.square else "apgd-t"
            recorder.count.forward = recorder.count.backward = 0
            recorder.take()  # the reference's own checks between stages belong to no stage
            started = time.perf_counter()
            x_adv = perturb(x, y)
            seconds = time.perf_counter() - started
            stage = stages.setdefault(
                name,
                {"points": 0, "forward": 0, "backward": 0, "seconds": 0.0, "calls": CallTally()},
            )
            stage["points"] += len(x)
            stage["forward"] += recorder.count.forward
            stage["backward"] += recorder.count.backward
            stage["seconds"] += seconds
            stage["calls"].add(recorder.take())
            return x_adv

        owner.perturb = timed
    started = time.perf_counter()
    x_adv, _ = reference.run_standard_evaluation(x, y, batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        robust = torch.cat(
            [
                model(xb).argmax(1).cpu() == yb.cpu()
                for xb, yb in zip(
                    x_adv.split(args.batch_size), y.split(args.batch_size), strict=True
                )
            ]
        )
    return seconds, robust, stages


RUNNERS = {"ours": run_ours, "pyautoattack": run_reference}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def replay_input(call: ModelCall, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) images of the call's shape, dtype and memory layout (its strides; a layout
    that is not dense, such as a strided view, is replayed contiguous)."""
    numel = math.prod(call.shape)
    pairs = zip(call.shape, call.stride, strict=True)
    extent = 1 + sum((size - 1) * stride for size, stride in pairs)
    if numel > 0 and extent == numel:
        x = torch.empty_strided(call.shape, call.stride, dtype=call.dtype, device=device)
    else:
        x = torch.empty(call.shape, dtype=call.dtype, device=device)
    return x.uniform_()


@dataclass(frozen=True)
class CallCost:
    """One replayed call of a kind: the median seconds of its forward (building a graph if the
    kind did) and of one backward to the input, and the passes over points each makes, counted
    at the model as the attacks' passes are."""

    forward_s: float
    backward_s: float
    forward_points: int
    backward_points: int


def time_call(model: nn.Module, call: ModelCall, repeats: int, device: torch.device) -> CallCost:
    """One untimed call first (oneDNN and cuDNN pick and build their kernels per shape), then the
    median of ``repeats`` timed ones: forward-only kinds under ``inference_mode``, the others
    with the input requiring its gradient and, timed apart, ``autograd.grad`` to the input."""
    counted = CountingModel(model)
    x = replay_input(call, device)
    forward_s, backward_s = [], []
    for repeat in range(repeats + 1):
        counted.count = PassCount()
        synchronize(device)
        began = time.perf_counter()
        if call.grad:
            x_in = x.detach().requires_grad_(True)
            out = counted(x_in)
            synchronize(device)
            forwarded = time.perf_counter()
            torch.autograd.grad(out, x_in, torch.ones_like(out))
        else:
            with torch.inference_mode():
                counted(x)
            synchronize(device)
            forwarded = time.perf_counter()
        synchronize(device)
        if repeat > 0:
            forward_s.append(forwarded - began)
            backward_s.append(time.perf_counter() - forwarded)
    return CallCost(
        forward_s=statistics.median(forward_s),
        backward_s=statistics.median(backward_s) if call.grad else 0.0,
        forward_points=counted.count.forward,
        backward_points=counted.count.backward,
    )


class FloorTimer:
    """Prices a stage's calls at their floor: the model alone replaying them, each kind of call
    timed once (:func:`time_call`) and multiplied by how often the stage made it. The timings
    are kept, so later stages, the other implementation and later seeds only time new kinds."""

    def __init__(self, model: nn.Module, device: torch.device, repeats: int) -> None:
        self.model, self.device, self.repeats = model, device, repeats
        self.timings: dict[ModelCall, CallCost] = {}
        self.seconds = 0.0
        """Spent timing, for the record."""

    def price(self, calls: CallTally) -> tuple[float, PassCount]:
        """The floor's seconds and the passes over points its replay makes."""
        began = time.perf_counter()
        for call in calls.forward.keys() | calls.backward.keys():
            if call not in self.timings:
                self.timings[call] = time_call(self.model, call, self.repeats, self.device)
        self.seconds += time.perf_counter() - began
        cost = self.timings
        seconds = sum(n * cost[c].forward_s for c, n in calls.forward.items()) + sum(
            n * cost[c].backward_s for c, n in calls.backward.items()
        )
        replayed = PassCount(
            forward=sum(n * cost[c].forward_points for c, n in calls.forward.items()),
            backward=sum(n * cost[c].backward_points for c, n in calls.backward.items()),
        )
        return seconds, replayed


def print_stages(ours: dict, ref: dict) -> None:
    """Per stage: points, passes per point and seconds of both, and the floor of both (their
    passes alone, replayed) with ours / our floor; then the stages' totals."""
    print(
        "   stage      points   fwd/pt ours  ref    bwd/pt ours  ref    "
        "seconds ours    ref  ours/ref   floor ours    ref  ours/floor"
    )
    empty = {"points": 0, "forward": 0, "backward": 0, "seconds": 0.0, "floor": 0.0}
    rows = [(name, stage, ref.get(name, empty)) for name, stage in ours.items()]
    # the totals per point are over the points the first stage attacked (the clean-correct ones)
    totals = [
        {
            **{key: sum(s[key] for s in stages.values()) for key in empty},
            "points": next(iter(stages.values()), empty)["points"],
        }
        for stages in (ours, ref)
    ]
    rows.append(("total", *totals))
    for name, stage, other in rows:
        per = lambda s, key: s[key] / max(s["points"], 1)  # noqa: E731
        ratio = lambda a, b: a / b if b > 0 else float("nan")  # noqa: E731
        print(
            f"   {name:<9} {stage['points']:4d}/{other['points']:<4d} "
            f"{per(stage, 'forward'):9.0f} {per(other, 'forward'):6.0f} "
            f"{per(stage, 'backward'):9.0f} {per(other, 'backward'):6.0f} "
            f"{stage['seconds']:12.1f} {other['seconds']:7.1f} "
            f"{ratio(stage['seconds'], other['seconds']):8.2f} "
            f"{stage['floor']:12.1f} {other['floor']:6.1f} "
            f"{ratio(stage['seconds'], stage['floor']):10.2f}"
        )


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    threat = ThreatModel.parse(args.threat or TRAINING_EPS[args.dataset])
    splits = load_splits(args.dataset, args.data_dir or DATA[args.dataset], val_size=0)
    model = cached_model(args, splits, device)
    n = min(args.n_examples, len(splits.test))
    x, y = to_float(splits.test.images[:n]).to(device), splits.test.labels[:n].to(device)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    print(
        f"{n} {args.dataset} test images, {threat}, AutoAttack {args.version}, device {device}, "
        f"{torch.get_num_threads()} threads, batch {args.batch_size}; "
        f"clean accuracy {100 * clean:.2f}%",
        flush=True,
    )
    for layout in (torch.contiguous_format, torch.channels_last):
        # the process's one-off start-up (lazy initialisation, thread pools) goes to no side
        sample = x[: args.batch_size].contiguous(memory_format=layout)
        call = ModelCall(tuple(sample.shape), sample.stride(), sample.dtype, grad=True)
        time_call(model, call, repeats=1, device=device)
    accuracies: dict[str, list[float]] = {"ours": [], "pyautoattack": []}
    ratios = []
    timer = FloorTimer(model, device, args.floor_repeats)
    for i, seed in enumerate(args.seeds):
        # alternate who goes first, so a load that drifts during a seed favours neither side
        order = ["ours", "pyautoattack"] if i % 2 == 0 else ["pyautoattack", "ours"]
        runs = {side: RUNNERS[side](model, x, y, threat, seed, args) for side in order}
        (ours_s, ours_robust, ours_stages), (ref_s, ref_robust, ref_stages) = (
            runs["ours"],
            runs["pyautoattack"],
        )
        accuracies["ours"].append(100 * ours_robust.float().mean().item())
        accuracies["pyautoattack"].append(100 * ref_robust.float().mean().item())
        ratios.append(ours_s / ref_s)
        print(
            f"seed {seed} ({order[0]} first): ours {ours_s:.1f} s, pyautoattack {ref_s:.1f} s, "
            f"ratio ours/pyautoattack {ours_s / ref_s:.2f}; robust accuracy ours "
            f"{accuracies['ours'][-1]:.2f}%, pyautoattack {accuracies['pyautoattack'][-1]:.2f}%; "
            f"broken only by ours {int((ref_robust & ~ours_robust).sum())}, "
            f"only by pyautoattack {int((ours_robust & ~ref_robust).sum())}",
            flush=True,
        )
        for stage in [*ours_stages.values(), *ref_stages.values()]:
            stage["floor"], stage["replayed"] = timer.price(stage["calls"])
        print_stages(ours_stages, ref_stages)
        print(
            f"   floor: the model alone replaying each stage's calls, {len(timer.timings)} kinds "
            f"of call (shape, layout, with or without backward) timed so far in "
            f"{timer.seconds:.1f} s, median of {args.floor_repeats} after a warm-up call",
            flush=True,
        )
    if len(args.seeds) > 1:
        for name, values in accuracies.items():
            print(
                f"{name}: robust accuracy {statistics.mean(values):.2f}% "
                f"(min {min(values):.2f}, max {max(values):.2f}, "
                f"spread {max(values) - min(values):.2f} pp, sd {statistics.stdev(values):.2f})"
            )
        print(
            "time ratio ours/pyautoattack per seed: "
            + ", ".join(f"{r:.2f} (seed {s})" for r, s in zip(ratios, args.seeds, strict=True))
            + f"; min {min(ratios):.2f}, max {max(ratios):.2f}"
        )


if __name__ == "__main__":
    main()
