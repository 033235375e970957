"""Our AutoAttack against the reference ``pyautoattack``, side by side, per stage.

Both run in one process on the same model, the same images, the same device and batch size, one
after the other, so the time ratio compares implementations, not machines (on a shared machine
the ratio is what to quote, not the seconds). Per stage it prints the points attacked, forward
and backward passes per attacked point (counted at the model for both), seconds and the ratio
ours / reference; then both robust accuracies and the points only one of them broke. With
``--seeds 0 1 2`` it repeats everything per seed and prints the spread of both accuracies
(Square's random search is the only stage whose draws differ between the two).

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
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from generalist.attacks import AutoAttack, ThreatModel
from generalist.attacks.cost import CountingModel
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


def parse_args() -> argparse.Namespace:
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
    return parser.parse_args()


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
    attack = AutoAttack(threat, version=args.version, seed=seed, n_iter=args.n_iter)
    for sub in attack.attacks:
        if sub.name == "square":
            sub.n_queries = args.n_queries
    started = time.perf_counter()
    result = attack.run(model, x, y, batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    stages = {
        name: {**result.cost[name], "points": int(before.sum())}
        for name, before in zip(
            result.attacks,
            [result.clean_correct, *[result.robust_after[n] for n in result.attacks[:-1]]],
            strict=True,
        )
    }
    return seconds, result.robust.cpu(), stages


def run_reference(model, x, y, threat, seed, args) -> tuple[float, torch.Tensor, dict]:
    """The reference with each stage's ``perturb`` wrapped to add up its points, passes and
    seconds (FAB and FAB-T share one object; the stage name is read from its mode)."""
    from pyautoattack import AutoAttack as ReferenceAutoAttack

    counted = CountingModel(model)
    reference = ReferenceAutoAttack(
        counted, norm=threat.norm, eps=threat.eps, version=args.version, seed=seed,
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
            counted.count.forward = counted.count.backward = 0
            started = time.perf_counter()
            x_adv = perturb(x, y)
            stage = stages.setdefault(
                name, {"points": 0, "forward": 0, "backward": 0, "seconds": 0.0}
            )
            stage["points"] += len(x)
            stage["forward"] += counted.count.forward
            stage["backward"] += counted.count.backward
            stage["seconds"] += time.perf_counter() - started
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


def print_stages(ours: dict, ref: dict) -> None:
    print(
        "   stage      points   fwd/pt ours  ref    bwd/pt ours  ref    "
        "seconds ours    ref  ours/ref"
    )
    for name, stage in ours.items():
        other = ref.get(name, {"points": 0, "forward": 0, "backward": 0, "seconds": 0.0})
        per = lambda s, key: s[key] / max(s["points"], 1)  # noqa: E731
        ratio = stage["seconds"] / other["seconds"] if other["seconds"] > 0 else float("nan")
        print(
            f"   {name:<9} {stage['points']:4d}/{other['points']:<4d} "
            f"{per(stage, 'forward'):9.0f} {per(other, 'forward'):6.0f} "
            f"{per(stage, 'backward'):9.0f} {per(other, 'backward'):6.0f} "
            f"{stage['seconds']:12.1f} {other['seconds']:7.1f} {ratio:8.2f}"
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
    accuracies: dict[str, list[float]] = {"ours": [], "pyautoattack": []}
    ratios = []
    for seed in args.seeds:
        ours_s, ours_robust, ours_stages = run_ours(model, x, y, threat, seed, args)
        ref_s, ref_robust, ref_stages = run_reference(model, x, y, threat, seed, args)
        accuracies["ours"].append(100 * ours_robust.float().mean().item())
        accuracies["pyautoattack"].append(100 * ref_robust.float().mean().item())
        ratios.append(ours_s / ref_s)
        print(
            f"seed {seed}: ours {ours_s:.1f} s, pyautoattack {ref_s:.1f} s, "
            f"ratio ours/pyautoattack {ours_s / ref_s:.2f}; robust accuracy ours "
            f"{accuracies['ours'][-1]:.2f}%, pyautoattack {accuracies['pyautoattack'][-1]:.2f}%; "
            f"broken only by ours {int((ref_robust & ~ours_robust).sum())}, "
            f"only by pyautoattack {int((ours_robust & ~ref_robust).sum())}",
            flush=True,
        )
        print_stages(ours_stages, ref_stages)
    if len(args.seeds) > 1:
        for name, values in accuracies.items():
            print(
                f"{name}: robust accuracy {statistics.mean(values):.2f}% "
                f"(min {min(values):.2f}, max {max(values):.2f}, sd {statistics.stdev(values):.2f})"
            )
        print(f"time ratio ours/pyautoattack per seed: {', '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    main()
