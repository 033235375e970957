"""``report.md`` and its figures for one or several runs, written into one folder.

The folder is self-contained: figures sit next to ``report.md`` and are linked by relative path,
so it can be zipped, committed or opened on another machine. Everything is derived from the run
directories, so a report can be rewritten at any time (it overwrites its own files).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from generalist import __version__
from generalist.durable import write_text_durably
from generalist.evaluation.tables import render_markdown as render_evaluation
from generalist.reporting import figures
from generalist.reporting.compare import comparison_table, render_markdown
from generalist.reporting.runs import Run, run_labels

REPORT_FILE = "report.md"
TRADEOFF_FILE = "tradeoff.png"
NORMS_FILE = "norms.png"
CORRUPTIONS_FILE = "corruptions.png"


@dataclass
class Report:
    path: Path
    """``report.md``."""
    figures: list[Path]


def write_report(runs: Sequence[Run], out: str | Path) -> Report:
    """``report.md`` and its figures for ``runs``, written into ``out`` (made if need be; the
    report's own files there are overwritten)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = run_labels(runs)
    saved = _SavedFigures(out)
    sections = [
        *_results_sections(runs, labels),
        *_comparison_figures(runs, labels, saved),
        *_training_curves(runs, labels, saved),
        *_evaluation_sections(runs),
    ]
    path = out / REPORT_FILE
    write_text_durably(path, "\n\n".join(s.strip() for s in sections) + "\n")
    return Report(path, saved.written)


@dataclass
class _SavedFigures:
    """Saves each figure next to ``report.md`` and remembers what it wrote."""

    out: Path
    written: list[Path] = field(default_factory=list)

    def section(self, title: str, figure: Figure, name: str, caption: str) -> str:
        """The figure saved as ``name``, and its section: the title, the link, the caption."""
        self.written.append(figures.save(figure, self.out / name))
        return f"{title}\n\n![{title.lstrip('# ')}]({name})\n\n{caption}"


def _results_sections(runs: Sequence[Run], labels: list[str]) -> list[str]:
    """The title, what wrote the report, and the table of final results."""
    return [
        "# Robustness report",
        f"{len(runs)} run(s); written by generalist {__version__} on "
        f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}.",
        "## Final results (test set)\n\n" + render_markdown(comparison_table(runs, labels)),
        "Each run's numbers come from its newest `generalist eval` of the test split, else from "
        "the PGD check at the end of training (`summary.json`); the last column says which. "
        "Union accuracy counts the points robust to every threat model at once, which only an "
        "evaluation's per-point results can tell.",
    ]


def _comparison_figures(runs: Sequence[Run], labels: list[str], saved: _SavedFigures) -> list[str]:
    """The figures across runs, each left out when no run has what it draws."""
    sections = []
    tradeoff = figures.tradeoff(runs, labels)
    if tradeoff is not None:
        sections.append(
            saved.section(
                "## Natural vs robust trade-off",
                tradeoff,
                TRADEOFF_FILE,
                "Clean against robust test accuracy, one panel per threat model. The marker "
                "says where the robust number comes from (AutoAttack, other evaluated attacks, "
                "or the training summary's PGD); runs differing only in their seed are shown "
                "as mean ± standard deviation.",
            )
        )
    norms = figures.norm_bars(runs, labels)
    if norms is not None:
        sections.append(
            saved.section(
                "## Per-norm and union accuracy",
                norms,
                NORMS_FILE,
                "Clean, worst-case accuracy under each threat model, and union accuracy of the "
                "runs evaluated under more than one threat model.",
            )
        )
    heatmap = figures.corruption_heatmap(runs, labels)
    if heatmap is not None:
        sections.append(
            saved.section(
                "## Common corruptions",
                heatmap,
                CORRUPTIONS_FILE,
                "Test accuracy on each corruption at each severity, from each run's newest "
                "`generalist eval --corruptions`. Panels marked `generated` were corrupted at "
                "run time by this package (not CIFAR-10-C, whose published images differ); "
                "`cifar-c` panels read the published files.",
            )
        )
    return sections


def _training_curves(runs: Sequence[Run], labels: list[str], saved: _SavedFigures) -> list[str]:
    """One figure of training curves per run, under one heading."""
    sections = ["## Training curves"]
    names: set[str] = set()
    for run, label in zip(runs, labels, strict=True):
        sections.append(
            saved.section(
                f"### {label}",
                figures.training_curves(run, label),
                _unique_name(f"curves-{_slug(label)}", names),
                f"Validation accuracy per epoch of `{run.path}`; shaded epochs redistributed "
                "the global model into the base learners; below, each learner's mixing weight "
                "γ.",
            )
        )
    return sections


def _evaluation_sections(runs: Sequence[Run]) -> list[str]:
    """Every run's evaluations in full, then every warning met while reading the runs."""
    sections = []
    evaluations = [evaluation for run in runs for evaluation in run.evaluations]
    if evaluations:
        sections.append("## Evaluations")
        sections += [_demoted(render_evaluation(e.record)) for e in evaluations]
    warnings = [warning for run in runs for warning in run.warnings]
    if warnings:
        sections.append("## Warnings\n\n" + "\n".join(f"- {w}" for w in warnings))
    return sections


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "run"


def _unique_name(stem: str, taken: set[str]) -> str:
    name, n = f"{stem}.png", 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}.png"
    taken.add(name)
    return name


def _demoted(markdown: str) -> str:
    """An evaluation's tables one heading level down, to nest under the report's sections."""
    return re.sub(r"^#", "##", markdown, flags=re.MULTILINE)
