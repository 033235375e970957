"""What every attack object promises, so the evaluator can treat them all alike.

An attack is a callable ``attack(model, x, y) -> x_adv`` plus a ``describe()`` record. The
evaluator relies on four things: ``x_adv`` has the shape and dtype of ``x``, lies in [0,1] and in
the attack's ε-ball; the same attack object on the same batch returns the same ``x_adv`` (each
call reseeds its own generator, so a resumed evaluation reproduces an uninterrupted one); the
attack never switches the model between train and eval mode (the evaluator does, once); and
``describe()`` holds everything needed to rerun it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from generalist.attacks.threat import ThreatModel
from generalist.errors import ConfigError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(logits, target) -> per-example loss [B]``; an attack ascends its sum."""


@runtime_checkable
class Attack(Protocol):
    name: str
    threat: ThreatModel

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]: ...


def threat_fields(threat: ThreatModel) -> dict[str, Any]:
    """The threat model as a record: ε both as written (``8/255``) and as the float used."""
    return {
        "threat": str(threat),
        "norm": threat.norm,
        "eps": threat.eps,
        "eps_text": threat.eps_text,
    }


def batch_view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-example values [B] to [B, 1, 1, ...] so they broadcast against ``like``."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def feasible(
    threat: ThreatModel, x: torch.Tensor, x_adv: torch.Tensor, rel_tol: float = 1e-5
) -> torch.Tensor:
    """Per example: is ``x_adv`` inside the ε-ball (up to float rounding), in [0,1], not NaN?

    A point that fails this is an attack bug; counting it as broken would understate robustness.
    """
    inside = threat.norms(x_adv - x) <= threat.eps * (1 + rel_tol) + 1e-7
    in_box = ((x_adv >= -1e-6) & (x_adv <= 1 + 1e-6)).flatten(1).all(dim=1)
    return inside & in_box & ~torch.isnan(x_adv).flatten(1).any(dim=1)


def require_counts(attack: str, **counts: int) -> None:
    """Every count (iterations, restarts, queries, target classes) must be at least 1."""
    for label, value in counts.items():
        if value < 1:
            raise ConfigError(f"{attack} {label} must be at least 1, got {value}")
