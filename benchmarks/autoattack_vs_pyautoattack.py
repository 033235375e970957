"""Our AutoAttack (standard, Linf 8/255) against the reference ``pyautoattack``, side by side.

Both run in one process on the same model, the same images, the same device and batch size, so
the wall-time ratio compares implementations, not machines. Without ``--run-dir`` a small CNN is
first trained on the CIFAR-10 subset for a few minutes with FGSM + random start (Wong et al.,
2020), so that some points survive APGD-CE and the later, costlier attacks have work to do; an
undefended model would only time APGD-CE.

    .venv/bin/python benchmarks/autoattack_vs_pyautoattack.py --n-examples 500 --device cpu
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from generalist.attacks import AutoAttack
from generalist.attacks.pgd import pgd
from generalist.attacks.threat import ThreatModel
from generalist.checkpoint import load_model, save_model
from generalist.data import load_splits, to_float
from generalist.models import create_model

CIFAR_DIR = "/work/shared/data/cifar10-subset"
THREAT = ThreatModel.parse("Linf:8/255")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-examples", type=int, default=500)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--run-dir", help="evaluate this saved model instead of training one")
    parser.add_argument(
        "--save-dir",
        default="runs/bench-autoattack-cifar10",
        help="where the freshly trained model is saved (reuse it with --run-dir)",
    )
    parser.add_argument("--data-dir", default=CIFAR_DIR)
    parser.add_argument("--model", default="small-cnn")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=500, help="attack batch size")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def train_fgsm_rs(args: argparse.Namespace, splits, device: torch.device) -> torch.nn.Module:
    """FGSM with a random start (step 1.25ε): cheap adversarial training that gives a model
    with non-trivial robustness in minutes on a CPU."""
    info = splits.info
    torch.manual_seed(args.seed)
    spec = {
        "name": args.model,
        "num_classes": info.num_classes,
        "in_channels": info.image_shape[0],
        "image_size": info.image_shape[-1],
        "mean": list(info.mean),
        "std": list(info.std),
    }
    model = create_model(spec.pop("name"), **spec).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    x_all, y_all = to_float(splits.train.images), splits.train.labels
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_all), generator=generator)
        for idx in order.split(128):
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            x = torch.where(
                torch.rand(len(x), 1, 1, 1, generator=generator).to(device) < 0.5, x, x.flip(3)
            )
            x_adv = pgd(model, x, y, THREAT, steps=1, step_size=1.25 * THREAT.eps)
            loss = F.cross_entropy(model(x_adv), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    save_dir = Path(args.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, save_dir, {"model": {"name": args.model, **spec}, "dataset": "cifar10"})
    print(f"saved the model to {save_dir} (reuse it with --run-dir {save_dir})")
    return model.eval()


def print_finished_stages(progress) -> None:
    if progress.attack != "clean" and progress.finished:
        spent = progress.state.seconds.get(progress.attack, 0.0)
        print(
            f"   ours: {progress.attack} done on {progress.total} points ({spent:.1f} s)",
            flush=True,
        )


def run_ours(model, x, y, args) -> tuple[float, torch.Tensor, dict]:
    attack = AutoAttack(THREAT, version="standard", seed=args.seed)
    started = time.perf_counter()
    result = attack.run(model, x, y, batch_size=args.batch_size, on_progress=print_finished_stages)
    return time.perf_counter() - started, result.robust.cpu(), result


def time_reference_stages(attack) -> dict[str, list[float]]:
    """Wrap the reference's attack objects so each stage's points and seconds add up like ours.

    In the standard version each stage has its own object (FAB-T runs on ``attack.fab``)."""
    stages: dict[str, list[float]] = {}
    for name, owner in (
        ("apgd-ce", attack.apgd),
        ("apgd-t", attack.apgd_targeted),
        ("fab-t", attack.fab),
        ("square", attack.square),
    ):

        def timed(x, y, perturb=owner.perturb, name=name):
            started = time.perf_counter()
            x_adv = perturb(x, y)
            points, seconds = stages.setdefault(name, [0, 0.0])
            stages[name] = [points + len(x), seconds + time.perf_counter() - started]
            return x_adv

        owner.perturb = timed
    return stages


def run_reference(model, x, y, args, device) -> tuple[float, torch.Tensor, dict[str, list]]:
    from pyautoattack import AutoAttack as ReferenceAutoAttack

    attack = ReferenceAutoAttack(
        model, norm="Linf", eps=THREAT.eps, version="standard", seed=args.seed, device=device
    )
    stages = time_reference_stages(attack)
    started = time.perf_counter()
    x_adv, _ = attack.run_standard_evaluation(x, y, batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        robust = torch.cat(
            [
                model(xb.to(device)).argmax(1).cpu() == yb
                for xb, yb in zip(
                    x_adv.split(args.batch_size), y.split(args.batch_size), strict=True
                )
            ]
        )
    return seconds, robust, stages


def print_stage_table(result, ref_stages: dict[str, list]) -> None:
    """Per stage: points attacked, seconds for each implementation and our robust accuracy."""
    print("   stage     points  ours (s)  ref (s)  ours/ref  robust after (ours)")
    attacked = result.clean_correct
    for name, robust_after in result.robust_after.items():
        ours = result.seconds.get(name, 0.0)
        ref_points, ref = ref_stages.get(name, [0, 0.0])
        ratio = f"{ours / ref:8.2f}" if ref > 0 else "       -"
        print(
            f"   {name:<8} {int(attacked.sum()):4d}/{int(ref_points):<4d} {ours:8.1f} "
            f"{ref:8.1f} {ratio}  {100 * robust_after.float().mean():.2f}%"
        )
        attacked = robust_after


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    splits = load_splits("cifar10", args.data_dir, val_size=0)
    if args.run_dir:
        model, _ = load_model(args.run_dir, device)
    else:
        model = train_fgsm_rs(args, splits, device)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    n = min(args.n_examples, len(splits.test))
    x, y = to_float(splits.test.images[:n]), splits.test.labels[:n]
    with torch.no_grad():
        clean = (model(x.to(device)).argmax(1).cpu() == y).float().mean().item()
    print(
        f"{n} CIFAR-10 test images, Linf 8/255, device {device}, "
        f"{torch.get_num_threads()} threads; clean accuracy {100 * clean:.2f}%",
        flush=True,
    )

    ours_s, ours_robust, result = run_ours(model, x.to(device), y.to(device), args)
    print(
        f"ours:         {ours_s:8.1f} s   robust accuracy {100 * ours_robust.float().mean():.2f}%"
    )
    ref_s, ref_robust, ref_stages = run_reference(model, x.to(device), y.to(device), args, device)
    print(f"pyautoattack: {ref_s:8.1f} s   robust accuracy {100 * ref_robust.float().mean():.2f}%")
    print(f"ratio ours / pyautoattack wall time: {ours_s / ref_s:.2f}")
    print_stage_table(result, ref_stages)
    only_ours = int((ref_robust & ~ours_robust).sum())
    only_ref = int((ours_robust & ~ref_robust).sum())
    print(f"points broken only by ours: {only_ours}, only by pyautoattack: {only_ref}")


if __name__ == "__main__":
    main()
