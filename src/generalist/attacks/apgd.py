"""Auto-PGD (Croce & Hein, ICML 2020): PGD whose step size adapts itself, as in AutoAttack.

Fixed-step PGD either overshoots (step too large) or crawls (too small). APGD starts with a
step of 2ε and, at checkpoints w_0 = 0, w_1 = ⌈0.22·N⌉, w_{j+1} = w_j + max(w_j - w_{j-1} -
0.03·N, 0.06·N), halves it for an example when, since the last checkpoint,

1. fewer than ρ = 0.75 of its steps increased the loss (it is oscillating), or
2. its step was not halved at the last checkpoint and its best loss has not improved;

each halving restarts that example from its highest-loss point. Between checkpoints it takes
heavy-ball steps: ``z = P(x_k + η·d(∇f))``, ``x_{k+1} = P(x_k + 0.75·(z - x_k) + 0.25·(x_k -
x_{k-1}))`` (a plain step at k = 0), where ``d`` is the sign (ℓ∞) or the normalised gradient (ℓ2).

The checkpoints use the reference code's integer lengths (22, 19, 16, ..., at least 6 for
N = 100: identical to the paper's ⌈p_j·N⌉ at N = 100). Two details follow the paper where the
reference code slips: the first oscillation count compares with the loss at the start point
(the reference compares with 0), and "fewer than ρ" is strict (the reference uses ≤).

Losses: cross-entropy (APGD-CE), the Difference of Logits Ratio, scale-invariant so it does not
saturate like CE (APGD-DLR), and its targeted form run once per target, the 2nd to
``n_target_classes + 1``-th most likely class of the clean image (APGD-T).

An example that is misclassified at any iterate stays broken (the attack returns that iterate,
and the example leaves the run); the others get their highest-loss point. Examples
misclassified already are returned unchanged. Random starts are drawn per point (see
:mod:`generalist.attacks.streams`), so a point's result does not depend on its batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from generalist.attacks import streams
from generalist.attacks.base import batch_view, point_indices, require_counts, threat_fields
from generalist.attacks.pgd import cross_entropy_per_example
from generalist.attacks.threat import ThreatModel
from generalist.errors import ConfigError

VERSION = "2"
MOMENTUM = 0.75
INITIAL_STEP = 2.0
"""Initial step size in units of ε (ℓ∞ and ℓ2)."""
TargetedLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
"""``loss_fn(logits, y, target) -> per-example loss [B]``; ``target`` is None when untargeted."""


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``-(z_y - max_{i≠y} z_i) / (z_π1 - z_π3)``: the margin in units of the logit spread."""
    logits = logits.float()
    ranked, order = logits.sort(dim=1)
    rows = torch.arange(len(y), device=y.device)
    true_is_top = (order[:, -1] == y).float()
    best_other = ranked[:, -2] * true_is_top + ranked[:, -1] * (1.0 - true_is_top)
    return -(logits[rows, y] - best_other) / (ranked[:, -1] - ranked[:, -3] + 1e-12)


def targeted_dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``-(z_y - z_t) / (z_π1 - (z_π3 + z_π4)/2)``: pushes the target above the true class."""
    logits = logits.float()
    ranked = logits.sort(dim=1).values
    rows = torch.arange(len(y), device=y.device)
    spread = ranked[:, -1] - 0.5 * (ranked[:, -3] + ranked[:, -4]) + 1e-12
    return -(logits[rows, y] - logits[rows, target]) / spread


def checkpoint_lengths(n_iter: int) -> list[int]:
    """Iterations between consecutive step-size checkpoints, until ``n_iter`` is used up."""
    length = max(int(0.22 * n_iter), 1)
    shrink, shortest = max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)
    lengths, used = [], 0
    while used + length <= n_iter:
        lengths.append(length)
        used += length
        length = max(length - shrink, shortest)
    return lengths


def start_noise(
    threat: ThreatModel, key: int, x: torch.Tensor, points: torch.Tensor
) -> torch.Tensor:
    """Per-point start noise shaped like ``x``: uniform in [-1, 1] (ℓ∞) or normal (ℓ2)."""
    n_values = x[0].numel()
    if threat.norm == "Linf":
        noise = 2 * streams.uniform(key, points, 0, n_values) - 1
    else:
        noise = streams.normal(key, points, 0, n_values)
    return noise.view_as(x).to(x.dtype)


def start_point(threat: ThreatModel, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The reference's start: ``noise`` scaled onto the sphere of radius ε (ℓ∞: the cube's
    surface), clipped to [0,1]."""
    noise = noise.to(device=x.device, dtype=x.dtype)
    if threat.norm == "Linf":
        size = noise.abs().flatten(1).amax(dim=1)
    else:
        size = noise.flatten(1).norm(dim=1)
    return (x + threat.eps * noise / (batch_view(size, x) + 1e-12)).clamp(0.0, 1.0)


