"""Build RESULTS.md's tables from the run directories that experiments/run_all.sh wrote.

Why a script and not only `generalist compare`: compare prints one row per run; RESULTS.md
needs the runs of one method grouped over seeds (mean ± sample std) and the Generalist-D
redistribution ablation laid out by policy and c. Every number printed here is read from a run's
files (`summary.json`, `config.yaml`, `eval-aa/eval.json`); nothing is typed in by hand.

Usage: python experiments/summarize.py experiments/runs/mnist [--out tables.md]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import yaml

RUN_NAME = re.compile(r"^(?P<group>.+)-s(?P<seed>\d+)-\d{8}-\d{6}$")
ABLATION_GROUP = re.compile(r"^gd-(?P<policy>[a-z_]+)-c(?P<c>\d+)$")
EVAL_DIR = "eval-aa"


@dataclass(frozen=True)
class RunResult:
    group: str
    seed: int
    path: Path
    clean: float
    linf: float
    l2: float | None
    """None when the evaluation had no ℓ2 threat (e.g. experiments/iat_rst.sh's ℓ∞-only runs)."""
    union: float | None
    n_examples: int
    pgd_test: dict[str, float]
    pgd_examples: int
    train_seconds: float
    eval_seconds: float
    policy: str
    every: str
    """c as the config wrote it: epochs (``unit: epoch``) or a fraction of the run."""
    threats: dict[str, str]
    """The evaluated threat model of each norm, e.g. ``{"Linf": "Linf:0.3"}``, for the headers."""


def load(run: Path) -> RunResult | None:
    """``None`` for a folder that is not a finished, AutoAttack-evaluated run."""
    match = RUN_NAME.match(run.name)
    record_path = run / EVAL_DIR / "eval.json"
    if match is None or not (run / "summary.json").is_file() or not record_path.is_file():
        return None
    summary = json.loads((run / "summary.json").read_text())
    record = json.loads(record_path.read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    worst = {t["norm"]: t["worst_case"]["accuracy"] for t in record["threats"]}
    redistribute = config["merge"]["redistribute"]
    return RunResult(
        group=match["group"],
        seed=int(match["seed"]),
        path=run,
        clean=record["clean"]["accuracy"],
        linf=worst["Linf"],
        l2=worst.get("L2"),
        union=record["union"]["accuracy"] if len(worst) > 1 else None,
        n_examples=record["data"]["n_examples"],
        pgd_test=summary["test"],
        pgd_examples=summary["test_examples"],
        train_seconds=summary["seconds"],
        eval_seconds=sum(record["timings"]["attack_seconds"].values()),
        policy=redistribute["policy"],
        every=str(redistribute["every"]),
        threats={t["norm"]: t["threat"] for t in record["threats"]},
    )


def mean_std(values: Sequence[float]) -> str:
    """'m ± s' with the sample std; a single seed shows its value alone (no spread to report)."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _pgd(result: RunResult, norm: str) -> float | None:
    return next((v for k, v in result.pgd_test.items() if k.startswith(norm + ":")), None)


def _threat_headers(result: RunResult) -> str:
    return f"AA {result.threats['Linf']} | AA {result.threats.get('L2', 'L2')}"


def _cell(values: Sequence[float | None]) -> str:
    present = [v for v in values if v is not None]
    return mean_std(present) if len(present) == len(values) else "—"


def main_table(groups: dict[str, list[RunResult]], order: Sequence[str]) -> str:
    first = next(iter(groups.values()))[0]
    lines = [
        f"| method | seeds | clean | {_threat_headers(first)} | AA union | "
        f"clean ({first.pgd_examples}) | PGD-20 ℓ∞ ({first.pgd_examples}) | "
        f"PGD-20 ℓ2 ({first.pgd_examples}) | train s | AA s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for group in order:
        runs = groups[group]
        seeds = ",".join(str(r.seed) for r in runs)
        lines.append(
            f"| {group} | {seeds} | {mean_std([r.clean for r in runs])} "
            f"| {mean_std([r.linf for r in runs])} | {_cell([r.l2 for r in runs])} "
            f"| {_cell([r.union for r in runs])} "
            f"| {mean_std([r.pgd_test['clean'] for r in runs])} "
            f"| {_cell([_pgd(r, 'Linf') for r in runs])} | {_cell([_pgd(r, 'L2') for r in runs])} "
            f"| {statistics.mean(r.train_seconds for r in runs):.0f} "
            f"| {statistics.mean(r.eval_seconds for r in runs):.0f} |"
        )
    return "\n".join(lines)


def ablation_table(results: Sequence[RunResult]) -> str:
    lines = [
        f"| redistribution policy | c | run | clean | {_threat_headers(results[0])} | AA union "
        "| PGD-20 ℓ∞ | train s |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(results, key=lambda r: (r.policy, float(Fraction(r.every)))):
        lines.append(
            f"| {r.policy} | {r.every} | {r.path.name} | {r.clean:.1f} | {r.linf:.1f} "
            f"| {r.l2:.1f} | {r.union:.1f} | {_pgd(r, 'Linf'):.1f} | {r.train_seconds:.0f} |"
        )
    return "\n".join(lines)


def per_run_table(results: Sequence[RunResult]) -> str:
    lines = [
        f"| run | clean | {_threat_headers(results[0])} | AA union | train s | AA s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(results, key=lambda r: r.path.name):
        lines.append(
            f"| {r.path.name} | {r.clean:.1f} | {r.linf:.1f} | {_cell([r.l2])} "
            f"| {_cell([r.union])} | {r.train_seconds:.0f} | {r.eval_seconds:.0f} |"
        )
    return "\n".join(lines)


def build(runs_dir: Path) -> str:
    results = [r for p in sorted(runs_dir.iterdir()) if p.is_dir() and (r := load(p))]
    if not results:
        raise SystemExit(f"no finished, AutoAttack-evaluated runs in {runs_dir}")
    groups: dict[str, list[RunResult]] = defaultdict(list)
    for r in results:
        groups[r.group].append(r)
    methods = [g for g in groups if not ABLATION_GROUP.match(g)]
    ablation = [r for g in groups if ABLATION_GROUP.match(g) for r in groups[g]]
    n = sorted({r.n_examples for r in results})
    parts = [
        f"AutoAttack (standard) on the first {', '.join(map(str, n))} test points; accuracy in %.",
        "",
        main_table(groups, sorted(methods)),
    ]
    if len(ablation) > 1:
        parts += [
            "",
            "Generalist-D redistribution ablation (seed 0):",
            "",
            ablation_table(ablation),
        ]
    parts += ["", "Every run:", "", per_run_table(results)]
    return "\n".join(parts) + "\n"


def run(build_text: Callable[[Path], str], description: str, runs_help: str) -> None:
    """The command line of a table script: RUNS_DIR [--out FILE], the table on stdout."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("runs_dir", type=Path, help=runs_help)
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args()
    text = build_text(args.runs_dir)
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    run(build, __doc__.split("\n\n")[0], "folder holding the run directories")
