"""The ladder's table from the run directories that experiments/ladder.sh wrote.

One row per rung and model (best on validation, last): clean, AutoAttack ℓ∞ and ℓ2 worst case
and union accuracy, mean ± sample std over the seeds, plus the epoch the best model came from
and the training time. Every number is read from a run's files (``summary.json``,
``eval-aa-best/eval.json``, ``eval-aa-last/eval.json``); nothing is typed in by hand. It reads
run directories and the weightless records that experiments/ladder.sh commits alike.

Usage: python experiments/ladder_summary.py experiments/records/ladder-cifar10 [--out ladder.md]
"""

from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

from summarize import mean_std, run

RUN_NAME = re.compile(r"^r(?P<rung>\d+)-s(?P<seed>\d+)-\d{8}-\d{6}$")
RUNGS = {
    0: "standard training (reference, no attack)",
    1: "PGD-AT, own schedule, raw learner",
    2: "+ deployed EMA",
    3: "+ Generalist's lr schedule and weight decay",
    4: "Generalist-D, γ_adv ≡ 1",
    5: "Generalist-D as shipped",
    6: "Generalist-D, TRADES robust learner",
    7: "Generalist-D, one copy per redistribution epoch",
    8: "Generalist-D, redistributions ≥ 2 epochs apart",
    9: "Generalist-D, c = 1 epoch from epoch 75",
    10: "Generalist-D, c = 3 epochs from epoch 75",
    11: "Generalist-D, c = 7 epochs from epoch 75",
    12: "Generalist-D, natural learner with Adam",
}
MODELS = ("best", "last")


Finished = tuple[Path, re.Match[str], dict]  # a run's folder, name match and summary.json


def finished_runs(runs_dir: Path) -> list[Finished]:
    """Every finished ladder run in ``runs_dir`` (its ``summary.json`` read once), by name."""
    runs = []
    for folder in sorted(runs_dir.iterdir()):
        match = RUN_NAME.match(folder.name)
        if match is not None and (folder / "summary.json").is_file():
            runs.append((folder, match, json.loads((folder / "summary.json").read_text())))
    return runs


def last_is_best(run: Path) -> bool:
    """Whether the last and the best model are the same weights (the sha256 their sidecars
    record, so a record without weights answers too)."""
    sidecars = [run / "model.json", run / "model-best.json"]
    if not all(path.is_file() for path in sidecars):
        return False
    last, best = (json.loads(path.read_text()).get("sha256") for path in sidecars)
    return last is not None and last == best


def load(finished: Finished) -> list[dict]:
    """One row per AutoAttack-evaluated model of a finished run."""
    run, match, summary = finished
    rows = []
    # ladder.sh evaluates a last model that is byte-identical to the best one only once.
    same = last_is_best(run)
    for model in MODELS:
        path = run / f"eval-aa-{model}" / "eval.json"
        if model == "last" and not path.is_file() and same:
            path = run / "eval-aa-best" / "eval.json"
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        worst = {t["threat"]: t["worst_case"]["accuracy"] for t in record["threats"]}
        rows.append(
            {
                "rung": int(match["rung"]),
                "seed": int(match["seed"]),
                "model": model,
                "clean": record["clean"]["accuracy"],
                "threats": worst,
                "union": record["union"]["accuracy"] if len(worst) > 1 else None,
                "n": record["data"]["n_examples"],
                "best_epoch": (summary.get("best") or {}).get("epoch"),
                "seconds": summary["seconds"],
            }
        )
    return rows


