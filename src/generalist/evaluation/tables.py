"""Markdown tables of an evaluation record: one per threat model, then a summary with the union.

Tables are rendered from the record (``eval.json``), not from live results, so ``results.md``
can always be regenerated from the JSON and the two can never disagree.
"""

from __future__ import annotations

from typing import Any


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(names: list[str], align: list[str]) -> list[str]:
    return [_row(names), _row(align)]


def _acc(score: dict[str, Any], n: int) -> list[str]:
    return [f"{score['accuracy']:.2f}", f"{score['count']} / {n}"]


def _passes(cost: dict[str, Any] | None) -> list[str]:
    """Forward and backward passes per point: the cost two evaluations compare at (blank in
    records written before passes were counted)."""
    if cost is None:
        return ["", ""]
    return [f"{cost['forward_per_point']:.1f}", f"{cost['backward_per_point']:.1f}"]


def threat_table(record: dict[str, Any], entry: dict[str, Any]) -> str:
    """Clean, every attack (AutoAttack: after each of its stages, cumulatively), worst case."""
    n = record["data"]["n_examples"]
    lines = [
        f"### {entry['threat']} (ε = {entry['eps']:.6g}), {n} {record['data']['split']} points"
    ]
    lines.append("")
    lines += _header(
        ["attack", "accuracy (%)", "robust / total", "fwd / point", "bwd / point", "time (s)"],
        ["---", "---:", "---:", "---:", "---:", "---:"],
    )
    lines.append(
        _row(
            ["clean", *_acc(record["clean"], n), *_passes(record.get("cost", {}).get("clean")), ""]
        )
    )
    for attack in entry["attacks"]:
        for stage in attack.get("stages", []):
            name = f"{attack['name']}: after {stage['name']}"
            cells = [*_acc(stage, n), *_passes(stage.get("cost")), f"{stage['seconds']:.1f}"]
            lines.append(_row([name, *cells]))
        cells = [*_acc(attack, n), *_passes(attack.get("cost")), f"{attack['seconds']:.1f}"]
        lines.append(_row([attack["name"], *cells]))
    lines.append(_row(["**worst case**", *_acc(entry["worst_case"], n), "", "", ""]))
    warnings = entry["warnings"] + record["warnings"]
    if warnings:
        lines += [
            "",
            "Warnings (possible gradient masking; the numbers above may overstate robustness):",
        ]
        lines += [f"- {warning}" for warning in warnings]
    return "\n".join(lines)


def summary_table(record: dict[str, Any]) -> str:
    """Clean and worst-case accuracy per threat model, and the union over all of them."""
    n = record["data"]["n_examples"]
    lines = _header(
        ["threat model", "clean (%)", "worst case (%)", "robust / total"],
        ["---", "---:", "---:", "---:"],
    )
    clean = f"{record['clean']['accuracy']:.2f}"
    for entry in record["threats"]:
        worst = entry["worst_case"]
        lines.append(
            _row([entry["threat"], clean, f"{worst['accuracy']:.2f}", f"{worst['count']} / {n}"])
        )
    union = record["union"]
    lines.append(
        _row(
            [
                "**union** (robust to all at once)",
                clean,
                f"{union['accuracy']:.2f}",
                f"{union['count']} / {n}",
            ]
        )
    )
    return "\n".join(lines)


def cost_line(record: dict[str, Any]) -> str:
    """The whole evaluation's cost: passes per point and attack time (process-seconds)."""
    cost = record.get("cost")
    if cost is None:
        return ""
    seconds = sum(a["seconds"] for entry in record["threats"] for a in entry["attacks"])
    processes = record["settings"].get("processes", 1)
    over = f" over {processes} processes" if processes > 1 else ""
    return (
        f"Cost: {cost['forward_per_point']:.1f} forward and {cost['backward_per_point']:.1f} "
        f"backward passes per point in all ({cost['forward']} and {cost['backward']}), "
        f"{seconds:.1f} s of attacks{over}."
    )


def render_markdown(record: dict[str, Any]) -> str:
    model = record["model"]
    data = record["data"]
    head = [
        f"## Robustness of `{model['path']}`",
        "",
        f"Model sha256 `{model['sha256'][:16]}…`, {data['dataset']} {data['split']} split "
        f"(fingerprint `{data['fingerprint'][:16]}…`), seed {record['settings']['seed']}.",
    ]
    parts = ["\n".join(head)]
    parts += [threat_table(record, entry) for entry in record["threats"]]
    if record["threats"]:
        parts.append(
            "\n\n".join(p for p in ("### Summary", summary_table(record), cost_line(record)) if p)
        )
    if record.get("corruptions"):
        from generalist.evaluation.corruptions import corruption_markdown

        parts.append(corruption_markdown(record["corruptions"]))
    return "\n\n".join(parts) + "\n"
