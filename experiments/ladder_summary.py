"""The ladder's table from the run directories that experiments/ladder.sh wrote.

One row per rung and model (best on validation, last): clean, AutoAttack ℓ∞ and ℓ2 worst case
and union accuracy, mean ± sample std over the seeds, plus the epoch the best model came from
and the training time. Every number is read from a run's files (``summary.json``,
``eval-aa-best/eval.json``, ``eval-aa-last/eval.json``); nothing is typed in by hand.

Usage: python experiments/ladder_summary.py experiments/runs/ladder-cifar10 [--out ladder.md]
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
    1: "PGD-AT, own schedule, raw learner",
    2: "+ deployed EMA",
    3: "+ Generalist's lr schedule and weight decay",
    4: "Generalist-D, γ_adv ≡ 1",
    5: "Generalist-D as shipped",
    6: "Generalist-D, TRADES robust learner",
}
MODELS = ("best", "last")


def load(run: Path) -> list[dict] | None:
    """One row per evaluated model of a finished run; None for anything else."""
    match = RUN_NAME.match(run.name)
    if match is None or not (run / "summary.json").is_file():
        return None
    summary = json.loads((run / "summary.json").read_text())
    rows = []
    for model in MODELS:
        path = run / f"eval-aa-{model}" / "eval.json"
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


def build(runs_dir: Path) -> str:
    rows = [row for p in sorted(runs_dir.iterdir()) if p.is_dir() for row in load(p) or []]
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
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run(build, __doc__.split("\n\n")[0], "the ladder's folder of run directories")
