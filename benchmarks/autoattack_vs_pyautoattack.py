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


def run_reference(model, x, y, args, device) -> tuple[float, torch.Tensor]:
    from pyautoattack import AutoAttack as ReferenceAutoAttack

    attack = ReferenceAutoAttack(
        model, norm="Linf", eps=THREAT.eps, version="standard", seed=args.seed, device=device
    )
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
    return seconds, robust


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
    for name, mask in result.robust_after.items():
        print(
            f"   after {name:<8} {100 * mask.float().mean():.2f}%  "
            f"({result.seconds.get(name, float('nan')):.1f} s)"
        )
    ref_s, ref_robust = run_reference(model, x.to(device), y.to(device), args, device)
    print(f"pyautoattack: {ref_s:8.1f} s   robust accuracy {100 * ref_robust.float().mean():.2f}%")
    print(f"ratio ours / pyautoattack wall time: {ours_s / ref_s:.2f}")
    only_ours = int((ref_robust & ~ours_robust).sum())
    only_ref = int((ours_robust & ~ref_robust).sum())
    print(f"points broken only by ours: {only_ours}, only by pyautoattack: {only_ref}")


if __name__ == "__main__":
    main()
