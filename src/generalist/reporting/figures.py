"""The report's figures, drawn headless: training curves, the trade-off scatter, per-norm bars.

Figures are built on matplotlib's object API with the Agg canvas attached explicitly, never
through pyplot, so drawing needs no display, keeps no global figure registry to leak, and does
not depend on the MPLBACKEND of whoever runs the report.
"""

from __future__ import annotations

import functools
import io
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from generalist.durable import write_durably
from generalist.reporting.runs import (
    CLEAN,
    GLOBAL,
    FinalResults,
    Run,
    ThreatKey,
    threat_names,
)

DPI = 120
PANEL_INCHES = 4.0
"""Width of one accuracy panel; a figure is never narrower than 8 inches."""
REDISTRIBUTION_SHADE = "0.88"
GLOBAL_COLOR = "black"
CLEAN_COLOR = "0.65"
UNION_COLOR = "0.25"
MIN_SPAN = 10.0
"""Percentage points a trade-off axis spans at least."""
ACCURACY_PAD = 3.0
"""Room beyond 0 % and 100 % on a trade-off axis, so markers there are not cut in half."""
MARKERS = {"AutoAttack": "o", "eval": "s", "summary": "^"}


def save(figure: Figure, path: Path) -> Path:
    """Render to memory, then write like every other file: atomically, never through a link."""
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=DPI, format="png")
    write_durably(path, buffer.getvalue())
    return path


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(max(8.0, width), height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _title(figure: Figure, text: str) -> None:
    """Left-aligned, so a long title never runs under the legend at the top right."""
    figure.suptitle(text, x=0.01, ha="left")


def _colors(names: Sequence[str]) -> dict[str, tuple]:
    palette = colormaps["tab10"]
    return {name: palette(i % palette.N) for i, name in enumerate(names)}


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


# --------------------------------------------------------------------------- training curves


def training_curves(run: Run, label: str) -> Figure:
    """Validation accuracy per epoch (one panel for clean, one per threat) of the global model
    and every validated base learner, epochs with a redistribution shaded, and each learner's
    γ underneath, drawn as the constant it held during each epoch."""
    validated = [record for record in run.metrics if "val" in record]
    models = _unique([GLOBAL] + [m for r in validated for m in r["val"]])
    learners = _unique([n for r in run.metrics for n in r.get("gamma", {})] + models[1:])
    colors = {GLOBAL: GLOBAL_COLOR, **_colors(learners)}
    metric_names = (
        _unique([CLEAN] + [k for r in validated for m in r["val"].values() for k in m])
        if validated
        else []
    )
    panels = max(1, len(metric_names))

    figure = _figure(PANEL_INCHES * panels + 2.5, 6.5)
    grid = figure.add_gridspec(2, panels, height_ratios=(3, 1.4))
    gamma_axes = figure.add_subplot(grid[1, :])
    accuracy_axes = [figure.add_subplot(grid[0, i], sharex=gamma_axes) for i in range(panels)]
    _draw_accuracies(accuracy_axes, run, validated, models, metric_names, colors)

    _draw_gammas(gamma_axes, run, learners, colors)
    redistributed = [r["epoch"] for r in run.metrics if r.get("redistributed")]
    for axes in [*accuracy_axes, gamma_axes]:
        for epoch in redistributed:
            axes.axvspan(epoch - 1, epoch, color=REDISTRIBUTION_SHADE, zorder=0, linewidth=0)
    gamma_axes.set_xlim(0, max(run.epochs, run.metrics[-1]["epoch"]))
    gamma_axes.xaxis.set_major_locator(MaxNLocator(integer=True))

    figure.legend(
        handles=_curve_legend(run, models, learners, colors, bool(redistributed)),
        loc="outside right upper",
        fontsize=8,
    )
    method = label if label == run.preset else f"{label}: {run.preset or run.name}"
    status = "" if run.finished else f" (unfinished: epoch {run.metrics[-1]['epoch']}/{run.epochs})"
    _title(figure, f"{method} on {run.dataset or '?'}, validation split{status}")
    return figure


def _draw_accuracies(
    panels: list[Axes],
    run: Run,
    validated: list[dict],
    models: list[str],
    metric_names: list[str],
    colors: dict[str, tuple],
) -> None:
    """One panel per metric (clean, then each threat): every model's validation accuracy per
    epoch, the global model drawn thicker and on top."""
    for axes, metric in zip(panels, metric_names, strict=False):
        for model in models:
            points = [
                (r["epoch"], r["val"][model][metric])
                for r in validated
                if metric in r["val"].get(model, {})
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                is_global = model == GLOBAL
                axes.plot(
                    xs,
                    ys,
                    marker="o",
                    markersize=3,
                    color=colors[model],
                    linewidth=2.2 if is_global else 1.2,
                    zorder=3 if is_global else 2,
                )
        attack = f" (PGD-{run.val_steps})" if run.val_steps is not None else ""
        axes.set_title(CLEAN if metric == CLEAN else f"{metric} robust{attack}")
        axes.set_ylim(bottom=0)  # from zero, so a one-point wiggle does not look like a trend
        axes.grid(alpha=0.3)
    panels[0].set_ylabel("validation accuracy (%)")
    if not validated:
        panels[0].text(0.5, 0.5, "no validation yet", ha="center", transform=panels[0].transAxes)


def _draw_gammas(axes: Axes, run: Run, learners: list[str], colors: dict[str, tuple]) -> None:
    records = [r for r in run.metrics if "gamma" in r]
    for name in learners:
        points = [(r["epoch"], r["gamma"][name]) for r in records if name in r["gamma"]]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        # γ(e) holds during epoch e, i.e. on (e-1, e]: a step drawn back from each epoch's end.
        axes.plot([xs[0] - 1, *xs], [ys[0], *ys], drawstyle="steps-pre", color=colors[name])
    axes.set_ylim(-0.05, 1.05)
    axes.set_ylabel("γ (mix weight)")
    axes.set_xlabel("epoch")
    axes.grid(alpha=0.3)


def _curve_legend(
    run: Run, models: list[str], learners: list[str], colors: dict[str, tuple], shaded: bool
) -> list:
    handles = [Line2D([], [], color=GLOBAL_COLOR, linewidth=2.2, label="global model")]
    handles += [Line2D([], [], color=colors[name], label=name) for name in learners]
    if len(models) == 1 and learners:
        note = "base learners: γ only, not validated"
        if not run.validates_learners:
            note += "\n(eval.learners: false)"
        handles.append(Line2D([], [], linestyle="none", label=note))
    if shaded:
        handles.append(
            Patch(color=REDISTRIBUTION_SHADE, label="redistribution\n(global → learners)")
        )
    return handles


# --------------------------------------------------------------------------- final results


def _worst_case(result: FinalResults, key: ThreatKey) -> float | None:
    threat = result.threat(key)
    return None if threat is None else threat.worst_case


def _marker(result: FinalResults) -> str:
    return MARKERS["AutoAttack" if result.is_autoattack else result.source]


@dataclass
class _Group:
    """Runs that differ only in their seed (and where they ran), drawn as mean ± std."""

    label: str
    names: list[str]
    results: list[FinalResults]


def _seed_groups(runs: Sequence[Run], labels: Sequence[str]) -> list[_Group]:
    groups: dict[str, _Group] = {}
    for run, label in zip(runs, labels, strict=True):
        result = run.final_results()
        if result is None:
            continue
        # Runs of one recipe differing only in seed; users often name them by seed (pgd-at-s1).
        ignored = ("seed", "out_dir", "device", "name")
        settings = {k: v for k, v in run.config.items() if k not in ignored}
        key = json.dumps([settings, result.source, result.robust_by], sort_keys=True, default=str)
        if not run.config:  # an unreadable config says nothing about what the run shares
            key = str(run.path)
        group = groups.setdefault(key, _Group(label, [], []))
        group.names.append(run.config.get("preset") or run.name)
        group.results.append(result)
    several = [g for g in groups.values() if len(g.results) > 1]
    for group in several:
        # The shared run name reads better than the first run's folder, unless two groups share it.
        name = group.names[0]
        if sum(g.names[0] == name for g in several) == 1:
            group.label = name
        group.label += f" (mean ± std, {len(group.results)} seeds)"
    return list(groups.values())


def tradeoff(runs: Sequence[Run], labels: Sequence[str]) -> Figure | None:
    """Clean against robust test accuracy, one panel per threat model, one point per run (or
    mean ± std over seeds). ``None`` when no run has final results yet."""
    groups = _seed_groups(runs, labels)
    threats = threat_names([r for g in groups for r in g.results])
    if not threats:
        return None
    figure = _figure(5.0 * len(threats) + 2.5, 5.0)
    colors = _colors([g.label for g in groups])
    for index, (key, name) in enumerate(threats.items()):
        axes = figure.add_subplot(1, len(threats), index + 1)
        placed: list[tuple[float, float]] = []
        for group in groups:
            pairs = [(r.clean, _worst_case(r, key)) for r in group.results]
            pairs = [(x, y) for x, y in pairs if y is not None]
            if pairs:
                placed.append(_draw_group(axes, group, pairs, colors[group.label], placed))
        axes.set_title(name)
        axes.set_xlabel("clean test accuracy (%)")
        axes.set_ylabel(f"robust test accuracy (%), {name}")
        axes.margins(0.2)
        _frame(axes)
        axes.grid(alpha=0.3)
    figure.legend(handles=_source_legend(groups), loc="outside right upper", fontsize=8)
    _title(figure, "Natural vs robust accuracy (up and to the right is better)")
    return figure


def _frame(axes: Axes) -> None:
    """At least ``MIN_SPAN`` percentage points per axis, so one point is not a false close-up,
    and no room beyond what accuracies can be (margins would otherwise show -10 %)."""
    for get, set_limits in ((axes.get_xlim, axes.set_xlim), (axes.get_ylim, axes.set_ylim)):
        low, high = get()
        if high - low < MIN_SPAN:
            middle = (low + high) / 2
            low, high = middle - MIN_SPAN / 2, middle + MIN_SPAN / 2
        set_limits(max(low, -ACCURACY_PAD), min(high, 100 + ACCURACY_PAD))


def _draw_group(
    axes: Axes, group: _Group, pairs: list, color: tuple, placed: list[tuple[float, float]]
) -> tuple[float, float]:
    """Draw one group; returns where its label went. Labels of points that (nearly) coincide
    with earlier ones are stacked downwards instead of printed over each other."""
    xs, ys = zip(*pairs, strict=True)
    marker = _marker(group.results[0])
    if len(pairs) == 1:
        axes.scatter(xs, ys, marker=marker, s=50, color=color, zorder=3)
        x, y = xs[0], ys[0]
    else:
        axes.scatter(xs, ys, marker=marker, s=14, color=color, alpha=0.35, zorder=2)
        x, y = statistics.fmean(xs), statistics.fmean(ys)
        axes.errorbar(
            x,
            y,
            xerr=statistics.stdev(xs),
            yerr=statistics.stdev(ys),
            fmt=marker,
            markersize=7,
            color=color,
            capsize=3,
            zorder=3,
        )
    crowd = sum(abs(x - px) < 1.0 and abs(y - py) < 1.0 for px, py in placed)
    axes.annotate(
        group.label,
        (x, y),
        xytext=(6, 6 - 11 * crowd),
        textcoords="offset points",
        fontsize=8,
        color=color,
    )
    return x, y


def _source_legend(groups: Sequence[_Group]) -> list:
    kinds = {
        "AutoAttack": "AutoAttack worst case\n(generalist eval)",
        "eval": "worst case of the evaluated\nattacks (generalist eval)",
        "summary": "PGD of the training\nsummary (no eval yet)",
    }
    present = _unique(
        ["AutoAttack" if r.is_autoattack else r.source for g in groups for r in g.results]
    )
    return [
        Line2D([], [], marker=MARKERS[k], linestyle="none", color="0.3", label=kinds[k])
        for k in present
    ]


def norm_bars(runs: Sequence[Run], labels: Sequence[str]) -> Figure | None:
    """Clean, per-norm worst-case and union test accuracy of every multi-norm run; ``None``
    when no run has two or more threat models."""
    chosen = [
        (label, result)
        for run, label in zip(runs, labels, strict=True)
        if (result := run.final_results()) is not None and len(result.threats) > 1
    ]
    if not chosen:
        return None
    threats = threat_names([result for _, result in chosen])
    threat_colors = _colors(list(threats.values()))
    series: list[tuple[str, str | tuple, Callable[[FinalResults], float | None]]] = [
        (CLEAN, CLEAN_COLOR, lambda result: result.clean)
    ]
    series += [
        (name, threat_colors[name], functools.partial(_worst_case, key=key))
        for key, name in threats.items()
    ]
    series.append(("union", UNION_COLOR, lambda result: result.union))
    width = 0.8 / len(series)
    figure = _figure(1.2 * len(chosen) * len(series) / 2 + 4, 5.0)
    axes = figure.add_subplot()
    for index, (name, color, value_of) in enumerate(series):
        offset = (index - (len(series) - 1) / 2) * width
        shown = [
            (i + offset, value)
            for i, (_, result) in enumerate(chosen)
            if (value := value_of(result)) is not None
        ]
        if shown:
            bars = axes.bar(*zip(*shown, strict=True), width=width, color=color, label=name)
            axes.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    axes.set_xticks(
        range(len(chosen)),
        [f"{label}\n{result.describe()}" for label, result in chosen],
        fontsize=8,
    )
    axes.set_ylabel("test accuracy (%)")
    axes.set_ylim(0, 105)
    axes.grid(axis="y", alpha=0.3)
    handles, _ = axes.get_legend_handles_labels()
    if any(result.union is None for _, result in chosen):
        note = "no union bar: it needs the\nper-point results of\n`generalist eval`"
        handles.append(Line2D([], [], linestyle="none", label=note))
    figure.legend(handles=handles, loc="outside right upper", fontsize=8)
    _title(figure, "Per-norm worst case and union (robust to all norms at once)")
    return figure


# --------------------------------------------------------------------------- corruptions


def corruption_heatmap(runs: Sequence[Run], labels: Sequence[str]) -> Figure | None:
    """Accuracy per corruption × severity, one panel per run with a corruption evaluation;
    ``None`` when no run has one. One colour scale (0-100 %) for every panel."""
    chosen = [
        (label, section)
        for run, label in zip(runs, labels, strict=True)
        if (section := run.corruptions) is not None
    ]
    if not chosen:
        return None
    rows = max(len(section["covered"]) for _, section in chosen)
    figure = _figure(PANEL_INCHES * len(chosen) + 1.5, 0.3 * rows + 2.2)
    panels = figure.subplots(1, len(chosen), squeeze=False)[0]
    image = None
    for axes, (label, section) in zip(panels, chosen, strict=True):
        names = section["covered"]
        severities = sorted({cell["severity"] for cell in section["cells"]})
        grid = [[float("nan")] * len(severities) for _ in names]
        for cell in section["cells"]:
            grid[names.index(cell["corruption"])][severities.index(cell["severity"])] = cell[
                "accuracy"
            ]
        image = axes.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                shade = "black" if value > 60 else "white"
                axes.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7, color=shade)
        axes.set_xticks(range(len(severities)), [str(s) for s in severities])
        axes.set_yticks(range(len(names)), names, fontsize=8)
        axes.set_xlabel("severity")
        kind = section["source"]["kind"]
        axes.set_title(
            f"{label}\n{kind}, mean {section['mean']:.1f} % (clean "
            f"{section['clean']['accuracy']:.1f} %)",
            fontsize=9,
        )
    figure.colorbar(image, ax=list(panels), label="accuracy (%)", shrink=0.8)
    _title(figure, "Common corruptions: accuracy per corruption and severity")
    return figure
