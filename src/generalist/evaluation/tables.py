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


def threat_table(record: dict[str, Any], entry: dict[str, Any]) -> str:
    """Clean, every attack (AutoAttack: after each of its stages, cumulatively), worst case."""
    n = record["data"]["n_examples"]
    lines = [
        f"### {entry['threat']} (ε = {entry['eps']:.6g}), {n} {record['data']['split']} points"
    ]
    lines.append("")
    lines += _header(
        ["attack", "accuracy (%)", "robust / total", "time (s)"], ["---", "---:", "---:", "---:"]
    )
    lines.append(_row(["clean", *_acc(record["clean"], n), ""]))
    for attack in entry["attacks"]:
        for stage in attack.get("stages", []):
            name = f"{attack['name']}: after {stage['name']}"
            lines.append(_row([name, *_acc(stage, n), f"{stage['seconds']:.1f}"]))
        lines.append(_row([attack["name"], *_acc(attack, n), f"{attack['seconds']:.1f}"]))
    lines.append(_row(["**worst case**", *_acc(entry["worst_case"], n), ""]))
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
        parts.append("### Summary\n\n" + summary_table(record))
    if record.get("corruptions"):
        from generalist.evaluation.corruptions import corruption_markdown

        parts.append(corruption_markdown(record["corruptions"]))
    return "\n\n".join(parts) + "\n"
