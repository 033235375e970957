"""Adversarial attacks in [0,1] pixel space, by name, and AutoAttack on top of them.

Every attack is ``attack(model, x, y) -> x_adv`` with a ``describe()`` record (see
:mod:`generalist.attacks.base`); build them with :func:`create_attack`.
"""

from __future__ import annotations

from generalist.attacks.apgd import APGD, APGDTargeted
from generalist.attacks.autoattack import (
    AutoAttack,
    AutoAttackProgress,
    AutoAttackResult,
    AutoAttackState,
)
from generalist.attacks.base import Attack, feasible
from generalist.attacks.checks import (
    black_box_warning,
    check_black_box_beats_white_box,
    check_randomness,
    check_zero_gradients,
)
from generalist.attacks.fab import FAB, FABTargeted
from generalist.attacks.mim_cw import CW, MIM
from generalist.attacks.pgd import PGD, pgd
from generalist.attacks.registry import create_attack, list_attacks
from generalist.attacks.square import Square
from generalist.attacks.threat import ThreatModel

__all__ = [
    "APGD",
    "CW",
    "FAB",
    "MIM",
    "PGD",
    "APGDTargeted",
    "Attack",
    "AutoAttack",
    "AutoAttackProgress",
    "AutoAttackResult",
    "AutoAttackState",
    "FABTargeted",
    "Square",
    "ThreatModel",
    "black_box_warning",
    "check_black_box_beats_white_box",
    "check_randomness",
    "check_zero_gradients",
    "create_attack",
    "feasible",
    "list_attacks",
    "pgd",
]