def _loss_and_grad(
    model: nn.Module,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None,
    loss_fn: TargetedLossFn,
    eot_iter: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, input gradient and logits; with ``eot_iter`` > 1 the gradient is averaged over
    that many passes (Expectation over Transformation, for randomised models) and the loss and
    logits are the last pass's, as in the reference."""
    grad = None
    with torch.enable_grad():
        x_adv = x_adv.detach().requires_grad_(True)
        for _ in range(eot_iter):
            logits = model(x_adv)
            loss = loss_fn(logits, y, target)
            (sample,) = torch.autograd.grad(loss.sum(), x_adv)
            grad = sample if grad is None else grad + sample
    if eot_iter > 1:
        grad = grad / eot_iter
    return loss.detach(), grad.detach(), logits.detach()


def apgd_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel,
    loss_fn: TargetedLossFn,
    *,
    n_iter: int,
    rho: float,
    start: torch.Tensor,
    target: torch.Tensor | None = None,
    eot_iter: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One APGD run from ``start``: returns (fooled [B], x_adv).

    ``x_adv`` is, per example, its first misclassified iterate if there was one, else its
    highest-loss iterate. Every example's iterates depend on that example alone, so on a CPU an
    example leaves the batch as soon as it is misclassified (its answer is final) and the others
    run on without it: identical results, no work spent on broken points. On a GPU, where
    looking for them would stall the device every iteration, broken examples ride along.
    """
    fooled_out = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    x_out = start.clone()
    loss, grad, logits = _loss_and_grad(model, start, y, target, loss_fn, eot_iter)
    run = _Examples.start(x, y, target, start, loss, grad, logits, INITIAL_STEP * threat.eps)
    checkpoints = iter(checkpoint_lengths(n_iter))
    window, since_check = next(checkpoints, 0), 0
    compact = x.device.type == "cpu"
    for i in range(n_iter + 1):
        if compact and run.fooled.any():
            # Broken examples leave: their answer is the iterate they were first fooled at.
            x_out[run.rows[run.fooled]] = run.found[run.fooled]
            fooled_out[run.rows[run.fooled]] = True
            run = run.kept(~run.fooled)
            if len(run.rows) == 0:
                break
        if i == n_iter:
            break
        run.advance(model, threat, loss_fn, eot_iter, weight=1.0 if i == 0 else MOMENTUM)
        since_check += 1
        if since_check == window:
            run.halve_where_stuck(rho * window)
            window, since_check = next(checkpoints, 0), 0
    x_out[run.rows] = torch.where(batch_view(run.fooled, run.x), run.found, run.best_x)
    fooled_out[run.rows] = run.fooled
    return fooled_out, x_out


@dataclass
class _Examples:
    """The examples still attacked in one APGD run: per example (one row each, aligned), its
    clean point, iterates, best point and step-size bookkeeping, so the broken ones can leave
    the batch together (:meth:`kept`)."""

    rows: torch.Tensor
    """Each example's row in the caller's batch."""
    x: torch.Tensor
    y: torch.Tensor
    target: torch.Tensor | None
    x_adv: torch.Tensor
    x_prev: torch.Tensor
    grad: torch.Tensor
    prev_loss: torch.Tensor
    found: torch.Tensor
    """The iterate each example was first misclassified at (meaningful where ``fooled``)."""
    fooled: torch.Tensor
    best_x: torch.Tensor
    best_loss: torch.Tensor
    best_grad: torch.Tensor
    step: torch.Tensor
    increases: torch.Tensor
    """Steps since the last checkpoint that increased the loss."""
    best_at_check: torch.Tensor
    halved_at_check: torch.Tensor

    @classmethod
    def start(
        cls,
        x: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor | None,
        start: torch.Tensor,
        loss: torch.Tensor,
        grad: torch.Tensor,
        logits: torch.Tensor,
        step: float,
    ) -> _Examples:
        """Every example at its start point, with that point's loss, gradient and logits."""
        n, device = len(x), x.device
        return cls(
            rows=torch.arange(n, device=device),
            x=x,
            y=y,
            target=target,
            x_adv=start,
            x_prev=start,
            grad=grad,
            prev_loss=loss,
            found=start,
            fooled=logits.argmax(dim=1) != y,
            best_x=start,
            best_loss=loss,
            best_grad=grad,
            step=torch.full((n,), step, device=device, dtype=x.dtype),
            increases=torch.zeros(n, device=device),
            best_at_check=loss.clone(),
            halved_at_check=torch.zeros(n, dtype=torch.bool, device=device),
        )

    def kept(self, keep: torch.Tensor) -> _Examples:
        """Only the examples where ``keep`` is True."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return _Examples(**{k: None if v is None else v[keep] for k, v in values.items()})

    def advance(
        self,
        model: nn.Module,
        threat: ThreatModel,
        loss_fn: TargetedLossFn,
        eot_iter: int,
        *,
        weight: float,
    ) -> None:
        """One heavy-ball step (``weight`` 1: a plain one), then its bookkeeping: the first
        misclassified iterate, the loss increases, the best point."""
        x, x_adv = self.x, self.x_adv
        z = threat.clip(x, x_adv + batch_view(self.step, x) * threat.ascent_direction(self.grad))
        x_next = threat.clip(x, x_adv + weight * (z - x_adv) + (1 - weight) * (x_adv - self.x_prev))
        self.x_prev, self.x_adv = x_adv, x_next
        loss, grad, logits = _loss_and_grad(model, x_next, self.y, self.target, loss_fn, eot_iter)
        self.grad = grad

        # torch.where, not boolean-mask writes: those would stall the host on the GPU six
        # times per iteration.
        newly = (logits.argmax(dim=1) != self.y) & ~self.fooled
        self.found = torch.where(batch_view(newly, x), x_next, self.found)
        self.fooled = self.fooled | newly
        self.increases += (loss > self.prev_loss).float()
        self.prev_loss = loss
        improved = loss > self.best_loss
        self.best_x = torch.where(batch_view(improved, x), x_next, self.best_x)
        self.best_grad = torch.where(batch_view(improved, x), grad, self.best_grad)
        self.best_loss = torch.where(improved, loss, self.best_loss)

    def halve_where_stuck(self, min_increases: float) -> None:
        """At a checkpoint: halve the step of each example that oscillated (fewer than
        ``min_increases`` increasing steps) or stalled (not halved last time, best loss not
        improved), restarting it from its best point."""
        oscillating = self.increases < min_increases
        stalled = ~self.halved_at_check & (self.best_loss <= self.best_at_check)
        halve = oscillating | stalled
        x = self.x
        self.step = torch.where(halve, self.step / 2, self.step)
        self.x_adv = torch.where(batch_view(halve, x), self.best_x, self.x_adv)
        self.grad = torch.where(batch_view(halve, x), self.best_grad, self.grad)
        self.halved_at_check, self.best_at_check = halve, self.best_loss.clone()
        self.increases.zero_()


StartNoise = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]
"""``start_noise(x, points, round_) -> noise`` shaped like ``x``: a replacement for the per-point
streams (tests use it to give APGD the reference's start points); ``round_`` names the restart
(``"2"``) or target and restart (``"3/0"``)."""


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor, _: torch.Tensor | None) -> torch.Tensor:
    return cross_entropy_per_example(logits, y)


def _dlr(logits: torch.Tensor, y: torch.Tensor, _: torch.Tensor | None) -> torch.Tensor:
    return dlr_loss(logits, y)


class _APGDBase:
    """Shared parameters, validation, random starts and the restart loop of the APGD variants."""

    name: str

    def __init__(
        self,
        threat: ThreatModel | str,
        *,
        n_iter: int,
        n_restarts: int,
        rho: float,
        seed: int,
        eot_iter: int,
        start_noise: StartNoise | None,
    ) -> None:
        self.threat = ThreatModel.parse(threat)
        if self.threat.norm == "L1":
            raise ConfigError(
                f"{self.name} for L1 is not implemented; use fab-t or pgd for L1 threat models"
            )
        require_counts(self.name, n_iter=n_iter, n_restarts=n_restarts, eot_iter=eot_iter)
        if not 0 < rho <= 1:
            raise ConfigError(f"{self.name} rho must be in (0, 1], got {rho}")
        self.n_iter = n_iter
        self.n_restarts = n_restarts
        self.rho = rho
        self.seed = seed
        self.eot_iter = eot_iter
        self.start_noise = start_noise

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": VERSION,
            **threat_fields(self.threat),
            "n_iter": self.n_iter,
            "n_restarts": self.n_restarts,
            "rho": self.rho,
            "seed": self.seed,
            "eot_iter": self.eot_iter,
        }

    def _prepare(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Detached inputs, the points' global indices and the clean logits."""
        x, y = x.detach(), y.detach()
        points = point_indices(indices, len(x), x.device)
        with torch.no_grad():
            return x, y, points, model(x)

    def _require_classes(self, n_classes: int, needed: int, why: str) -> None:
        if n_classes < needed:
            raise ConfigError(
                f"{self.name} needs at least {needed} classes ({why}); the model has "
                f"{n_classes}: use apgd-ce"
            )

    def _restarts(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        points: torch.Tensor,
        robust: torch.Tensor,
        x_adv: torch.Tensor,
        loss_fn: TargetedLossFn,
        target: torch.Tensor | None = None,
        label: str = "",
    ) -> None:
        """Attack the still-robust examples ``n_restarts`` times, updating the two in place.

        ``target`` [B] holds APGD-T's target class per example; ``label`` names the target in
        the random streams' round.
        """
        for restart in range(self.n_restarts):
            idx = robust.nonzero().squeeze(1)
            if idx.numel() == 0:
                return
            round_ = f"{label}{restart}"
            x0, p0 = x[idx], points[idx]
            if self.start_noise is None:
                noise = start_noise(
                    self.threat, streams.stream_key(self.seed, self.name, round_), x0, p0
                )
            else:
                noise = self.start_noise(x0, p0, round_)
            fooled, found = apgd_run(
                model,
                x0,
                y[idx],
                self.threat,
                loss_fn,
                n_iter=self.n_iter,
                rho=self.rho,
                start=start_point(self.threat, x0, noise),
                target=None if target is None else target[idx],
                eot_iter=self.eot_iter,
            )
            x_adv[idx] = found
            robust[idx[fooled]] = False


class APGD(_APGDBase):
    """APGD-CE / APGD-DLR: ``APGD("Linf:8/255", loss="dlr")(model, x, y) -> x_adv``."""

    def __init__(
        self,
        threat: ThreatModel | str,
        *,
        loss: str = "ce",
        n_iter: int = 100,
        n_restarts: int = 1,
        rho: float = 0.75,
        seed: int = 0,
        eot_iter: int = 1,
        start_noise: StartNoise | None = None,
    ) -> None:
        if loss not in ("ce", "dlr"):
            raise ConfigError(f"apgd loss must be 'ce' or 'dlr', got {loss!r}")
        self.loss = loss
        self.name = f"apgd-{loss}"
        super().__init__(
            threat,
            n_iter=n_iter,
            n_restarts=n_restarts,
            rho=rho,
            seed=seed,
            eot_iter=eot_iter,
            start_noise=start_noise,
        )

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "loss": self.loss}

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x, y, points, logits = self._prepare(model, x, y, indices)
        if self.loss == "dlr":
            self._require_classes(logits.shape[1], 3, "the DLR loss uses the 3rd-largest logit")
        loss_fn = _dlr if self.loss == "dlr" else _cross_entropy
        robust, x_adv = logits.argmax(dim=1) == y, x.clone()
        self._restarts(model, x, y, points, robust, x_adv, loss_fn)
        return x_adv


class APGDTargeted(_APGDBase):
    """APGD-T: targeted DLR towards each of the ``n_target_classes`` most likely wrong classes."""

    name = "apgd-t"

    def __init__(
        self,
        threat: ThreatModel | str,
        *,
        n_iter: int = 100,
        n_restarts: int = 1,
        n_target_classes: int = 9,
        rho: float = 0.75,
        seed: int = 0,
        eot_iter: int = 1,
        start_noise: StartNoise | None = None,
    ) -> None:
        super().__init__(
            threat,
            n_iter=n_iter,
            n_restarts=n_restarts,
            rho=rho,
            seed=seed,
            eot_iter=eot_iter,
            start_noise=start_noise,
        )
        require_counts("apgd-t", n_target_classes=n_target_classes)
        self.n_target_classes = n_target_classes

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "n_target_classes": self.n_target_classes}

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x, y, points, logits = self._prepare(model, x, y, indices)
        n_classes = logits.shape[1]
        self._require_classes(n_classes, 4, "the targeted DLR loss uses the 4th-largest logit")
        robust, x_adv = logits.argmax(dim=1) == y, x.clone()
        # Ascending order, as in the reference: column -1 is the prediction (= y while robust),
        # so columns -2, -3, ... are the most likely wrong classes.
        order = logits.sort(dim=1).indices
        for rank in range(2, min(self.n_target_classes, n_classes - 1) + 2):
            self._restarts(
                model, x, y, points, robust, x_adv, targeted_dlr_loss, order[:, -rank], f"{rank}/"
            )
        return x_adv
