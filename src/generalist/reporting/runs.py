"""Run directories read back as data: config, per-epoch metrics, summary and evaluations.

Reports are read long after training, from runs that are still going, were killed, or were
written by an older version, so nothing here builds a validated Config or insists on every
file: the config is read as plain YAML and the few fields a report needs fall back to their
defaults. Only what no report can do without (the folder and at least one epoch of metrics)
stops the command, with one line naming the run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from generalist.attacks.threat import ThreatModel
from generalist.errors import ConfigError, GeneralistError
from generalist.evaluation.api import RECORD_FILE
from generalist.evaluation.records import RECORD_FORMAT
from generalist.evaluation.suite import AUTOATTACK
from generalist.plain_yaml import load_plain_yaml
from generalist.reporting.run_files import (
    CONFIG,
    METRICS_RECORD,
    SUMMARY,
    evaluation_problem,
    problem,
)
from generalist.rundir import RunDir

GLOBAL = "global"
CLEAN = "clean"
RUN_HINT = "pass the folder that `generalist train` printed after 'run'"
ThreatKey = tuple[str, float] | str


@dataclass(frozen=True)
class Evaluation:
    """One ``generalist eval`` record (``eval.json``) found in the run directory."""

    path: Path
    record: dict[str, Any]

    @property
    def attacks(self) -> list[str]:
        return list(self.record["settings"]["attacks"])

    @property
    def split(self) -> str:
        return self.record["data"]["split"]


@dataclass(frozen=True)
class ThreatResult:
    threat: str
    attacks: dict[str, float]
    """Accuracy (%) under each attack: the evaluation's attacks, or ``PGD-k`` of the summary."""
    worst_case: float


@dataclass(frozen=True)
class FinalResults:
    """A run's final test-set accuracies (%): from its newest evaluation of the test split if it
    has one (stronger attacks, per-point worst case and union), else from ``summary.json``."""

    source: str
    """``eval`` or ``summary``."""
    robust_by: str
    """What the robust numbers come from: ``AutoAttack`` (when it was among the evaluated
    attacks, whose worst case then is at most AutoAttack's), the attacks, or ``PGD-k``."""
    n_examples: int
    clean: float
    threats: list[ThreatResult]
    union: float | None
    """Robust to every threat at once; only an evaluation's per-point results give it."""
    model: str = "last"
    """Which of the run's models: ``last`` (``model.safetensors``), ``best`` (selected on
    validation, ``model-best.safetensors``) or ``file`` (weights evaluated from elsewhere)."""

    @property
    def is_autoattack(self) -> bool:
        return self.robust_by == "AutoAttack"

    def threat(self, key: ThreatKey) -> ThreatResult | None:
        """The result for the threat with :func:`threat_key` ``key``, if this run has one."""
        return next((t for t in self.threats if threat_key(t.threat) == key), None)

    def describe(self) -> str:
        origin = "generalist eval" if self.source == "eval" else "training summary"
        return f"{self.robust_by}, {self.n_examples} test points ({origin}, {self.model} model)"


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    evaluations: list[Evaluation]
    """Oldest first."""
    warnings: list[str] = field(default_factory=list)
    """Problems that were skipped over (a torn metrics line, an unreadable eval.json)."""

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.path.name)

    @property
    def preset(self) -> str | None:
        return self.config.get("preset") or (self.summary or {}).get("preset")

    @property
    def dataset(self) -> str | None:
        return (self.config.get("data") or {}).get("dataset")

    @property
    def epochs(self) -> int:
        return int(self.config.get("epochs") or self.metrics[-1]["epoch"])

    @property
    def validates_learners(self) -> bool:
        """Whether base learners were validated each epoch (config ``eval.learners``)."""
        return bool((self.config.get("eval") or {}).get("learners", True))

    @property
    def val_steps(self) -> int | None:
        return (self.config.get("eval") or {}).get("val_steps")

    @property
    def finished(self) -> bool:
        return self.summary is not None

    def final_results(self) -> FinalResults | None:
        """``None`` while the run is unfinished and unevaluated (an evaluation of the
        corruptions alone has no threat models: it does not count here)."""
        tested = [e for e in self.evaluations if e.split == "test" and e.record["threats"]]
        if tested:
            return _from_evaluation(tested[-1])
        if self.summary is not None:
            return _from_summary(self.summary)
        return None

    @property
    def corruptions(self) -> dict[str, Any] | None:
        """The ``corruptions`` section of the newest test-split evaluation that has one."""
        found = [e for e in self.evaluations if e.split == "test" and "corruptions" in e.record]
        return found[-1].record["corruptions"] if found else None


