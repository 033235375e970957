"""AutoAttack (Croce & Hein, ICML 2020): a fixed ensemble run in sequence, per-point worst case.

Standard version: APGD-CE, APGD-T, FAB-T and Square (5000 queries) for ℓ∞ and ℓ2. The
reference's other versions: ``plus`` (APGD-CE and APGD-DLR with 5 restarts, untargeted FAB with
5 restarts, Square with 5 restarts, APGD-T, FAB-T) and ``rand`` (APGD-CE and APGD-DLR with
Expectation over Transformation, 20 gradient samples per step, for randomised defences). Each attack
only sees the points that are correctly classified and that no earlier attack broke, so the
cheap attacks thin the set before the expensive ones, and the robust accuracy is the per-point
worst case over all of them. (For ℓ1 the standard version is APGD-CE, APGD-T and FAB-T, Square
being defined for ℓ∞ and ℓ2 only; it needs the ℓ1 APGD of Croce & Hein (2021), which is not
implemented yet, so ℓ1 is refused with an error that names the alternative.)

Evaluations are long and get killed, so all progress lives in an :class:`AutoAttackState` made of
plain lists and numbers: which points are clean-correct, which attack broke which point, which
attacks finished, and the queue of the attack in progress. The queue is fixed when an attack
starts and cut into batches in order, and every attack reseeds itself per batch, so a run
resumed from a saved state attacks exactly the same batches and ends with exactly the result of
an uninterrupted run. Beyond that, every random draw is seeded by (seed, attack, restart or
target, the point's global index), so a point's outcome does not depend on the batch size, the
order of the points or the shard it was evaluated in (``run(..., indices=...)``).

The cost of each stage is on the record: forward and backward passes over single points
(summed batch sizes, counted at the model) and seconds.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from generalist.attacks.base import Attack, feasible, point_indices, threat_fields
from generalist.attacks.cost import CountingModel
from generalist.attacks.registry import create_attack
from generalist.attacks.threat import ThreatModel
from generalist.errors import ConfigError
from generalist.inference import eval_mode, predicts_correctly

VERSION = "2"
STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
PLUS_RESTARTS = 5
EOT_SAMPLES = 20
VERSIONS: dict[str, list[tuple[str, dict[str, int]]]] = {
    "standard": [(name, {}) for name in STANDARD],
    "plus": [
        ("apgd-ce", {"n_restarts": PLUS_RESTARTS}),
        ("apgd-dlr", {"n_restarts": PLUS_RESTARTS}),
        ("fab", {"n_restarts": PLUS_RESTARTS}),
        ("square", {"n_restarts": PLUS_RESTARTS}),
        ("apgd-t", {}),
        ("fab-t", {}),
    ],
    "rand": [("apgd-ce", {"eot_iter": EOT_SAMPLES}), ("apgd-dlr", {"eot_iter": EOT_SAMPLES})],
}
"""Each version's attacks in order, with the parameters that differ from the attack's default."""


@dataclass
class AutoAttackState:
    """Where a run stands, as JSON-ready lists and numbers (``to_dict`` / ``from_dict``).

    ``adversarials`` (index → flattened adversarial image, float32 on the CPU) is only written by
    ``to_dict(include_adversarials=True)``: the index lists are small, the images are not.
    """

    n_examples: int
    attacks: list[str]
    clean_correct: list[int] | None = None
    broken_by: dict[str, list[int]] = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)
    queue: list[int] = field(default_factory=list)
    queue_done: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    cost: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per stage (``"clean"`` and each attack): ``{"forward": n, "backward": n, "seconds": s}``
    (passes over single points)."""
    adversarials: dict[int, torch.Tensor] = field(default_factory=dict)

    def to_dict(self, include_adversarials: bool = False) -> dict[str, Any]:
        data = {
            "n_examples": self.n_examples,
            "attacks": list(self.attacks),
            "clean_correct": None if self.clean_correct is None else list(self.clean_correct),
            "broken_by": {name: list(idx) for name, idx in self.broken_by.items()},
            "finished": list(self.finished),
            "queue": list(self.queue),
            "queue_done": self.queue_done,
            "seconds": dict(self.seconds),
            "rejected": dict(self.rejected),
            "cost": {name: dict(passes) for name, passes in self.cost.items()},
        }
        if include_adversarials:
            data["adversarials"] = [[i, v.tolist()] for i, v in sorted(self.adversarials.items())]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AutoAttackState:
        try:
            return cls(
                n_examples=int(data["n_examples"]),
                attacks=[str(a) for a in data["attacks"]],
                clean_correct=None
                if data["clean_correct"] is None
                else [int(i) for i in data["clean_correct"]],
                broken_by={str(k): [int(i) for i in v] for k, v in data["broken_by"].items()},
                finished=[str(a) for a in data["finished"]],
                queue=[int(i) for i in data["queue"]],
                queue_done=int(data["queue_done"]),
                seconds={str(k): float(v) for k, v in data["seconds"].items()},
                rejected={str(k): int(v) for k, v in data["rejected"].items()},
                cost={
                    str(k): {
                        "forward": int(v["forward"]),
                        "backward": int(v["backward"]),
                        "seconds": float(v["seconds"]),
                    }
                    for k, v in data.get("cost", {}).items()
                },
                adversarials={
                    int(i): torch.tensor(values, dtype=torch.float32)
                    for i, values in data.get("adversarials", [])
                },
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(
                f"AutoAttack state is malformed ({type(exc).__name__}: {exc}); start a new run"
            ) from None

    def robust(self) -> list[int]:
        """Clean-correct points that no attack has broken, in increasing order."""
        broken = {i for idx in self.broken_by.values() for i in idx}
        return [i for i in self.clean_correct or [] if i not in broken]


@dataclass(frozen=True)
class AutoAttackProgress:
    """Sent to ``on_progress`` after the clean pass and after each batch of each attack."""

    attack: str
    """``"clean"`` for the clean pass, else the attack's name."""
    done: int
    total: int
    state: AutoAttackState

    @property
    def finished(self) -> bool:
        return self.done >= self.total


@dataclass
class AutoAttackResult:
    threat: ThreatModel
    attacks: list[str]
    clean_correct: torch.Tensor
    """bool [N]: classified correctly without attack."""
    robust_after: dict[str, torch.Tensor]
    """bool [N] per attack, cumulative: correct and unbroken by it and every attack before it."""
    robust: torch.Tensor
    """bool [N]: the per-point worst case over all attacks."""
    broken_by: dict[str, torch.Tensor]
    """bool [N] per attack: the points that attack broke (each point by at most one)."""
    x_adv: torch.Tensor
    """Adversarial images where ``has_adversarial``, the clean image elsewhere."""
    has_adversarial: torch.Tensor
    """bool [N]: broken points whose image is known (all, unless resumed from a state saved
    without adversarials)."""
    seconds: dict[str, float]
    rejected: dict[str, int]
    """Per attack, outputs outside the ε-ball or [0,1]: an attack bug, never counted as broken."""
    cost: dict[str, dict[str, float]]
    """Per stage (``"clean"``, then each attack): ``{"forward": passes, "backward": passes,
    "seconds": s}``, passes counted over single points (a batch of B counts B)."""

    @property
    def clean_accuracy(self) -> float:
        return self.clean_correct.float().mean().item()

    @property
    def robust_accuracy(self) -> float:
        return self.robust.float().mean().item()


class AutoAttack:
    """``AutoAttack("Linf:8/255").run(model, x, y) -> AutoAttackResult``.

    ``version`` is ``"standard"``, ``"plus"`` or ``"rand"`` (see the module docstring).
    ``attacks`` replaces the version's list (names, or attack objects with distinct names) and
    makes the version ``"custom"``. ``n_iter`` sets the iterations of the gradient attacks;
    Square keeps its 5000 queries.
    """

    name = "autoattack"

    def __init__(
        self,
        threat: ThreatModel | str,
        version: str = "standard",
        seed: int = 0,
        attacks: Sequence[str | Attack] | None = None,
        n_iter: int = 100,
    ) -> None:
        self.threat = ThreatModel.parse(threat)
        if version not in (*VERSIONS, "custom"):
            raise ConfigError(
                f"AutoAttack version must be one of {', '.join(VERSIONS)} or custom, "
                f"got {version!r}"
            )
        if attacks is None and version == "custom":
            raise ConfigError("AutoAttack version 'custom' needs a list of attacks")
        self.version = version if attacks is None else "custom"
        self.seed = seed
        self.n_iter = n_iter
        if attacks is None:
            if self.threat.norm == "L1":
                raise ConfigError(
                    "AutoAttack for L1 needs APGD-L1, which is not implemented yet; "
                    "evaluate L1 with --attacks fab-t,pgd-100 instead"
                )
            attacks = [
                create_attack(name, self.threat, seed=seed, n_iter=n_iter, **params)
                for name, params in VERSIONS[version]
            ]
        self.attacks: list[Attack] = [
            create_attack(a, self.threat, seed=seed, n_iter=n_iter) if isinstance(a, str) else a
            for a in attacks
        ]
        names = [a.name for a in self.attacks]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"AutoAttack needs distinct attack names, got {names}")
        for attack in self.attacks:
            if attack.threat != self.threat:
                raise ConfigError(
                    f"{attack.name} attacks {attack.threat} but AutoAttack runs {self.threat}; "
                    "build every attack with the same threat model"
                )

    @property
    def attack_names(self) -> list[str]:
        return [a.name for a in self.attacks]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": VERSION,
            "autoattack_version": self.version,
            **threat_fields(self.threat),
            "seed": self.seed,
            "n_iter": self.n_iter,
            "attacks": [a.describe() for a in self.attacks],
        }

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.run(model, x, y).x_adv

    def new_state(self, n_examples: int) -> AutoAttackState:
        return AutoAttackState(n_examples=n_examples, attacks=self.attack_names)

    def run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        indices: torch.Tensor | None = None,
        state: AutoAttackState | None = None,
        on_progress: Callable[[AutoAttackProgress], None] | None = None,
        batch_size: int = 500,
    ) -> AutoAttackResult:
        """Run (or resume, given the ``state`` of an earlier run on the same x, y) the attacks.

        ``indices`` [N] are the points' global indices (default ``0..N-1``): they seed every
        random draw, so a shard given ``x[idx], y[idx], indices=idx`` gets, point for point, the
        outcome of the whole run. ``state`` is updated in place (its positions are 0..N-1
        within ``x``); ``on_progress`` sees it after every batch, which is the moment to save it.
        The model is attacked in eval mode (a model in train mode would be attacked with batch
        statistics and have its BatchNorm running statistics moved) and handed back in the mode
        it had.
        """
        with eval_mode(model, freeze=True):
            return self._run(model, x, y, indices, state, on_progress, batch_size)

    def _run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        indices: torch.Tensor | None,
        state: AutoAttackState | None,
        on_progress: Callable[[AutoAttackProgress], None] | None,
        batch_size: int,
    ) -> AutoAttackResult:
        if x.shape[0] != y.shape[0]:
            raise ConfigError(
                f"got {x.shape[0]} images but {y.shape[0]} labels; pass one label each"
            )
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        points = point_indices(indices, len(x), x.device)
        state = self.new_state(len(x)) if state is None else state
        if state.n_examples != len(x) or state.attacks != self.attack_names:
            raise ConfigError(
                f"the AutoAttack state is for {state.n_examples} points and {state.attacks}, "
                f"not {len(x)} points and {self.attack_names}; start a new run"
            )
        x, y = x.detach(), y.detach()
        counted = CountingModel(model)

        def report(attack: str, done: int, total: int) -> None:
            if on_progress is not None:
                on_progress(AutoAttackProgress(attack, done, total, state))

        if state.clean_correct is None:
            began = time.perf_counter()
            with torch.inference_mode():
                correct = torch.cat(
                    [
                        predicts_correctly(counted, xb, yb)
                        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)
                    ]
                )
            state.clean_correct = correct.nonzero().squeeze(1).tolist()
            self._charge(state, "clean", counted, time.perf_counter() - began)
            report("clean", len(x), len(x))
        for attack in self.attacks:
            if attack.name not in state.finished:
                self._run_attack(attack, counted, x, y, points, state, batch_size, report)
        return self._result(state, x)

    @staticmethod
    def _charge(state: AutoAttackState, stage: str, counted: CountingModel, seconds: float) -> None:
        """Move the passes counted since the last charge, and ``seconds``, onto ``stage``."""
        cost = state.cost.setdefault(stage, {"forward": 0, "backward": 0, "seconds": 0.0})
        cost["forward"] += counted.count.forward
        cost["backward"] += counted.count.backward
        cost["seconds"] += seconds
        counted.count.forward = counted.count.backward = 0
        if stage != "clean":
            state.seconds[stage] = state.seconds.get(stage, 0.0) + seconds

    def _run_attack(
        self,
        attack: Attack,
        model: CountingModel,
        x: torch.Tensor,
        y: torch.Tensor,
        points: torch.Tensor,
        state: AutoAttackState,
        batch_size: int,
        report: Callable[[str, int, int], None],
    ) -> None:
        name = attack.name
        per_point = "indices" in inspect.signature(attack).parameters
        if not state.queue and state.queue_done == 0:
            state.queue = state.robust()  # fixed now, so a resumed run cuts the same batches
        while state.queue_done < len(state.queue):
            batch = state.queue[state.queue_done : state.queue_done + batch_size]
            idx = torch.tensor(batch, device=x.device)
            began = time.perf_counter()
            if per_point:
                x_adv = attack(model, x[idx], y[idx], indices=points[idx])
            else:
                x_adv = attack(model, x[idx], y[idx])
            with torch.inference_mode():
                wrong = model(x_adv).argmax(dim=1) != y[idx]
                ok = feasible(self.threat, x[idx], x_adv)
            images = x_adv.detach().flatten(1).cpu()
            newly_broken = state.broken_by.setdefault(name, [])
            for pos in (wrong & ok).nonzero().squeeze(1).tolist():
                newly_broken.append(batch[pos])
                state.adversarials[batch[pos]] = images[pos].clone()
            state.rejected[name] = state.rejected.get(name, 0) + int((wrong & ~ok).sum())
            self._charge(state, name, model, time.perf_counter() - began)
            state.queue_done += len(batch)
            done, total = state.queue_done, len(state.queue)
            if done == total:
                self._finish(state, name)
            report(name, done, total)
        if name not in state.finished:  # nothing left to attack
            self._finish(state, name)
            report(name, 0, 0)

    @staticmethod
    def _finish(state: AutoAttackState, name: str) -> None:
        state.finished.append(name)
        state.broken_by.setdefault(name, [])
        state.seconds.setdefault(name, 0.0)
        state.rejected.setdefault(name, 0)
        state.cost.setdefault(name, {"forward": 0, "backward": 0, "seconds": 0.0})
        state.queue, state.queue_done = [], 0

    def _result(self, state: AutoAttackState, x: torch.Tensor) -> AutoAttackResult:
        n = len(x)
        clean = torch.zeros(n, dtype=torch.bool)
        clean[state.clean_correct or []] = True
        robust = clean.clone()
        robust_after, broken_by = {}, {}
        for name in self.attack_names:
            broken = torch.zeros(n, dtype=torch.bool)
            broken[state.broken_by.get(name, [])] = True
            robust &= ~broken
            robust_after[name], broken_by[name] = robust.clone(), broken
        x_adv = x.detach().clone()
        has_adversarial = torch.zeros(n, dtype=torch.bool)
        for i, values in state.adversarials.items():
            x_adv[i] = values.to(dtype=x.dtype, device=x.device).view_as(x[i])
            has_adversarial[i] = True
        return AutoAttackResult(
            threat=self.threat,
            attacks=self.attack_names,
            clean_correct=clean,
            robust_after=robust_after,
            robust=robust,
            broken_by=broken_by,
            x_adv=x_adv,
            has_adversarial=has_adversarial,
            seconds=dict(state.seconds),
            rejected=dict(state.rejected),
            cost={stage: dict(cost) for stage, cost in state.cost.items()},
        )
