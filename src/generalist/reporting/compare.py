"""One table of the final results of several runs, for the terminal and as markdown.

A run's numbers come from its newest evaluation of the test split if it has one, else from its
training summary. The two never share a column: summary numbers sit in their own
``<threat> PGD-k (summary)`` columns, so nobody compares an AutoAttack number with a PGD one
without seeing it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from generalist.reporting.runs import FinalResults, Run, threat_key

MISSING = "—"
WORST = "worst case"


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    numeric: list[bool]
    """Right-aligned columns."""
    notes: list[str] = field(default_factory=list)
    """Lines printed under the table (what the rows do not share)."""


SETUP = ("dataset", "model", "epochs")
"""What a row's numbers depend on beyond the method: runs that differ in one do not compare."""
UNSHARED = " *"


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _result_cells(result: FinalResults) -> dict[tuple, float]:
    """Accuracy per column key ``(threat key, threat text, column name)``."""
    cells: dict[tuple, float] = {}
    for threat in result.threats:
        key = threat_key(threat.threat)
        if result.source == "summary":
            for attack, value in threat.attacks.items():
                cells[(key, threat.threat, f"{attack} (summary)")] = value
            continue
        if len(threat.attacks) > 1:  # with one attack the worst case is that attack
            for attack, value in threat.attacks.items():
                cells[(key, threat.threat, attack)] = value
        cells[(key, threat.threat, WORST)] = threat.worst_case
    return cells


def _setup_cells(runs: Sequence[Run]) -> tuple[list[list[str]], list[str]]:
    """Each run's dataset, model and epochs, a cell marked :data:`UNSHARED` where it differs
    from most runs' value (the first run's on a tie), and the note naming what differs."""
    values = [[run.dataset or MISSING, _model_name(run), str(run.epochs)] for run in runs]
    differing = []
    for column, name in enumerate(SETUP):
        seen = [row[column] for row in values]
        if len(set(seen)) == 1:
            continue
        common = Counter(seen).most_common(1)[0][0]
        differing.append(f"{name} ({', '.join(dict.fromkeys(seen))})")
        for row in values:
            if row[column] != common:
                row[column] += UNSHARED
    notes = []
    if differing:
        notes.append(
            f"{UNSHARED.strip()} these runs differ in {'; '.join(differing)}: the marked rows do "
            "not compare like with like with the others"
        )
    return values, notes


def _model_name(run: Run) -> str:
    return str((run.config.get("model") or {}).get("name") or MISSING)


def _corruption_columns(runs: Sequence[Run]) -> list[str]:
    """One column per kind of corruption source seen (generated numbers are not CIFAR-C's)."""
    kinds = [run.corruptions["source"]["kind"] for run in runs if run.corruptions]
    return list(dict.fromkeys(kinds))


def comparison_table(runs: Sequence[Run], labels: Sequence[str]) -> Table:
    """One row per run: clean, each threat's attacks and worst case, union, the mean accuracy
    over the corruption cells (when evaluated), the setup (dataset, model, epochs; marked where
    the runs differ) and training time."""
    results = [run.final_results() for run in runs]
    per_run = [{} if r is None else _result_cells(r) for r in results]
    columns: dict[tuple, str] = {}  # (threat key, name) -> header, first-seen order
    for cells in per_run:
        for key, text, name in cells:
            columns.setdefault((key, name), f"{text} {name}")
    kinds = _corruption_columns(runs)
    rows = []
    setups, notes = _setup_cells(runs)
    for run, label, result, cells, setup in zip(
        runs, labels, results, per_run, setups, strict=True
    ):
        by_column = {(key, name): value for (key, _, name), value in cells.items()}
        numbers = [by_column.get(column) for column in columns]
        if result is None:
            source = f"unfinished: epoch {run.metrics[-1]['epoch']}/{run.epochs}"
            clean = union = None
        else:
            source, clean, union = result.describe(), result.clean, result.union
        seconds = (run.summary or {}).get("seconds")
        corruptions = run.corruptions
        means = [
            corruptions["mean"] if corruptions and corruptions["source"]["kind"] == kind else None
            for kind in kinds
        ]
        rows.append(
            [
                label,
                run.preset or MISSING,
                *(MISSING if v is None else f"{v:.2f}" for v in [clean, *numbers, union, *means]),
                *setup,
                MISSING if seconds is None else format_seconds(seconds),
                source,
            ]
        )
    headers = [
        "run",
        "preset",
        "clean",
        *columns.values(),
        "union",
        *(f"corruptions ({kind})" for kind in kinds),
        *SETUP,
        "train time",
        "results from",
    ]
    numeric = [False, False] + [True] * (len(columns) + len(kinds) + 2)
    numeric += [False, False, False, True, False]
    return Table(headers, rows, numeric, notes)


def render_text(table: Table) -> str:
    """Aligned columns for the terminal."""
    widths = [
        max(len(cell) for cell in [header, *(row[i] for row in table.rows)])
        for i, header in enumerate(table.columns)
    ]

    def line(cells: list[str]) -> str:
        parts = [
            cell.rjust(width) if numeric else cell.ljust(width)
            for cell, width, numeric in zip(cells, widths, table.numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    lines = [line(table.columns), rule, *(line(row) for row in table.rows), *table.notes]
    return "\n".join(lines) + "\n"


def render_markdown(table: Table) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    align = ["---:" if numeric else "---" for numeric in table.numeric]
    lines = [line(table.columns), line(align), *(line(row) for row in table.rows)]
    notes = ["", *table.notes] if table.notes else []
    return "\n".join(lines + notes) + "\n"