def _from_evaluation(evaluation: Evaluation) -> FinalResults:
    record = evaluation.record
    attacks = evaluation.attacks
    if AUTOATTACK in attacks:
        robust_by = "AutoAttack"
    else:
        robust_by = attacks[0] if len(attacks) == 1 else "worst of " + ", ".join(attacks)
    threats = [
        ThreatResult(
            threat=entry["threat"],
            attacks={a["name"]: a["accuracy"] for a in entry["attacks"]},
            worst_case=entry["worst_case"]["accuracy"],
        )
        for entry in record["threats"]
    ]
    return FinalResults(
        source="eval",
        robust_by=robust_by,
        n_examples=record["data"]["n_examples"],
        clean=record["clean"]["accuracy"],
        threats=threats,
        union=record["union"]["accuracy"] if len(threats) > 1 else None,
        model=_which_model(record["model"]),
    )


def _which_model(model: dict[str, Any]) -> str:
    """``last``/``best`` as the record says; records written before ``--model`` existed
    evaluated ``model.safetensors`` of a run, or a file given directly."""
    if model.get("which"):
        return str(model["which"])
    return "last" if Path(str(model.get("path", ""))).name == "model.safetensors" else "file"


def _from_summary(summary: dict[str, Any]) -> FinalResults:
    steps = summary.get("test_pgd_steps")
    attack = f"PGD-{steps}" if steps is not None else "PGD"
    test = summary["test"]
    threats = [
        ThreatResult(threat=name, attacks={attack: value}, worst_case=value)
        for name, value in test.items()
        if name != CLEAN
    ]
    return FinalResults(
        source="summary",
        robust_by=attack,
        n_examples=summary.get("test_examples", 0),
        clean=test[CLEAN],
        threats=threats,
        union=None,
    )


# --------------------------------------------------------------------------- loading


class DamagedRunError(ConfigError):
    """A run folder holds a file no report can read (its message names the file)."""


def load_runs(paths: Sequence[str | Path], skipped: list[str] | None = None) -> list[Run]:
    """Every run named; a folder that is not a run itself stands for the runs directly in it
    (so ``generalist compare runs/`` works).

    With ``skipped``, a damaged run (:class:`DamagedRunError`) is left out and its one-line
    reason appended there, so the others are still reported; without, it raises.
    """
    if not paths:
        raise ConfigError(f"no run directories given; {RUN_HINT}")
    found: dict[Path, None] = {}
    for path in map(Path, paths):
        for run_dir in _run_dirs(path):
            found.setdefault(run_dir.resolve(), None)
    runs = []
    for path in found:
        try:
            runs.append(load_run(path))
        except DamagedRunError as damaged:
            if skipped is None:
                raise
            skipped.append(f"skipped {path}: {damaged}")
    if not runs:
        reasons = "; ".join(skipped or [])
        raise ConfigError(f"no run could be read ({reasons[:600]}); {RUN_HINT}")
    return runs


def _run_dirs(path: Path) -> list[Path]:
    if not path.exists():
        raise ConfigError(f"{path} does not exist; {RUN_HINT}")
    if (path / "config.yaml").is_file():
        return [path]
    inside = (
        sorted(p for p in path.iterdir() if (p / "config.yaml").is_file()) if path.is_dir() else []
    )
    if not inside:
        RunDir.open(path, lock=False)  # raises its one-line "not a run directory" error
    return inside


