"""Threat models: the ε-ball an adversary may move in, and the geometry attacks need inside it.

Every attack works in [0,1] pixel space on perturbations ``delta`` with ``x + delta`` also in
[0,1]. A threat model knows three things about its norm: how to draw a random start inside the
ball, which direction is the steepest ascent for a given gradient, and how to project back.
Keeping these together means PGD, MIM and the training tasks share one definition of "inside
the ball" instead of each re-deriving it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

import torch

from generalist.errors import ConfigError, cut

NORMS = ("Linf", "L2", "L1")
_NORM_ALIASES = {"linf": "Linf", "inf": "Linf", "l2": "L2", "l1": "L1"}
_NUMBER = re.compile(r"^\s*[-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?\s*$")
"""A signed decimal: a sign is parsed, so ``-0.1`` is refused as negative, not as gibberish."""


def parse_eps(value: str | float | int) -> float:
    """Parse an ε written as a decimal (``0.031``) or a fraction (``8/255``), never with eval.

    Users copy budgets from papers in both forms; keeping the text lets results record exactly
    what was asked for, while the float is what the attack uses.
    """
    if isinstance(value, bool):
        raise ConfigError(f"epsilon must be a number such as 8/255 or 0.5, got {cut(value)}")
    if isinstance(value, int | float):
        eps = float(value) if not isinstance(value, int) or value.bit_length() < 1024 else math.inf
    else:
        text = str(value).strip()
        num, slash, den = text.partition("/")
        if not _NUMBER.match(num) or (slash and not _NUMBER.match(den)):
            raise ConfigError(
                f"epsilon {cut(value)} is not a number or fraction; write it like 8/255 or 0.5"
            )
        try:
            eps = float(Fraction(num.strip()) / Fraction(den.strip())) if slash else float(num)
        except ZeroDivisionError:
            raise ConfigError(
                f"epsilon {cut(value)} divides by zero; write it like 8/255"
            ) from None
        except OverflowError:
            eps = math.inf
    if not math.isfinite(eps) or eps <= 0:
        raise ConfigError(f"epsilon must be a positive finite number, got {cut(value)}")
    return eps


def parse_norm(value: str) -> str:
    """Map user spellings (``linf``, ``Linf``, ``l2``) to the canonical norm name."""
    norm = _NORM_ALIASES.get(str(value).strip().lower())
    if norm is None:
        raise ConfigError(f"unknown norm {cut(value)}; use one of {', '.join(NORMS)}")
    return norm


def _flat_norm(t: torch.Tensor, p: float) -> torch.Tensor:
    """Per-example norm of a batch, shaped [B, 1, 1, ...] so it broadcasts against ``t``."""
    norms = t.flatten(1).norm(p=p, dim=1)
    return norms.view(-1, *([1] * (t.dim() - 1)))


def cumsum(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t.cumsum(dim)``, also under ``torch.use_deterministic_algorithms(True)``.

    A floating-point cumulative sum has no deterministic CUDA kernel, so in deterministic mode
    (``deterministic: true``) it runs on the CPU: a copy each way, paid only in that mode.
    """
    if t.is_cuda and t.is_floating_point() and torch.are_deterministic_algorithms_enabled():
        return t.cpu().cumsum(dim).to(t.device)
    return t.cumsum(dim)


