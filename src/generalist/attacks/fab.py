"""FAB and FAB-T: the Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), as in AutoAttack.

FAB looks for the *smallest* perturbation that changes the decision. Each iteration linearises
the boundary between the true class and one other class at the current iterate, and moves to
the closest point (in the threat model's norm) of that linearised boundary that stays inside
[0,1] — computed exactly, for both the iterate and the clean image. The two projections are mixed
with a weight α ≤ ``alpha_max`` that pulls towards the clean image, the step overshoots by ``eta``,
and an iterate that crossed the boundary is pulled back towards the clean image by ``beta``.

Because FAB minimises the norm instead of staying inside the ε-ball, a point it finds counts only
if its norm is at most ε; the attack returns those points and leaves every other example clean.
On a CPU an example leaves a run as soon as it has such a point (its outcome is then
settled), so no work is spent refining points that are broken already.

The targeted version (``fab-t``, AutoAttack "standard") runs once per target class — the k-th
most likely wrong class of the clean prediction, k = 1..``n_target_classes`` — on the examples
still robust. The untargeted one (``fab``, AutoAttack "plus") picks, at every iteration, the
class whose linearised boundary is closest, which needs the whole Jacobian (one backward pass per
class). Restarts after the first start from a random point drawn per point (see
:mod:`generalist.attacks.streams`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from generalist.attacks import streams
from generalist.attacks.base import fast_layout, point_indices, require_counts
from generalist.attacks.threat import ThreatModel, cumsum
from generalist.errors import ConfigError

VERSION = "2"


def boundary_step(point: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    """Smallest ℓp displacement ``d`` with ``<w, point + d> = b`` and ``point + d`` in [0,1].

    Rows are independent problems (``point``, ``w``: [N, D], ``b``: [N]). When the hyperplane
    misses the box the result is the largest move towards it (the box corner closest to it), so
    FAB still makes progress, as in the reference implementation.

    Every coordinate can only usefully move in the direction that brings ``<w, ·>`` towards ``b``,
    and at most by its ``room`` to the box face. For ℓ∞ and ℓ2 the optimum moves every coordinate
    by ``min(level·scale_i, room_i)`` for one common water level, found by sorting the
    breakpoints; for ℓ1 it spends the budget greedily on the largest |w_i| first.
    """
    need = b - (w * point).sum(dim=1)
    w = w * torch.where(need >= 0, 1.0, -1.0).to(w.dtype).unsqueeze(1)
    need = need.abs()
    room = torch.where(w > 0, 1.0 - point, point)
    w_abs = w.abs()
    if norm == "L1":
        return w.sign() * _greedy_l1_moves(w_abs, room, need)
    if norm == "Linf":
        weight, breakpoint, scale = w_abs, room, torch.ones_like(w_abs)
    elif norm == "L2":
        weight, scale = w_abs.square(), w_abs
        breakpoint = torch.where(w_abs > 0, room / w_abs.clamp_min(1e-30), torch.zeros_like(room))
    else:
        raise ConfigError(f"FAB has no projection for norm {norm!r}; use Linf, L2 or L1")
    level = _water_level(weight, breakpoint, need).unsqueeze(1)
    return w.sign() * scale * torch.minimum(level, breakpoint)


def _water_level(
    weight: torch.Tensor, breakpoint: torch.Tensor, need: torch.Tensor
) -> torch.Tensor:
    """Per row, the smallest μ ≥ 0 with Σ_i weight_i·min(μ, breakpoint_i) = need, else +inf.

    The left side is piecewise linear and non-decreasing in μ with kinks at the sorted
    breakpoints; evaluating it at every kink locates the linear piece that contains the answer.
    """
    breakpoint, order = breakpoint.sort(dim=1)
    weight = weight.gather(1, order)
    saturated_before = cumsum(weight * breakpoint, dim=1) - weight * breakpoint
    still_rising = cumsum(weight.flip(1), dim=1).flip(1)
    reached_at_kink = saturated_before + breakpoint * still_rising
    piece = (reached_at_kink < need.unsqueeze(1)).sum(dim=1, keepdim=True)
    feasible = piece.squeeze(1) < weight.shape[1]
    piece = piece.clamp(max=weight.shape[1] - 1)
    level = (need - saturated_before.gather(1, piece).squeeze(1)) / still_rising.gather(
        1, piece
    ).squeeze(1).clamp_min(1e-30)
    return torch.where(feasible, level.clamp_min(0), torch.full_like(level, math.inf))


def _greedy_l1_moves(w_abs: torch.Tensor, room: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """Unsigned ℓ1-optimal moves: fill coordinates by decreasing |w_i| until ``need`` is met."""
    w_sorted, order = w_abs.sort(dim=1, descending=True)
    capacity = w_sorted * room.gather(1, order)
    before = cumsum(capacity, dim=1) - capacity
    used = torch.minimum((need.unsqueeze(1) - before).clamp_min(0), capacity)
    moves_sorted = torch.where(w_sorted > 0, used / w_sorted.clamp_min(1e-30), 0.0)
    return torch.zeros_like(w_abs).scatter(1, order, moves_sorted)


def _target_gap_and_grad(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``f_target(x) - f_y(x)`` per example (negative while still correct), its gradient, and
    whether ``x`` is misclassified."""
    rows = torch.arange(x.shape[0], device=x.device)
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        logits = model(x)
        gap = logits[rows, target] - logits[rows, y]
        (grad,) = torch.autograd.grad(gap.sum(), x)
    return gap.detach(), grad.detach(), logits.detach().argmax(dim=1) != y