def load_run(path: str | Path) -> Run:
    """One run folder, every file checked against what reports read (:mod:`.run_files`).

    A torn metrics line or a damaged ``eval.json`` is left out with a warning; a config or
    summary that is not what a run writes raises :class:`DamagedRunError` naming the file.
    """
    run_dir = RunDir.open(path, lock=False)  # reading a run that still trains is fine
    warnings: list[str] = []
    config = _read_yaml_mapping(run_dir.config_path, warnings)
    _require_fit(config, CONFIG, run_dir.config_path)
    metrics = _read_metrics(run_dir.metrics_path, warnings)
    if not metrics:
        raise DamagedRunError(
            f"{run_dir.path} has no metrics yet (no epoch has finished); report on it after "
            "its first epoch"
        )
    summary = None
    if run_dir.summary_path.exists():
        summary = _read_json(run_dir.summary_path, warnings)
        if summary is None:
            raise DamagedRunError(f"{run_dir.summary_path} is not readable JSON")
        _require_fit(summary, SUMMARY, run_dir.summary_path)
    evaluations = []
    for record_path in sorted(run_dir.path.glob(f"*/{RECORD_FILE}")):
        record = _read_json(record_path, warnings)
        if record is None:
            continue
        if record.get("format") != RECORD_FORMAT:
            warnings.append(f"{record_path} is not a {RECORD_FORMAT} record; left it out")
            continue
        damage = evaluation_problem(record)
        if damage:
            warnings.append(f"{record_path} is damaged ({_cut(damage)}); left it out")
            continue
        evaluations.append(Evaluation(record_path, record))
    evaluations.sort(key=lambda e: (e.record.get("created", ""), str(e.path)))
    return Run(run_dir.path, config, metrics, summary, evaluations, warnings)


def _read_metrics(path: Path, warnings: list[str]) -> list[dict[str, Any]]:
    """Every intact epoch line. A line that is not one is skipped with a warning rather than
    failing the report: the loop appends lines as epochs end, so a run killed mid-write leaves
    a torn last line, and the report of exactly such a run is the one most wanted."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or problem(record, METRICS_RECORD):
            warnings.append(f"{path}:{number} is not a metrics record; skipped that line")
            continue
        records.append(record)
    return records


def _require_fit(data: Any, schema: Any, path: Path) -> None:
    found = problem(data, schema)
    if found:
        raise DamagedRunError(f"{path} is damaged ({_cut(found)}); fix or remove it")


def _cut(text: str) -> str:
    return text if len(text) <= 160 else text[:159] + "…"


def _read_json(path: Path, warnings: list[str]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        warnings.append(f"{path} is not readable JSON; left it out")
        return None
    return data


def _read_yaml_mapping(path: Path, warnings: list[str]) -> dict[str, Any]:
    try:
        data = load_plain_yaml(path.read_text(), str(path))
    except (OSError, UnicodeDecodeError, ConfigError):
        data = None
    if not isinstance(data, dict):
        warnings.append(f"{path} is not a readable config; the report uses defaults for it")
        return {}
    return data


def run_labels(runs: Sequence[Run]) -> list[str]:
    """Short unique names: the run's name where no other run shares it, else its folder."""
    names = [run.name for run in runs]
    folders = [run.path.name for run in runs]
    labels = []
    for run, name, folder in zip(runs, names, folders, strict=True):
        if names.count(name) == 1:
            labels.append(name)
        elif folders.count(folder) == 1:
            labels.append(folder)
        else:
            labels.append(f"{run.path.parent.name}/{folder}")
    return labels


def threat_key(text: str) -> ThreatKey:
    """Threats match by norm and ε value, so ``Linf:8/255`` and ``Linf:0.031373`` agree."""
    try:
        threat = ThreatModel.parse(text)
    except GeneralistError:
        return text
    return threat.norm, round(threat.eps, 6)


def threat_names(results: Sequence[FinalResults]) -> dict[ThreatKey, str]:
    """Every threat any of ``results`` reports, in first-seen order, as written first."""
    names: dict[ThreatKey, str] = {}
    for result in results:
        for threat in result.threats:
            names.setdefault(threat_key(threat.threat), threat.threat)
    return names
