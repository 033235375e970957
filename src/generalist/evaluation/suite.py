"""The robustness evaluation suite: every attack under every threat model, per point.

An evaluation is a grid of *jobs* (one per threat model × attack). Each job yields a per-point
robust mask over the evaluated examples (robust = correctly classified clean *and* after the
attack), so every summary is exact set algebra on the same points:

* the worst case of a threat model is the AND of its attacks' masks (a point counts as robust
  only if no attack broke it), so it can never exceed any single attack's accuracy;
* the union over threat models is the AND of the worst cases (robust to all norms at once).

Long evaluations get killed, so the suite keeps a state file, rewritten atomically after every
batch of every job (AutoAttack: after every batch of every sub-attack). A rerun given the same
state file skips the finished work and, because the attacks seed every random draw of a point by
its index in the evaluation (APGD, FAB, Square; the others reseed per call on a fixed batch),
ends with exactly the masks an uninterrupted run would have produced. The same per-point seeding
makes the masks independent of the batch size, the order of the points and the number of
processes that share them (:mod:`generalist.evaluation.sharding`).

Every model pass is counted (``attacks.cost.CountingModel``), per attack and AutoAttack stage,
so the record states what an evaluation cost, not only what it found.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from generalist import backends
from generalist.attacks import (
    AutoAttack,
    AutoAttackProgress,
    AutoAttackResult,
    AutoAttackState,
    black_box_warning,
    check_black_box_beats_white_box,
    check_randomness,
    check_zero_gradients,
    create_attack,
    feasible,
)
from generalist.attacks.checks import (
    BLACK_BOX,
    MARGIN,
    check_cross_entropy_against_margin,
    cross_entropy_masking_warning,
    is_cross_entropy,
)
from generalist.attacks.cost import CountingModel, PassCount
from generalist.attacks.threat import ThreatModel
from generalist.data import ImageDataset, to_float
from generalist.durable import write_text_durably
from generalist.errors import ConfigError, cut
from generalist.inference import eval_mode, predicts_correctly

STATE_FORMAT = "generalist-eval-state/1"
AUTOATTACK = "autoattack"
AUTOATTACK_VERSIONS = {
    AUTOATTACK: "standard",
    f"{AUTOATTACK}-plus": "plus",
    f"{AUTOATTACK}-rand": "rand",
}
"""AutoAttack's versions by the name ``--attacks`` takes: the reference's standard, plus (more
restarts, untargeted APGD-DLR and FAB) and rand (EoT, for randomised defences)."""
CHECK_EXAMPLES = 64
"""Examples used by the once-per-model sanity checks (zero gradients, randomness)."""


def parse_attack_names(values: Sequence[str]) -> list[str]:
    """``["pgd-20,apgd-ce", "square"]`` → ``["pgd-20", "apgd-ce", "square"]`` (order kept)."""
    names: list[str] = []
    for value in values:
        for part in str(value).split(","):
            name = part.strip().lower()
            if name and name not in names:
                names.append(name)
    if not names:
        raise ConfigError("no attack given; use e.g. --attacks autoattack or --attacks pgd-20")
    return names


# --------------------------------------------------------------------------- results


@dataclass
class StageOutcome:
    """One sub-attack of AutoAttack: ``robust`` is the cumulative mask after it ran."""

    name: str
    robust: torch.Tensor
    seconds: float
    passes: PassCount = field(default_factory=PassCount)


@dataclass
class AttackOutcome:
    name: str
    parameters: dict[str, Any]
    robust: torch.Tensor
    """bool [N]: correct on the clean point and after this attack."""
    seconds: float
    stages: list[StageOutcome] = field(default_factory=list)
    rejected: int = 0
    """Adversarial examples outside the ε-ball or [0,1]: never counted as breaking a point."""
    passes: PassCount = field(default_factory=PassCount)
    """The model's forward and backward passes this attack spent (AutoAttack: all stages)."""


@dataclass
class ThreatOutcome:
    threat: ThreatModel
    clean: torch.Tensor
    attacks: list[AttackOutcome]
    warnings: list[str]

    @property
    def worst_case(self) -> torch.Tensor:
        """A point is robust only if it is right on the clean image and no attack broke it."""
        return _and(self.clean, [attack.robust for attack in self.attacks])