def _closest_gap_and_grad(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, dual_p: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Untargeted FAB's choice: the class whose linearised boundary is closest, as
    :func:`_target_gap_and_grad` for that class. Needs the whole Jacobian: one backward pass
    per class, as in the reference."""
    rows = torch.arange(x.shape[0], device=x.device)
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        logits = model(x)
        n_classes = logits.shape[1]
        grads = []
        for k in range(n_classes):
            (g,) = torch.autograd.grad(logits[:, k].sum(), x, retain_graph=k < n_classes - 1)
            grads.append(g.flatten(1))
    logits = logits.detach()
    jacobian = torch.stack(grads, dim=1)  # [B, K, D]
    gaps = logits - logits[rows, y].unsqueeze(1)
    diffs = jacobian - jacobian[rows, y].unsqueeze(1)
    distance = gaps.abs() / (diffs.norm(p=dual_p, dim=2) + 1e-12)
    distance[rows, y] = math.inf
    closest = distance.argmin(dim=1)
    return gaps[rows, closest], diffs[rows, closest].view_as(x), logits.argmax(dim=1) != y


class FAB:
    """FAB as an attack object: ``FAB("Linf:8/255")(model, x, y) -> x_adv``.

    ``targeted=False`` (``fab``, AutoAttack "plus") attacks the closest linearised boundary
    at every iteration; ``targeted=True`` (``fab-t``, :class:`FABTargeted`) one target class
    per run, the k-th most likely wrong class, k = 1..``n_target_classes``.
    """

    def __init__(
        self,
        threat: ThreatModel | str,
        *,
        targeted: bool = False,
        n_iter: int = 100,
        n_restarts: int = 1,
        n_target_classes: int = 9,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        seed: int = 0,
    ) -> None:
        self.threat = ThreatModel.parse(threat)
        self.targeted = targeted
        self.name = "fab-t" if targeted else "fab"
        require_counts(
            self.name, n_iter=n_iter, n_restarts=n_restarts, n_target_classes=n_target_classes
        )
        if not 0 <= alpha_max <= 1:
            raise ConfigError(f"{self.name} alpha_max must be in [0, 1], got {alpha_max}")
        if eta < 1:
            raise ConfigError(f"{self.name} eta (overshoot) must be at least 1, got {eta}")
        if not 0 < beta < 1:
            raise ConfigError(f"{self.name} beta (backward step) must be in (0, 1), got {beta}")
        self.n_iter = n_iter
        self.n_restarts = n_restarts
        self.n_target_classes = n_target_classes
        self.alpha_max = alpha_max
        self.eta = eta
        self.beta = beta
        self.seed = seed

    def describe(self) -> dict:
        return {
            "name": self.name,
            "version": VERSION,
            "threat": str(self.threat),
            "n_iter": self.n_iter,
            "n_restarts": self.n_restarts,
            **({"n_target_classes": self.n_target_classes} if self.targeted else {}),
            "alpha_max": self.alpha_max,
            "eta": self.eta,
            "beta": self.beta,
            "seed": self.seed,
        }

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x, y = fast_layout(x.detach()), y.detach()
        points = point_indices(indices, len(x), x.device)
        x_adv = x.clone()
        with torch.no_grad():
            logits = model(x)
        robust = logits.argmax(dim=1) == y
        # Column 0 is the true class for every robust example, so columns 1.. are its targets.
        ranked = logits.argsort(dim=1, descending=True)
        ranks = range(1, min(self.n_target_classes, logits.shape[1] - 1) + 1)
        for rank in ranks if self.targeted else [None]:
            for restart in range(self.n_restarts):
                idx = robust.nonzero().squeeze(1)
                if idx.numel() == 0:
                    return x_adv.contiguous()
                x0, y0 = x[idx], y[idx]
                if restart == 0:
                    start = x0
                else:
                    key = streams.stream_key(self.seed, self.name, f"{rank or 0}/{restart}")
                    start = self._random_start(x0, key, points[idx])
                target = None if rank is None else ranked[idx, rank]
                found, success = self._run(model, x0, y0, target, start)
                x_adv[idx[success]] = found[success]
                robust[idx[success]] = False
        return x_adv.contiguous()

    def _random_start(self, x0: torch.Tensor, key: int, points: torch.Tensor) -> torch.Tensor:
        """A random point at norm ε/2 around the clean image, drawn per point.

        The paper scales restarts to half of min(best norm found, ε); the examples still attacked
        have no adversarial point within ε, so that radius is always ε/2.
        """
        n_values = x0[0].numel()
        if self.threat.norm == "Linf":
            noise = 2 * streams.uniform(key, points, 0, n_values) - 1
        else:
            noise = streams.normal(key, points, 0, n_values)
        noise = noise.view_as(x0).to(x0.dtype)
        norms = self.threat.norms(noise).clamp_min(1e-12).view(-1, *([1] * (x0.dim() - 1)))
        return (x0 + 0.5 * self.threat.eps * noise / norms).clamp(0.0, 1.0)

    def _run(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor | None,
        start: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One FAB run: per example (a misclassified iterate within ε, True), or (x0, False).

        On a CPU an example leaves the run at its first misclassified iterate within ε: FAB
        would go on shrinking the norm, but the point is broken whatever it finds next, and the
        others' iterates never depend on it. On a GPU, where looking for such examples would
        stall the device every iteration, they ride along.
        """
        eps = self.threat.eps
        dual_p = {"Linf": 1.0, "L2": 2.0, "L1": math.inf}[self.threat.norm]
        out = x0.flatten(1).clone()
        success = torch.zeros(len(x0), dtype=torch.bool, device=x0.device)
        rows = torch.arange(len(x0), device=x0.device)
        clean = out.clone()
        current = start.flatten(1)
        shape = x0.shape[1:]

        def images(flat: torch.Tensor) -> torch.Tensor:
            return fast_layout(flat.view(-1, *shape))

        compact = x0.device.type == "cpu"
        best = clean.clone()
        best_norm = torch.full((len(x0),), math.inf, device=x0.device)
        for i in range(self.n_iter):
            if compact and i > 0:
                done = best_norm <= eps
                if done.any():
                    out[rows[done]], success[rows[done]] = best[done], True
                    keep = ~done
                    rows, clean, current, best, best_norm, y = (
                        t[keep] for t in (rows, clean, current, best, best_norm, y)
                    )
                    target = None if target is None else target[keep]
                    if len(rows) == 0:
                        break
            current = self._step(model, images, current, clean, y, target, dual_p)
            with torch.inference_mode():
                fooled = model(images(current)).argmax(dim=1) != y
            fooled = fooled.clone()  # out of inference mode, for the updates below
            dist = (current - clean).norm(p=self.threat.p, dim=1)
            improved = fooled & (dist < best_norm)
            best = torch.where(improved.unsqueeze(1), current, best)
            best_norm = torch.where(improved, dist, best_norm)
            backward = clean + self.beta * (current - clean)
            current = torch.where(fooled.unsqueeze(1), backward, current)
        done = best_norm <= eps
        out[rows[done]], success[rows[done]] = best[done], True
        # The ε test on the flattened norm is the contract; clip guards float rounding.
        found = self.threat.clip(x0, out.view_as(x0))
        return found, success

    def _step(
        self,
        model: nn.Module,
        images: Callable[[torch.Tensor], torch.Tensor],
        current: torch.Tensor,
        clean: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor | None,
        dual_p: float,
    ) -> torch.Tensor:
        """The next iterate (flat): the current one and the clean image both projected onto
        the linearised decision boundary, mixed by how far each is from it (at most
        ``alpha_max`` of the clean one's step), overshooting by ``eta``."""
        if target is None:
            gap, grad, _ = _closest_gap_and_grad(model, images(current), y, dual_p)
        else:
            gap, grad, _ = _target_gap_and_grad(model, images(current), y, target)
        w = grad.flatten(1)
        # Linearised boundary f_target - f_y = 0 at the current iterate: <w, z> = b. The
        # iterate and the clean image are projected onto it in one batch.
        b = (w * current).sum(dim=1) - gap
        steps = boundary_step(
            torch.cat([current, clean]), torch.cat([w, w]), torch.cat([b, b]), self.threat.norm
        )
        step_current, step_clean = steps.chunk(2)
        distances = steps.norm(p=self.threat.p, dim=1).clamp_min(1e-8)
        dist_current, dist_clean = distances.chunk(2)
        alpha = (dist_current / (dist_current + dist_clean)).clamp(0, self.alpha_max)
        alpha = alpha.unsqueeze(1)
        return (
            (1 - alpha) * (current + self.eta * step_current)
            + alpha * (clean + self.eta * step_clean)
        ).clamp(0.0, 1.0)


class FABTargeted(FAB):
    """FAB-T (AutoAttack "standard"): ``FABTargeted("Linf:8/255")(model, x, y) -> x_adv``."""

    def __init__(
        self,
        threat: ThreatModel | str,
        *,
        n_iter: int = 100,
        n_restarts: int = 1,
        n_target_classes: int = 9,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        seed: int = 0,
    ) -> None:
        super().__init__(
            threat,
            targeted=True,
            n_iter=n_iter,
            n_restarts=n_restarts,
            n_target_classes=n_target_classes,
            alpha_max=alpha_max,
            eta=eta,
            beta=beta,
            seed=seed,
        )
