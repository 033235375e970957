"""What every attack object promises, so the evaluator can treat them all alike.

An attack is a callable ``attack(model, x, y) -> x_adv`` plus a ``describe()`` record. The
evaluator relies on four things: ``x_adv`` has the shape and dtype of ``x``, lies in [0,1] and in
the attack's ε-ball; a point gets the same ``x_adv`` whatever batch it comes in (attacks that
draw random numbers take the points' global ``indices`` and draw per point, see
:mod:`generalist.attacks.streams`, so a resumed or sharded evaluation reproduces an
uninterrupted one); the attack never switches the model between train and eval mode (the
evaluator does, once); and ``describe()`` holds everything needed to rerun it.
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


def point_indices(indices: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """The global index of each of ``n`` points (default ``0..n-1``), as int64 on ``device``.

    Attacks seed their random draws by these indices, so a point is attacked alike in any
    batch, order or shard; two points with one index would share their draws, hence refused.
    """
    if indices is None:
        return torch.arange(n, device=device)
    indices = torch.as_tensor(indices)
    if indices.shape != (n,) or indices.is_floating_point() or indices.is_complex():
        raise ConfigError(
            f"indices must be {n} integers, one global index per point; got a tensor of "
            f"shape {tuple(indices.shape)} and dtype {indices.dtype}"
        )
    if n and (int(indices.min()) < 0 or len(indices.unique()) != n):
        raise ConfigError("indices must be distinct and non-negative (one per point)")
    return indices.to(device=device, dtype=torch.int64)


def fast_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the memory layout the model's passes run fastest in, same values.

    On the CPU, images in channels_last make oneDNN's convolutions take its NHWC kernels even
    for a model whose weights are NCHW: measured 1.1–1.7x per forward and 1.15x per forward +
    backward pass of the CIFAR ``small-cnn`` at one thread. The outputs differ from NCHW's in
    the last bits only; attacks that must reproduce the reference's iterates bit for bit (APGD)
    keep the caller's layout. Elsewhere (GPUs, non-image inputs) ``x`` is returned as is.
    """
    if x.dim() == 4 and x.device.type == "cpu":
        return x.contiguous(memory_format=torch.channels_last)
    return x