def _and(first: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """The per-point AND of ``first`` and every mask."""
    mask = first.clone()
    for other in masks:
        mask &= other
    return mask


@dataclass
class SuiteResult:
    clean: torch.Tensor
    clean_seconds: float
    threats: list[ThreatOutcome]
    warnings: list[str]
    """Model-level sanity warnings (zero gradients, randomness in the forward pass)."""
    clean_passes: PassCount = field(default_factory=PassCount)
    check_passes: PassCount = field(default_factory=PassCount)
    """What the once-per-model sanity checks cost."""

    @property
    def passes(self) -> PassCount:
        """Every pass of the evaluation: clean, checks and every attack of every threat."""
        attacks = [attack.passes for threat in self.threats for attack in threat.attacks]
        return total_passes([self.clean_passes, self.check_passes, *attacks])

    @property
    def n_examples(self) -> int:
        return int(self.clean.numel())

    @property
    def union(self) -> torch.Tensor:
        """Robust to every threat model at once: the AND of the per-threat worst cases."""
        return _and(self.clean, [outcome.worst_case for outcome in self.threats])


@dataclass(frozen=True)
class Progress:
    """Passed to ``on_progress`` after each state save (raising there stops the run cleanly).

    ``attack`` is ``"clean"`` or ``"checks"`` for the first passes and ``"autoattack/<stage>"``
    inside AutoAttack, whose ``total`` is the number of points that stage attacks.
    """

    threat: str
    attack: str
    done: int
    total: int


# --------------------------------------------------------------------------- state file


def encode_mask(mask: torch.Tensor) -> str:
    return "".join("1" if flag else "0" for flag in mask.tolist())


def decode_mask(text: str) -> torch.Tensor:
    return torch.tensor([char == "1" for char in text], dtype=torch.bool)


def _first_difference(saved: Any, now: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """``(dotted key, saved value, current value)`` of the first leaf that differs, if any."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for name in sorted(set(saved) | set(now), key=str):
            inner = _first_difference(
                saved.get(name), now.get(name), f"{key}.{name}" if key else str(name)[:60]
            )
            if inner:
                return inner
        return None
    return None if saved == now else (key, saved, now)


def _jobs_are_intact(jobs: Any) -> bool:
    """Every job as :meth:`SuiteState.job` writes it: a count done and a 0/1 mask string."""
    if not isinstance(jobs, dict):
        return False
    for job in jobs.values():
        if not isinstance(job, dict):
            return False
        done, robust = job.get("done", 0), job.get("robust", "")
        if not (isinstance(done, int) and isinstance(robust, str) and set(robust) <= {"0", "1"}):
            return False
        if done < 0 or not isinstance(job.get("autoattack", {}), dict):
            return False
    return True


class SuiteState:
    """The JSON state file; ``save`` rewrites it atomically so a kill never leaves it torn."""

    def __init__(self, path: Path | None, plan: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"format": STATE_FORMAT, "plan": plan, "jobs": {}}
        if path is not None and path.is_file():
            self._load(path, plan)

    def _load(self, path: Path, plan: dict[str, Any]) -> None:
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ConfigError(f"{path} is not a readable state file; start a new --out") from None
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise ConfigError(f"{path} is not a {STATE_FORMAT} state file; start a new --out")
        saved = data.get("plan", {})
        jobs = data.get("jobs")
        if not isinstance(saved, dict) or not _jobs_are_intact(jobs):
            raise ConfigError(f"{path} is a damaged state file; start a new --out")
        difference = _first_difference(saved, plan)
        if difference:
            key, there, now = difference
            raise ConfigError(
                f"{path} was written for a different evaluation ({key}: {cut(there)} there, "
                f"{cut(now)} now); rerun with the original options or a new --out"
            )
        self.data = data

    @property
    def jobs(self) -> dict[str, dict[str, Any]]:
        return self.data["jobs"]

    def job(self, key: str) -> dict[str, Any]:
        return self.jobs.setdefault(key, {"done": 0, "robust": "", "seconds": 0.0, "rejected": 0})

    def save(self) -> None:
        if self.path is not None:
            write_text_durably(self.path, json.dumps(self.data) + "\n")


def _plan_json(plan: dict[str, Any]) -> dict[str, Any]:
    """Normalise through JSON so a plan compares equal to the same plan read back from disk."""
    return json.loads(json.dumps(plan))


# --------------------------------------------------------------------------- the suite


class EvaluationSuite:
    """Runs ``attacks`` under each of ``threats`` and keeps per-point results.

    Attack names are those of :func:`generalist.attacks.list_attacks` plus ``autoattack``
    (AutoAttack *standard*), ``autoattack-plus`` and ``autoattack-rand``. Every attack object is
    built here, so an unknown name or an unsupported threat/attack pair fails before any compute.
    """

    def __init__(
        self,
        threats: Sequence[ThreatModel | str],
        attacks: Sequence[str],
        *,
        seed: int = 0,
        batch_size: int = 500,
        n_iter: int | None = None,
        progress: bool = False,
    ) -> None:
        if not threats:
            raise ConfigError("no threat model given; use e.g. --threat Linf:8/255")
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
        if n_iter is not None and n_iter < 1:
            raise ConfigError(f"--n-iter must be at least 1, got {n_iter}")
        self.threats = [ThreatModel.parse(t) for t in threats]
        if len({str(t) for t in self.threats}) != len(self.threats):
            raise ConfigError("the same threat model is given twice; list each one once")
        self.attack_names = parse_attack_names(attacks)
        self.seed = seed
        self.batch_size = batch_size
        self.n_iter = n_iter
        self.progress = progress
        self.attacks = {
            (str(threat), name): _build_attack(name, threat, seed=seed, n_iter=n_iter)
            for threat in self.threats
            for name in self.attack_names
        }

    def plan(self, n_examples: int) -> dict[str, Any]:
        """What the per-point results depend on; a state file is only resumed if it matches."""
        return _plan_json(
            {
                "threats": [str(t) for t in self.threats],
                "attacks": {f"{t} {n}": a.describe() for (t, n), a in self.attacks.items()},
                "seed": self.seed,
                "batch_size": self.batch_size,
                "n_examples": n_examples,
            }
        )

    def full_plan(self, n_examples: int, identity: dict[str, Any] | None) -> dict[str, Any]:
        """:meth:`plan` with the ``identity`` of model and data, as the state file holds it."""
        return _plan_json({**self.plan(n_examples), **(identity or {})})

    def run(
        self,
        model: nn.Module,
        data: ImageDataset,
        *,
        state_path: Path | None = None,
        identity: dict[str, Any] | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        device: torch.device | str = "cpu",
        indices: torch.Tensor | None = None,
        model_checks: bool = True,
    ) -> SuiteResult:
        """Evaluate ``model`` on ``data``, resuming from ``state_path`` if it exists.

        ``identity`` (model and data hashes, split...) joins the plan, so resuming with another
        model or other data is refused instead of silently mixing results. ``indices`` are the
        points' places in the whole evaluation (default ``0..N-1``): the attacks seed each
        point's random draws by it, so a shard of a larger evaluation, or the points in another
        order, get the same per-point results. ``model_checks=False`` leaves the once-per-model
        sanity checks to the caller (shards: the merge runs them once, on the whole data).
        """
        if len(data) == 0:
            raise ConfigError("there are no examples to evaluate; raise --n-examples")
        indices = torch.arange(len(data)) if indices is None else indices.cpu().long()
        if indices.shape != (len(data),) or len(set(indices.tolist())) != len(data):
            raise ConfigError(f"indices must be {len(data)} distinct point numbers, one per point")
        state = SuiteState(state_path, self.full_plan(len(data), identity))
        runner = _Runner(
            self, model, data, state, on_progress, torch.device(device), indices, model_checks
        )
        with eval_mode(model, freeze=True), backends.for_evaluation():  # never TF32 in a figure
            return runner.run()


class _Runner:
    """One execution of a suite: holds the data, the state and the progress reporting."""

    def __init__(
        self,
        suite: EvaluationSuite,
        model: nn.Module,
        data: ImageDataset,
        state: SuiteState,
        on_progress: Callable[[Progress], None] | None,
        device: torch.device,
        indices: torch.Tensor,
        model_checks: bool,
    ) -> None:
        self.suite = suite
        self.model = model
        self.x = to_float(data.images.cpu())
        self.y = data.labels.cpu()
        self.indices = indices
        self.model_checks = model_checks
        if device.type == "cuda":  # page-locked, so each batch's copy runs without a stall
            self.x, self.y = self.x.pin_memory(), self.y.pin_memory()
        self.state = state
        self.on_progress = on_progress
        self.device = device

    @property
    def n(self) -> int:
        return len(self.y)

    def _saved(self, threat: str, attack: str, done: int, total: int | None = None) -> None:
        self.state.save()
        if self.on_progress is not None:
            self.on_progress(Progress(threat, attack, done, self.n if total is None else total))

    def _bar(self, desc: str, initial: int) -> tqdm:
        return tqdm(
            total=self.n,
            initial=initial,
            desc=desc,
            unit="img",
            disable=not self.suite.progress,
            dynamic_ncols=True,
            leave=True,
        )

    def run(self) -> SuiteResult:
        clean, clean_seconds, clean_passes = self._clean()
        warnings, check_passes = self._model_checks(clean)
        threats = []
        for threat in self.suite.threats:
            outcomes = [self._job(threat, name, clean) for name in self.suite.attack_names]
            threat_warnings = [w for o in outcomes for w in _job_warnings(threat, o)]
            threat_warnings += [
                w
                for n in self.suite.attack_names
                for w in self.state.jobs.get(f"{threat} {n}", {}).get("warnings", [])
            ]
            threat_warnings += _black_box_warnings(outcomes, clean)
            threat_warnings += _cross_entropy_warnings(outcomes, clean)
            threats.append(ThreatOutcome(threat, clean, outcomes, threat_warnings))
        return SuiteResult(clean, clean_seconds, threats, warnings, clean_passes, check_passes)

    def _clean(self) -> tuple[torch.Tensor, float, PassCount]:
        saved = self.state.data.get("clean")
        if saved is not None:
            passes = passes_of(saved.get("passes"))
            return decode_mask(saved["correct"]), saved["seconds"], passes
        start, counted = time.perf_counter(), CountingModel(self.model)
        correct = torch.cat(
            [
                predicts_correctly(
                    counted,
                    xb.to(self.device, non_blocking=True),
                    yb.to(self.device, non_blocking=True),
                ).cpu()
                for xb, yb in zip(
                    self.x.split(self.suite.batch_size),
                    self.y.split(self.suite.batch_size),
                    strict=True,
                )
            ]
        )
        seconds = time.perf_counter() - start
        self.state.data["clean"] = {
            "correct": encode_mask(correct),
            "seconds": seconds,
            "passes": passes_dict(counted.count),
        }
        self._saved("", "clean", self.n)
        return correct, seconds, counted.count

    def _model_checks(self, clean: torch.Tensor) -> tuple[list[str], PassCount]:
        """AutoAttack's sanity checks on the model itself, run once (they cost passes too)."""
        if not self.model_checks:
            return [], PassCount()
        if "checks" not in self.state.data:
            counted = CountingModel(self.model)
            idx = clean.nonzero().squeeze(1)[:CHECK_EXAMPLES]
            if idx.numel() == 0:
                idx = torch.arange(min(CHECK_EXAMPLES, self.n))
            x, y = (
                self.x[idx].to(self.device, non_blocking=True),
                self.y[idx].to(self.device, non_blocking=True),
            )
            found = check_zero_gradients(counted, x, y) + check_randomness(counted, x)
            self.state.data["checks"] = list(found)
            self.state.data["check_passes"] = passes_dict(counted.count)
            self._saved("", "checks", self.n)
        passes = passes_of(self.state.data.get("check_passes"))
        return list(self.state.data["checks"]), passes

    def _job(self, threat: ThreatModel, name: str, clean: torch.Tensor) -> AttackOutcome:
        attack = self.suite.attacks[(str(threat), name)]
        key = f"{threat} {name}"
        if isinstance(attack, AutoAttack):
            return self._autoattack(key, name, threat, attack, clean)
        job = self.state.job(key)
        robust = decode_mask(job["robust"])
        with self._bar(key, job["done"]) as bar:
            for start in range(job["done"], self.n, self.suite.batch_size):
                stop = min(start + self.suite.batch_size, self.n)
                began = time.perf_counter()
                survived, rejected, spent = self._attack_batch(threat, attack, clean, start, stop)
                robust = torch.cat([robust, survived])
                passes = total_passes([passes_of(job.get("passes")), spent])
                job.update(
                    done=stop,
                    robust=encode_mask(robust),
                    seconds=job["seconds"] + time.perf_counter() - began,
                    rejected=job["rejected"] + rejected,
                    passes=passes_dict(passes),
                )
                self._saved(str(threat), name, stop)
                bar.update(stop - start)
        return AttackOutcome(
            name,
            attack.describe(),
            robust,
            job["seconds"],
            rejected=job["rejected"],
            passes=passes_of(job.get("passes")),
        )

    def _attack_batch(
        self, threat: ThreatModel, attack: Any, clean: torch.Tensor, start: int, stop: int
    ) -> tuple[torch.Tensor, int, PassCount]:
        """Attack the clean-correct points of ``[start, stop)``: (robust mask, rejected, passes
        of the attack and of the check of its output)."""
        survived = clean[start:stop].clone()
        idx = survived.nonzero().squeeze(1) + start
        counted = CountingModel(self.model)
        if idx.numel() == 0:
            return survived, 0, counted.count
        x, y = (
            self.x[idx].to(self.device, non_blocking=True),
            self.y[idx].to(self.device, non_blocking=True),
        )
        per_point = {"indices": self.indices[idx].to(self.device)} if _takes_indices(attack) else {}
        x_adv = attack(counted, x, y, **per_point)
        bad = ~feasible(threat, x, x_adv)
        still_right = predicts_correctly(counted, x_adv, y) | bad
        survived[idx - start] = still_right.cpu()
        return survived, int(bad.sum()), counted.count

    def _autoattack(
        self, key: str, name: str, threat: ThreatModel, attack: AutoAttack, clean: torch.Tensor
    ) -> AttackOutcome:
        """AutoAttack keeps its own resumable state; it is stored inside the suite's file.

        It starts from the suite's clean pass (same model, mode and batches, so the same mask)
        instead of classifying every point again for each threat model."""
        job = self.state.jobs.setdefault(key, {})
        saved = job.get("autoattack")
        if saved is None:
            aa_state = attack.new_state(self.n)
            aa_state.clean_correct = clean.nonzero().squeeze(1).tolist()
        else:
            aa_state = AutoAttackState.from_dict(saved)
        bars: dict[str, tqdm] = {}

        def saved_progress(progress: AutoAttackProgress) -> None:
            job["autoattack"] = progress.state.to_dict()
            stage = f"{name}/{progress.attack}"
            self._saved(str(threat), stage, progress.done, progress.total)
            if progress.attack == "clean":
                return
            if progress.attack not in bars:
                bars[progress.attack] = self._bar(f"{threat} {stage}", 0)
            bar = bars[progress.attack]
            bar.total = progress.total
            bar.update(progress.done - bar.n)

        try:
            result = attack.run(
                self.model,
                self.x.to(self.device, non_blocking=True),
                self.y.to(self.device, non_blocking=True),
                indices=self.indices.to(self.device),
                state=aa_state,
                on_progress=saved_progress,
                batch_size=self.suite.batch_size,
            )
        finally:
            for bar in bars.values():
                bar.close()
        job["warnings"] = check_black_box_beats_white_box(result)
        job["warnings"] += check_cross_entropy_against_margin(result)
        return _autoattack_outcome(name, attack, result)


def _autoattack_outcome(name: str, attack: AutoAttack, result: AutoAttackResult) -> AttackOutcome:
    """The suite's outcome of a finished AutoAttack: its robust mask, and one stage per
    attack of its sequence with the points still robust after it."""
    stages = [
        StageOutcome(
            stage,
            result.robust_after[stage].cpu(),
            result.seconds.get(stage, 0.0),
            passes_of(result.cost.get(stage)),
        )
        for stage in result.attacks
    ]
    total = total_passes([passes_of(cost) for cost in result.cost.values()])
    return AttackOutcome(
        name,
        attack.describe(),
        result.robust.cpu(),
        sum(result.seconds.values()),
        stages=stages,
        rejected=sum(result.rejected.values()),
        passes=total,
    )


def passes_of(saved: dict[str, Any] | None) -> PassCount:
    """The passes a state file holds (none before anything was counted)."""
    saved = saved or {}
    return PassCount(int(saved.get("forward", 0)), int(saved.get("backward", 0)))


def passes_dict(passes: PassCount) -> dict[str, int]:
    return {"forward": passes.forward, "backward": passes.backward}


def total_passes(counts: Sequence[PassCount]) -> PassCount:
    return PassCount(sum(c.forward for c in counts), sum(c.backward for c in counts))


def _takes_indices(attack: Any) -> bool:
    """Whether the attack seeds its draws by the points' global indices (an attack without
    randomness, or a user's plug-in, may not take them)."""
    return "indices" in inspect.signature(attack).parameters


def _build_attack(name: str, threat: ThreatModel, *, seed: int, n_iter: int | None) -> Any:
    if name in AUTOATTACK_VERSIONS:
        iterations = {} if n_iter is None else {"n_iter": n_iter}
        return AutoAttack(threat, version=AUTOATTACK_VERSIONS[name], seed=seed, **iterations)
    try:
        return create_attack(name, threat, seed=seed, n_iter=n_iter)
    except ConfigError as exc:
        if str(exc).startswith("unknown attack"):
            raise ConfigError(f"{exc}, or {', '.join(AUTOATTACK_VERSIONS)}") from None
        raise


def _job_warnings(threat: ThreatModel, outcome: AttackOutcome) -> list[str]:
    if not outcome.rejected:
        return []
    return [
        f"{outcome.name} returned {outcome.rejected} adversarial examples outside the {threat} "
        "ball or [0,1]; they were not counted as broken (an attack bug: please report it)"
    ]


def _cross_entropy_warnings(outcomes: list[AttackOutcome], clean: torch.Tensor) -> list[str]:
    """Points only the margin attacks of a hand-picked list (``apgd-ce,apgd-t``) broke."""
    plain = [o for o in outcomes if not o.stages]
    ce = [o for o in plain if is_cross_entropy(o.name)]
    margin = [o for o in plain if o.name in MARGIN]
    if not ce or not margin:
        return []
    survived_ce, broken_by_margin = _missed_and_broken(clean, ce, margin)
    only_margin = int((survived_ce & broken_by_margin).sum())
    broken_by_ce = int((clean & ~survived_ce).sum())
    return cross_entropy_masking_warning(only_margin, broken_by_ce, len(clean))


def _black_box_warnings(outcomes: list[AttackOutcome], clean: torch.Tensor) -> list[str]:
    """Points a black-box attack (Square) broke that every white-box attack in the list missed.

    AutoAttack checks its own stages; this covers a hand-picked list such as ``pgd-20,square``.
    """
    plain = [o for o in outcomes if not o.stages]
    black = [o for o in plain if o.name in BLACK_BOX]
    white = [o for o in plain if o.name not in BLACK_BOX]
    if not black or not white:
        return []
    missed_by_white, broken_by_black = _missed_and_broken(clean, white, black)
    return black_box_warning(int((missed_by_white & broken_by_black).sum()), len(clean))


def _missed_and_broken(
    clean: torch.Tensor, missing: list[AttackOutcome], breaking: list[AttackOutcome]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean points every ``missing`` attack left robust, points any ``breaking`` one broke)."""
    missed = clean.clone()
    for outcome in missing:
        missed &= outcome.robust
    broken = torch.zeros_like(clean)
    for outcome in breaking:
        broken |= ~outcome.robust
    return missed, broken