def loop_tests(runs: list[Finished]) -> str:
    """Every finished run's own test (``summary.json``: clean and PGD-20 on the first
    ``eval.test_examples`` test points), evaluated or not: a second, weaker judge beside
    AutoAttack, and for a run trained but not yet attacked the only one."""
    groups: dict[tuple[int, str], list[dict[str, float]]] = defaultdict(list)
    examples = set()
    for _, match, summary in runs:
        examples.add(summary["test_examples"])
        groups[(int(match["rung"]), "last")].append(summary["test"])
        if summary.get("best"):
            groups[(int(match["rung"]), "best")].append(summary["best"]["test"])
    if not groups:
        return ""
    metrics = list(dict.fromkeys(m for tests in groups.values() for t in tests for m in t))
    lines = [
        "The training loop's own test of the same models (`summary.json`: PGD-20 on the first "
        f"{', '.join(map(str, sorted(examples)))} test points):",
        "",
        "| rung | change | model | runs | " + " | ".join(metrics) + " |",
        "| --- | --- | --- | ---: |" + " ---: |" * len(metrics),
    ]
    for (rung, model), tests in sorted(groups.items()):
        cells = [
            mean_std([t[m] for t in tests]) if all(m in t for t in tests) else "—" for m in metrics
        ]
        lines.append(
            f"| {rung} | {RUNGS.get(rung, '?')} | {model} | {len(tests)} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def paired_steps(rows: list[dict], threats: list[str]) -> str:
    """What each change costs or buys: rung k minus rung k−1 on the same seed (same data split and
    seed; the rungs differ only in the change), mean ± std over the seeds both rungs finished,
    Generalist-D against the same schedule without its natural learner (5 − 3), the variants
    7–12 against rung 5, and the Generalist-D rungs 5–8 against PGD-AT as shipped (rung 2):
    the goal."""
    by_key = {(r["rung"], r["seed"], r["model"]): r for r in rows}
    metrics = [("clean", lambda r: r["clean"])] + [
        (f"AA {t}", lambda r, t=t: r["threats"].get(t)) for t in threats
    ]
    header = [
        "Paired differences (same seed), percentage points, mean ± std over the seeds:",
        "",
        "| step | model | seeds | " + " | ".join(f"Δ {name}" for name, _ in metrics) + " |",
        "| --- | --- | ---: |" + " ---: |" * len(metrics),
    ]
    lines = []
    steps = [(k - 1, k) for k in range(2, 7)] + [(3, 5), (5, 7), (5, 8)]
    steps += [(5, k) for k in range(9, 13)] + [(2, 5), (2, 6), (2, 7), (2, 8)]
    for low, high in steps:
        for model in MODELS:
            seeds = sorted(
                s
                for (rung, s, m) in by_key
                if rung == high and m == model and (low, s, m) in by_key
            )
            if not seeds:
                continue
            cells = []
            for _, value in metrics:
                pairs = [
                    (value(by_key[(high, s, model)]), value(by_key[(low, s, model)])) for s in seeds
                ]
                ok = all(a is not None and b is not None for a, b in pairs)
                cells.append(mean_std([a - b for a, b in pairs]) if ok else "—")
            label = f"{high} − {low}" + (" (goal: vs PGD-AT)" if low == 2 and high > 4 else "")
            lines.append(
                f"| {label} | {model} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |"
            )
    return "\n".join(header + lines) + "\n" if lines else ""  # no two rungs share a seed


def refuse_repeats(runs_dir: Path, runs: list[Finished]) -> None:
    """Two finished runs of one rung and seed (a rerun beside the first, or records from two
    sessions) would be averaged as two seeds: stop and name them instead."""
    seen: dict[tuple[str, str], str] = {}
    for folder, match, _ in runs:
        key = (match["rung"], match["seed"])
        if key in seen:
            raise SystemExit(
                f"{runs_dir}: rung {key[0]} seed {key[1]} was run twice ({seen[key]}, "
                f"{folder.name}); remove the one that should not count"
            )
        seen[key] = folder.name


def provenance(runs: list[Finished]) -> str:
    """Where each run trained and whether it was resumed (its ``manifest.json``): runs of one
    table may come from different machines, and a reader should see which."""
    machines: dict[str, list[str]] = defaultdict(list)
    resumed = []
    for folder, match, _ in runs:
        path = folder / "manifest.json"
        if not path.is_file():
            continue
        manifest = json.loads(path.read_text())
        device = manifest.get("device", {})
        name = f"r{match['rung']}-s{match['seed']}"
        machines[f"{device.get('type', '?')} ({device.get('name', '?')})"].append(name)
        if manifest.get("resumes"):
            resumed.append(f"{name} ({len(manifest['resumes'])}×)")
    if not machines:
        return ""
    lines = [f"- trained on {where}: {', '.join(names)}" for where, names in machines.items()]
    lines.append(f"- resumed from a checkpoint: {', '.join(resumed) if resumed else 'none'}")
    return "Where the runs trained (`manifest.json`):\n\n" + "\n".join(lines) + "\n"


def build(runs_dir: Path) -> str:
    runs = finished_runs(runs_dir)
    refuse_repeats(runs_dir, runs)
    rows = [row for finished in runs for row in load(finished)]
    if not rows:
        raise SystemExit(f"no finished, AutoAttack-evaluated ladder runs in {runs_dir}")
    threats = list(dict.fromkeys(t for row in rows for t in row["threats"]))
    groups: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["rung"], row["model"])].append(row)
    header = [
        "rung",
        "change",
        "model",
        "seeds",
        "clean",
        *(f"AA {t}" for t in threats),
        "AA union",
    ]
    lines = [
        f"AutoAttack (standard) on the first {', '.join(map(str, sorted({r['n'] for r in rows})))}"
        " test points; accuracy in %, mean ± sample std over the seeds.",
        "",
        "| " + " | ".join([*header, "best epoch", "train s"]) + " |",
        "| --- | --- | --- | ---: | ---: |" + " ---: |" * (len(threats) + 3),
    ]
    for (rung, model), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        cells = [
            mean_std([r["threats"][t] for r in group])
            if all(t in r["threats"] for r in group)
            else "—"
            for t in threats
        ]
        unions = [r["union"] for r in group]
        epochs = sorted({str(r["best_epoch"]) for r in group}) if model == "best" else ["—"]
        lines.append(
            "| "
            + " | ".join(
                [
                    str(rung),
                    RUNGS.get(rung, "?"),
                    model,
                    ",".join(str(r["seed"]) for r in group),
                    mean_std([r["clean"] for r in group]),
                    *cells,
                    mean_std(unions) if None not in unions else "—",
                    ",".join(epochs),
                    f"{statistics.mean(r['seconds'] for r in group):.0f}",
                ]
            )
            + " |"
        )
    parts = [
        "\n".join(lines) + "\n",
        paired_steps(rows, threats),
        loop_tests(runs),
        provenance(runs),
    ]
    return "\n".join(part for part in parts if part)


if __name__ == "__main__":
    run(build, __doc__.split("\n\n")[0], "the ladder's folder of run directories")
