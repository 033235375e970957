"""The corruption table of experiments/corruptions.sh, from its records.

Per rung and model (best on validation, last): clean accuracy, the mean over the corruption
cells, that mean as a share of the clean accuracy, and the means of the four families (noise,
blur, weather, digital), each mean ± sample std over the seeds; then the paired differences
(same seed) of Generalist-D against the two PGD-AT rungs, and the mean per corruption. Every
number is read from the records' ``eval-corruptions-*/eval.json``; the header says which
corruptions they are (generated ones are not CIFAR-10-C), and records of different sources,
point counts or epochs are refused rather than averaged together.

Usage: python experiments/corruptions_summary.py experiments/records/corruptions-cifar10
"""

from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

from summarize import mean_std, run

RUN_NAME = re.compile(r"^r(?P<rung>\d)-s(?P<seed>\d+)-\d{8}-\d{6}$")
RUNGS = {
    2: "PGD-AT",
    3: "PGD-AT, Generalist's schedule",
    5: "Generalist-D",
}
MODELS = ("best", "last")
FAMILIES = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
PAIRS = ((5, 2), (5, 3))


def _epochs(run_dir: Path) -> int | None:
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    found = re.search(r"^epochs: (\d+)$", config, flags=re.MULTILINE)
    return int(found.group(1)) if found else None


def _same_weights(run_dir: Path) -> bool:
    sidecars = [run_dir / "model.json", run_dir / "model-best.json"]
    if not all(path.is_file() for path in sidecars):
        return False
    last, best = (json.loads(path.read_text()).get("sha256") for path in sidecars)
    return last is not None and last == best


def load(records: Path) -> list[dict]:
    """One row per evaluated model: rung, seed, model, epochs and its corruption section."""
    rows = []
    for folder in sorted(records.iterdir()):
        match = RUN_NAME.match(folder.name)
        if match is None or int(match["rung"]) not in RUNGS:
            continue
        for which in MODELS:
            path = folder / f"eval-corruptions-{which}" / "eval.json"
            if which == "last" and not path.is_file() and _same_weights(folder):
                path = folder / "eval-corruptions-best" / "eval.json"  # the same weights
            if not path.is_file():
                continue
            section = json.loads(path.read_text())["corruptions"]
            rows.append(
                {
                    "rung": int(match["rung"]),
                    "seed": int(match["seed"]),
                    "model": which,
                    "epochs": _epochs(folder),
                    "section": section,
                }
            )
    return rows


def _protocol(rows: list[dict]) -> str:
    """The one source, point count and epoch count of every row, as a sentence."""
    kinds = {row["section"]["source"]["kind"] for row in rows}
    points = {row["section"]["n_examples"] for row in rows}
    epochs = {row["epochs"] for row in rows}
    left_out = {name for row in rows for name in row["section"]["left_out"]}
    if len(kinds) > 1 or len(points) > 1 or len(epochs) > 1:
        raise SystemExit(
            f"the records mix sources {sorted(kinds)}, point counts {sorted(points)} or epochs "
            f"{sorted(epochs, key=str)}; put each protocol in its own RECORDS folder"
        )
    kind, n, e = kinds.pop(), points.pop(), epochs.pop()
    what = (
        "generated at run time by `generalist eval --corruptions generated` with CIFAR-10-C's "
        "severity constants; **not CIFAR-10-C**"
        if kind == "generated"
        else f"read from a {kind} folder"
    )
    missing = f"; left out: {', '.join(sorted(left_out))}" if left_out else ""
    return f"Corruptions {what}{missing}. {n} test points, models trained for {e} epochs."


def _family(section: dict, names: tuple[str, ...]) -> float | None:
    values = [section["per_corruption"][n]["accuracy"] for n in names if n in section["covered"]]
    return statistics.mean(values) if values else None


def _values(rows: list[dict], value) -> list[float]:
    return [v for row in rows if (v := value(row["section"])) is not None]


def _cell(values: list[float]) -> str:
    """mean ± std, or a dash where no corruption of a family was covered."""
    return mean_std(values) if values else "—"


def main_table(rows: list[dict]) -> str:
    groups: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["rung"], row["model"])].append(row)
    columns = {
        "clean": lambda s: s["clean"]["accuracy"],
        "corruptions mean": lambda s: s["mean"],
        "% of clean": lambda s: s["mean_relative_to_clean"],
        **{name: (lambda s, names=names: _family(s, names)) for name, names in FAMILIES.items()},
    }
    lines = [
        "| rung | method | model | seeds | " + " | ".join(columns) + " |",
        "| --- | --- | --- | ---: |" + " ---: |" * len(columns),
    ]
    for (rung, model), members in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])):
        cells = [_cell(_values(members, value)) for value in columns.values()]
        seeds = ",".join(str(row["seed"]) for row in sorted(members, key=lambda r: r["seed"]))
        lines.append(f"| {rung} | {RUNGS[rung]} | {model} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(rows: list[dict]) -> str:
    """Generalist-D minus each PGD-AT rung, per seed, then mean ± std over the seeds."""
    by_key = {(row["rung"], row["seed"], row["model"]): row["section"] for row in rows}
    lines = [
        "| difference | model | seeds | clean | corruptions mean | % of clean |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for better, base in PAIRS:
        for model in MODELS:
            seeds = sorted(
                seed
                for (rung, seed, m) in by_key
                if rung == better and m == model and (base, seed, model) in by_key
            )
            if not seeds:
                continue

            def diff(value, seeds=seeds, model=model, better=better, base=base) -> str:
                return mean_std(
                    [
                        value(by_key[(better, s, model)]) - value(by_key[(base, s, model)])
                        for s in seeds
                    ]
                )

            lines.append(
                f"| rung {better} − rung {base} | {model} | {len(seeds)} | "
                f"{diff(lambda s: s['clean']['accuracy'])} | {diff(lambda s: s['mean'])} | "
                f"{diff(lambda s: s['mean_relative_to_clean'] or 0.0)} |"
            )
    return "\n".join(lines)


def per_corruption_table(rows: list[dict], model: str = "best") -> str:
    chosen = [row for row in rows if row["model"] == model]
    names = list(dict.fromkeys(n for row in chosen for n in row["section"]["covered"]))
    rungs = sorted({row["rung"] for row in chosen})
    lines = [
        "| corruption | " + " | ".join(f"rung {r} ({RUNGS[r]})" for r in rungs) + " |",
        "| --- |" + " ---: |" * len(rungs),
    ]
    for name in names:
        cells = [
            mean_std(
                [
                    row["section"]["per_corruption"][name]["accuracy"]
                    for row in chosen
                    if row["rung"] == rung
                ]
            )
            for rung in rungs
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build(records: Path) -> str:
    rows = load(records)
    if not rows:
        raise SystemExit(f"{records} holds no corruption evaluations yet; run the experiment first")
    parts = [
        "## Common corruptions: PGD-AT, PGD-AT with Generalist's schedule, Generalist-D",
        _protocol(rows),
        "Accuracy (%), mean ± sample std over the seeds; `corruptions mean` is the plain mean over "
        "the corruption × severity cells, `% of clean` that mean as a share of the clean accuracy "
        "on the same points, the families the means of their corruptions.",
        main_table(rows),
        "Paired by seed (same data order and initialisation), Generalist-D minus the PGD-AT rung "
        "(percentage points):",
        paired_table(rows),
        "Mean accuracy per corruption over the five severities (best models):",
        per_corruption_table(rows),
    ]
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    run(build, __doc__.split("\n\n")[0], "experiments/corruptions.sh's RECORDS folder")
