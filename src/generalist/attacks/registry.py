"""Attacks by name, as written in configs and on the command line (``pgd-20``, ``apgd-t``...).

``n_iter`` is the one knob every gradient attack shares (PGD/MIM/CW steps, APGD and FAB
iterations), so a quick run can shorten all of them at once. Square is budgeted in queries
(``n_queries``), which ``n_iter`` leaves alone: AutoAttack fixes it at 5000 whatever the iterations.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

from generalist.attacks.apgd import APGD, APGDTargeted
from generalist.attacks.base import Attack
from generalist.attacks.fab import FAB, FABTargeted
from generalist.attacks.mim_cw import CW, MIM
from generalist.attacks.pgd import PGD
from generalist.attacks.square import Square
from generalist.attacks.threat import ThreatModel
from generalist.errors import ConfigError, cut

_PGD_STEPS = re.compile(r"^pgd-(\d+)$")

# name -> (constructor, keyword that n_iter sets, or None when it does not apply)
_ATTACKS: dict[str, tuple[Callable[..., Attack], str | None]] = {
    "pgd": (PGD, "steps"),
    "mim": (MIM, "steps"),
    "cw": (CW, "steps"),
    "apgd-ce": (lambda threat, **kw: APGD(threat, loss="ce", **kw), "n_iter"),
    "apgd-dlr": (lambda threat, **kw: APGD(threat, loss="dlr", **kw), "n_iter"),
    "apgd-t": (APGDTargeted, "n_iter"),
    "fab": (FAB, "n_iter"),
    "fab-t": (FABTargeted, "n_iter"),
    "square": (Square, None),
}
_CLASSES = {"apgd-ce": APGD, "apgd-dlr": APGD}
"""Names whose factory is a lambda: the class whose signature lists the parameters."""


def list_attacks() -> list[str]:
    """The attack names :func:`create_attack` knows (``pgd`` also takes ``pgd-<steps>``)."""
    return list(_ATTACKS)


def _parameters(name: str) -> set[str]:
    cls = _CLASSES.get(name, _ATTACKS[name][0])
    params = set(inspect.signature(cls).parameters) - {"threat"}
    return params - {"loss", "targeted"}  # fixed by the name


def create_attack(
    name: str, threat: ThreatModel | str, *, seed: int = 0, n_iter: int | None = None, **params: Any
) -> Attack:
    """Build an attack by name; ``pgd-20`` is PGD with 20 steps (that count beats ``n_iter``).

    Unknown names and parameters fail here, before any compute, with the valid choices listed.
    """
    key = str(name).strip().lower()
    steps = _PGD_STEPS.match(key)
    if steps:
        key, params = "pgd", {**params, "steps": int(steps.group(1))}
    if key not in _ATTACKS:
        raise ConfigError(
            f"unknown attack {cut(name)}; choose from {', '.join(list_attacks())} (or pgd-<steps>)"
        )
    factory, iterations_keyword = _ATTACKS[key]
    unknown = sorted(set(params) - _parameters(key))
    if unknown:
        raise ConfigError(
            f"{key} has no parameter {', '.join(unknown)}; valid: "
            f"{', '.join(sorted(_parameters(key)))}"
        )
    if n_iter is not None and n_iter < 1:
        raise ConfigError(f"n_iter must be at least 1, got {n_iter}")
    if n_iter is not None and iterations_keyword is not None:
        params.setdefault(iterations_keyword, n_iter)
    if key == "pgd" and params.get("steps", 1) < 1:
        raise ConfigError(f"pgd steps must be at least 1, got {params['steps']}")
    return factory(ThreatModel.parse(threat), seed=seed, **params)
