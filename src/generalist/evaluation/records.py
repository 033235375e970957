"""The evaluation record (``eval.json``) and RobustBench's ``model_info`` JSON.

The record is written so that the number in a paper can be traced back to exactly one model file
(SHA-256 of its weights), one set of images (fingerprint of the evaluated subset), and attacks
with their full parameters and versions, run by known software. Accuracies are percentages of
the evaluated examples; ε is kept both as the text the user wrote (``8/255``) and as a float.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

import torch

from generalist.attacks.cost import PassCount
from generalist.devices import software_versions
from generalist.evaluation.suite import (
    AUTOATTACK_VERSIONS,
    AttackOutcome,
    SuiteResult,
    ThreatOutcome,
    passes_dict,
)

RECORD_FORMAT = "generalist-eval/1"


def _percent(count: int, total: int) -> float:
    return round(100.0 * count / total, 4) if total else 0.0


def _score(mask: torch.Tensor) -> dict[str, Any]:
    count = int(mask.sum())
    return {"accuracy": _percent(count, mask.numel()), "count": count}


def _cost(passes: PassCount, n: int) -> dict[str, Any]:
    """Passes in all and per evaluated point (clean-wrong points included, as adv-lib counts),
    so evaluations of different sizes compare at equal cost."""
    return {
        **passes_dict(passes),
        "forward_per_point": round(passes.forward / n, 2) if n else 0.0,
        "backward_per_point": round(passes.backward / n, 2) if n else 0.0,
    }


def _attack_entry(outcome: AttackOutcome, n: int) -> dict[str, Any]:
    entry = {
        "name": outcome.name,
        "parameters": outcome.parameters,
        **_score(outcome.robust),
        "seconds": round(outcome.seconds, 3),
        "cost": _cost(outcome.passes, n),
    }
    if outcome.stages:
        entry["stages"] = [
            {
                "name": s.name,
                **_score(s.robust),
                "seconds": round(s.seconds, 3),
                "cost": _cost(s.passes, n),
            }
            for s in outcome.stages
        ]
    if outcome.rejected:
        entry["rejected_adversarial_examples"] = outcome.rejected
    return entry


def _threat_entry(outcome: ThreatOutcome, n: int) -> dict[str, Any]:
    threat = outcome.threat
    return {
        "threat": str(threat),
        "norm": threat.norm,
        "eps": threat.eps,
        "eps_text": threat.eps_text,
        "attacks": [_attack_entry(a, n) for a in outcome.attacks],
        "worst_case": _score(outcome.worst_case),
        "warnings": list(outcome.warnings),
    }


def build_record(
    result: SuiteResult,
    *,
    model: dict[str, Any],
    data: dict[str, Any],
    settings: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """The full, self-describing record of one evaluation.

    ``model`` holds at least ``path`` and ``sha256``; ``data`` the dataset, split and
    ``fingerprint``; ``settings`` the seed, batch size, device and attack list. ``cost`` (and
    each attack's and stage's) counts the model's forward and backward passes, in all and per
    point; with several processes, seconds are summed over them (process-seconds).
    """
    return {
        "format": RECORD_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "data": {**data, "n_examples": result.n_examples},
        "settings": settings,
        "software": software_versions(),
        "clean": _score(result.clean),
        "threats": [_threat_entry(t, result.n_examples) for t in result.threats],
        "union": {"threats": [str(t.threat) for t in result.threats], **_score(result.union)},
        "warnings": list(result.warnings),
        "cost": {
            **_cost(result.passes, result.n_examples),
            "clean": _cost(result.clean_passes, result.n_examples),
            "checks": _cost(result.check_passes, result.n_examples),
        },
        "timings": {
            "clean_seconds": round(result.clean_seconds, 3),
            "attack_seconds": {
                f"{t.threat} {a.name}": round(a.seconds, 3)
                for t in result.threats
                for a in t.attacks
            },
            "wall_seconds_this_session": round(seconds, 3),
        },
    }


def model_info(
    record: dict[str, Any], threat_index: int, *, name: str, architecture: str
) -> dict[str, Any]:
    """RobustBench's ``model_info/<dataset>/<threat>/<Name>.json`` for one threat model.

    Paper fields (link, authors, venue) are left empty for the author to fill in. ``unreliable``
    is set when any sanity check fired. If the suite did not include AutoAttack, the robust
    accuracy is still reported under ``autoattack_acc`` (the key RobustBench reads) with a
    footnote saying which attacks produced it, since it is then only an upper bound.
    """
    entry = record["threats"][threat_index]
    attacks = [a["name"] for a in entry["attacks"]]
    warnings = entry["warnings"] + record["warnings"]
    footnotes = [f"{record['data']['n_examples']} {record['data']['split']} points"]
    if not any(name in AUTOATTACK_VERSIONS for name in attacks):
        footnotes.append(f"robust accuracy from {', '.join(attacks)} only, not AutoAttack")
    if warnings:
        footnotes.append("sanity checks fired: " + "; ".join(warnings))
    return {
        "link": "",
        "name": name,
        "authors": "",
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": record["data"]["dataset"],
        "venue": "",
        "architecture": architecture,
        "eps": entry["eps_text"],
        "clean_acc": f"{record['clean']['accuracy']:.2f}",
        "reported": None,
        "autoattack_acc": f"{entry['worst_case']['accuracy']:.2f}",
        "footnote": "; ".join(footnotes),
        "unreliable": bool(warnings),
    }


def model_info_filename(record: dict[str, Any], threat_index: int) -> str:
    """``model_info.json`` for the first threat, ``model_info_<norm>_<eps>.json`` for others."""
    if threat_index == 0:
        return "model_info.json"
    entry = record["threats"][threat_index]
    eps = re.sub(r"[^0-9A-Za-z.]+", "-", entry["eps_text"]).strip("-")
    return f"model_info_{entry['norm']}_{eps}.json"
