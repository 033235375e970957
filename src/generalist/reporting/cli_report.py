"""``generalist report`` (figures + report.md) and ``generalist compare`` (one results table)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from generalist.errors import ConfigError

RUN_DIRS_HELP = "run directories from `generalist train`, or folders holding them"


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "report",
        help="figures (training curves, trade-off, per-norm bars) and report.md for runs",
        description="Write PNG figures and a report.md embedding them, plus the results table "
        "and any `generalist eval` tables, for one or several runs.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help=RUN_DIRS_HELP)
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="folder to write into (default: RUN_DIR/report for one run, else a 'report' "
        "folder next to the runs)",
    )
    parser.set_defaults(func=cmd_report)
    return parser


def add_compare_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compare",
        help="one table of the final results of several runs",
        description="Print clean, per-attack, worst-case and union accuracy and training time "
        "of several runs, one row each.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help=RUN_DIRS_HELP)
    parser.add_argument(
        "--markdown", action="store_true", help="print a markdown table instead of plain text"
    )
    parser.add_argument("--out", metavar="FILE", help="also write the markdown table to FILE")
    parser.set_defaults(func=cmd_compare)
    return parser


def cmd_report(args: argparse.Namespace) -> int:
    from generalist.reporting.report import write_report

    runs = _load(args.runs)
    out = Path(args.out) if args.out else default_report_dir([run.path for run in runs])
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the report")
    report = write_report(runs, out)
    count = len(report.figures)
    print(f"wrote {count} figure{'' if count == 1 else 's'} and {report.path.name} to {out}")
    print(f"report: {report.path}")
    return 0


def default_report_dir(run_paths: Sequence[Path]) -> Path:
    if len(run_paths) == 1:
        return run_paths[0] / "report"
    parents = {path.parent for path in run_paths}
    if len(parents) > 1:
        raise ConfigError("these runs live in different folders; say where to write: --out DIR")
    return parents.pop() / "report"


def cmd_compare(args: argparse.Namespace) -> int:
    from generalist.durable import write_text_durably
    from generalist.reporting.compare import comparison_table, render_markdown, render_text
    from generalist.reporting.runs import run_labels

    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name, e.g. {out / 'results.md'}")
    runs = _load(args.runs)
    table = comparison_table(runs, run_labels(runs))
    print(render_markdown(table) if args.markdown else render_text(table), end="")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_durably(out, render_markdown(table))
        print(f"wrote {out}")
    return 0


def _load(paths: Sequence[str]) -> list[Any]:
    """The readable runs; each damaged one and each skipped file is one warning line."""
    from generalist.reporting.runs import load_runs

    skipped: list[str] = []
    runs = load_runs(paths, skipped)
    for line in skipped:
        print(f"warning: {line}", file=sys.stderr)
    for run in runs:
        for warning in run.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    return runs