def project_l1_ball(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Euclidean projection of each example onto the ℓ1 ball (Duchi et al., 2008).

    Sorting-based and exact: examples already inside the ball are returned unchanged.
    """
    flat = delta.flatten(1)
    abs_flat = flat.abs()
    inside = abs_flat.sum(dim=1) <= eps
    sorted_abs, _ = abs_flat.sort(dim=1, descending=True)
    cumulative = cumsum(sorted_abs, dim=1)
    ranks = torch.arange(1, flat.shape[1] + 1, device=delta.device, dtype=delta.dtype)
    # ρ = largest k with sorted_abs[k] > (cumsum[k] - eps) / k; θ = (cumsum[ρ] - eps) / ρ.
    cond = sorted_abs * ranks > cumulative - eps
    rho = cond.to(torch.int64).cumsum(dim=1).argmax(dim=1, keepdim=True)
    theta = ((cumulative.gather(1, rho) - eps) / (rho + 1).to(delta.dtype)).clamp_min(0)
    projected = flat.sign() * (abs_flat - theta).clamp_min(0)
    projected = torch.where(inside.unsqueeze(1), flat, projected)
    return projected.view_as(delta)


@dataclass(frozen=True)
class ThreatModel:
    """An ℓp ball of radius ``eps`` around each clean image, intersected with [0,1]."""

    norm: str
    eps: float
    eps_text: str

    @classmethod
    def parse(cls, spec: str | ThreatModel) -> ThreatModel:
        """Build from ``"Linf:8/255"``-style text (the form used in configs and on the CLI)."""
        if isinstance(spec, ThreatModel):
            return spec
        norm, sep, eps = str(spec).partition(":")
        if not sep or not eps.strip():
            raise ConfigError(f"threat {cut(spec)} must look like Linf:8/255 or L2:0.5")
        return cls.of(norm, eps)

    @classmethod
    def of(cls, norm: str, eps: str | float) -> ThreatModel:
        norm, value = parse_norm(norm), parse_eps(eps)
        text = str(eps).strip()
        if norm == "Linf" and value > 1:
            levels = text if len(text) <= 12 else "8"
            raise ConfigError(
                f"epsilon {cut(text)} is larger than the whole [0, 1] pixel range, so the Linf "
                f"ball holds every image; write it like {levels}/255 for pixel levels"
            )
        return cls(norm, value, text)

    def __str__(self) -> str:
        return f"{self.norm}:{self.eps_text}"

    @property
    def p(self) -> float:
        return {"Linf": math.inf, "L2": 2.0, "L1": 1.0}[self.norm]

    def norms(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-example ℓp norm of a perturbation batch, shape [B]."""
        return delta.flatten(1).norm(p=self.p, dim=1)

    def project(self, delta: torch.Tensor) -> torch.Tensor:
        """Project perturbations onto the ε-ball (the caller clips ``x + delta`` to [0,1])."""
        if self.norm == "Linf":
            return delta.clamp(-self.eps, self.eps)
        if self.norm == "L2":
            scale = (self.eps / _flat_norm(delta, 2.0).clamp_min(1e-12)).clamp(max=1.0)
            return delta * scale
        return project_l1_ball(delta, self.eps)

    def clip(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """Return the point closest to ``x_adv`` that is both in the ball and in [0,1].

        For ℓ∞ the two constraints commute, so clamping twice is exact. For ℓ2/ℓ1, projecting
        onto the ball and then clipping to the box can only shrink the perturbation, so the
        result is feasible (though not always the exact projection onto the intersection).
        """
        return (x + self.project(x_adv - x)).clamp(0.0, 1.0)

    def ascent_step(
        self, x: torch.Tensor, x_adv: torch.Tensor, grad: torch.Tensor, step_size: float
    ) -> torch.Tensor:
        """One projected steepest-ascent step from ``x_adv``: the update every PGD variant
        (plain, momentum, early-stopped) shares, so they cannot drift apart."""
        return self.clip(x, x_adv.detach() + step_size * self.ascent_direction(grad))

    def random_start(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A random feasible point near ``x``: uniform in the ℓ∞ cube, or a random direction
        with uniform radius for ℓ2/ℓ1 (as in the PGD literature), clipped to [0,1]."""
        if self.norm == "Linf":
            noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            return (x + (2 * noise - 1) * self.eps).clamp(0.0, 1.0)
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if self.norm == "L1":
            direction = direction * torch.empty_like(direction).exponential_(generator=generator)
        direction = direction / _flat_norm(direction, self.p).clamp_min(1e-12)
        radius = torch.rand(
            (x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device
        ).to(x.dtype)
        return self.clip(x, x + direction * radius * self.eps)

    def ascent_direction(self, grad: torch.Tensor, l1_sparsity: float = 0.95) -> torch.Tensor:
        """Steepest-ascent direction of unit norm for this norm.

        ℓ∞: sign of the gradient. ℓ2: the normalised gradient. ℓ1: the sparse direction of
        Tramèr & Boneh (2019): keep only the coordinates above the ``l1_sparsity`` quantile of
        |grad| (the exact ℓ1 steepest direction is a single coordinate, which makes PGD crawl).
        """
        if self.norm == "Linf":
            return grad.sign()
        if self.norm == "L2":
            return grad / _flat_norm(grad, 2.0).clamp_min(1e-12)
        flat = grad.flatten(1)
        k = max(1, round((1 - l1_sparsity) * flat.shape[1]))
        threshold = flat.abs().topk(k, dim=1).values[:, -1:]
        sparse = flat.sign() * (flat.abs() >= threshold)
        sparse = sparse / sparse.abs().sum(dim=1, keepdim=True).clamp_min(1)
        return sparse.view_as(grad)

    def default_step_size(self, steps: int) -> float:
        """2.5·ε/k (Madry et al.): enough to cross the ball and return within ``steps``."""
        return 2.5 * self.eps / max(steps, 1)
