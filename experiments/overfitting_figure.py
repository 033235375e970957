"""Robust overfitting, shown: the validation curves of ladder rungs over all their epochs.

Adversarial training of the raw learner is known to peak in robust accuracy and then fall
("robust overfitting", Rice et al. 2020); a weight average (the EMA global model) is expected
not to. This draws, for the rungs asked for (default 2, PGD-AT, and 5, Generalist-D), the
per-epoch validation accuracy (clean and the run's PGD attack) of the deployed global model
(solid) and of the robust learner itself (dashed), one thin line per seed and their mean thick,
in one figure, and prints per curve the peak (mean over seeds), its epoch and the last epoch's
value: the drop from peak to end is the overfitting. Everything is read from the runs'
``metrics.jsonl`` (records or run folders alike).

Usage: python experiments/overfitting_figure.py experiments/records/ladder-cifar10-e120 \
           [--rungs 2 5] [--out experiments/figures/overfitting-e120.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from ladder_summary import RUN_NAME

LEARNER = "adv_linf"  # the robust learner every compared rung has
STYLES = {"global": "-", LEARNER: "--"}


def curves(records: Path, rungs: list[int]) -> dict[tuple[int, str, str], dict[int, list]]:
    """(rung, model, metric) -> seed -> [(epoch, accuracy)] from each run's metrics.jsonl."""
    found: dict[tuple[int, str, str], dict[int, list]] = defaultdict(dict)
    for folder in sorted(records.iterdir()):
        match = RUN_NAME.match(folder.name)
        if not match or int(match["rung"]) not in rungs:
            continue
        path = folder / "metrics.jsonl"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: give a folder of ladder runs or records")
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for line in lines:
            for model in STYLES:
                for metric, value in line.get("val", {}).get(model, {}).items():
                    series = found[(int(match["rung"]), model, metric)]
                    series.setdefault(int(match["seed"]), []).append((line["epoch"], value))
    if not found:
        raise SystemExit(f"no runs of rungs {rungs} in {records}")
    return found


def mean_curve(by_seed: dict[int, list]) -> list[tuple[int, float]]:
    """The mean over seeds at each epoch every seed reached."""
    epochs = set.intersection(*({e for e, _ in s} for s in by_seed.values()))
    values = [dict(s) for s in by_seed.values()]
    return [(e, statistics.mean(v[e] for v in values)) for e in sorted(epochs)]


def draw(found: dict, rungs: list[int], out: Path) -> None:
    metrics = list(dict.fromkeys(metric for _, _, metric in found))
    figure, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.6), squeeze=False)
    colors = dict(zip(rungs, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for ax, metric in zip(axes[0], metrics, strict=True):
        for (rung, model, name), by_seed in sorted(found.items()):
            if name != metric:
                continue
            for series in by_seed.values():
                ax.plot(*zip(*series, strict=True), STYLES[model], color=colors[rung], lw=0.5,
                        alpha=0.35)  # fmt: skip
            label = f"rung {rung}, {'global model' if model == 'global' else 'robust learner'}"
            ax.plot(*zip(*mean_curve(by_seed), strict=True), STYLES[model], color=colors[rung],
                    lw=2, label=f"{label} (mean of {len(by_seed)})")  # fmt: skip
        ax.set(title=f"validation {metric}", xlabel="epoch", ylabel="accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    print(f"wrote {out}")


def peaks(found: dict) -> str:
    """Per curve: peak of the seed mean, its epoch, the last epoch's mean, and the drop."""
    lines = [
        "| rung | model | metric | seeds | peak | at epoch | last | last − peak |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (rung, model, metric), by_seed in sorted(found.items()):
        mean = mean_curve(by_seed)
        epoch, top = max(mean, key=lambda point: point[1])
        last = mean[-1][1]
        lines.append(
            f"| {rung} | {model} | {metric} | {len(by_seed)} | {top:.1f} | {epoch} | "
            f"{last:.1f} | {last - top:+.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("records", type=Path, help="a folder of ladder runs or their records")
    parser.add_argument("--rungs", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--out", type=Path, default=Path("overfitting.png"))
    args = parser.parse_args()
    found = curves(args.records, args.rungs)
    draw(found, args.rungs, args.out)
    print(peaks(found))


if __name__ == "__main__":
    main()
