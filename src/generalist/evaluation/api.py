"""Evaluation from Python: :func:`evaluate` on any model and tensors, :func:`run_eval` on saved
weights (what ``generalist eval`` calls), both returning per-threat robust accuracies.

Both run the same :class:`~generalist.evaluation.suite.EvaluationSuite`: the model is attacked
in eval mode and handed back in the mode it had, the sanity checks (zero gradients, randomness
in the forward pass, black-box beating white-box, cross-entropy masking) run and their warnings
are raised as Python warnings and kept in the table, and with ``out`` the same folder as the
command line's is written (``eval.json``, ``results.md``, ``model_info.json``, ``state.json``).
``corruptions`` adds the common-corruptions track (:mod:`generalist.evaluation.corruptions`,
loaded only then), beside the attacks or, with no threat models asked, alone.

Errors name the parameters of these functions; the command line checks its flags itself.
``request.json`` holds a folder's resolved settings, so ``generalist eval --resume DIR``
needs nothing else. :func:`run_eval` under torchrun evaluates one shard of the points per
rank and rank 0 writes the one folder (:mod:`generalist.evaluation.sharding`);
:func:`evaluate` runs in one process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from generalist.attacks.threat import ThreatModel
from generalist.compiling import compile_in_place
from generalist.data import ImageDataset
from generalist.data.readers import as_array
from generalist.devices import resolve_device
from generalist.errors import CheckpointError, ConfigError, DataError, cut
from generalist.evaluation.sharding import (
    SHARD_FOLDER,
    Processes,
    check_resumable,
    evaluation_processes,
    holds_evaluation,
    run_sharded,
)
from generalist.evaluation.suite import AUTOATTACK, EvaluationSuite, Progress, SuiteResult
from generalist.runlock import lock_folder
from generalist.threads import apply_threads
from generalist.torchrun import is_rank_zero, said_by_rank_zero

if TYPE_CHECKING:
    from generalist.evaluation.corruptions import CorruptionOutcome

STATE_FILE = "state.json"
CORRUPTIONS_STATE_FILE = "corruptions-state.json"
"""A folder holding either one is an evaluation, which ``resume`` continues."""
RECORD_FILE = "eval.json"
TABLES_FILE = "results.md"
REQUEST_FILE = "request.json"
DEFAULT_BATCH = 500
MODEL_CHOICES = ("last", "best")
SPLITS = ("test", "val")


# --------------------------------------------------------------------------- the result


class ThreatAccuracies(Mapping[str, float]):
    """Robust accuracy (%) per threat model; looked up by any spelling of the threat
    (``"Linf:8/255"``, ``"linf:0.03137"``)."""

    def __init__(self, accuracies: dict[str, float]) -> None:
        self._accuracies = accuracies

    def __getitem__(self, threat: str) -> float:
        try:
            key = str(ThreatModel.parse(threat))
        except ConfigError:
            key = threat
        if key not in self._accuracies:
            raise KeyError(f"{threat!r}: evaluated threats are {', '.join(self._accuracies)}")
        return self._accuracies[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._accuracies)

    def __len__(self) -> int:
        return len(self._accuracies)

    def __repr__(self) -> str:
        return repr(self._accuracies)


@dataclass(frozen=True)
class CorruptionAccuracies:
    """Accuracy (%) under common corruptions: ``mean`` over every corruption × severity cell
    (RobustBench's number), ``per_corruption[name]`` over its five severities, ``cells[(name,
    severity)]``; ``section`` is ``eval.json``'s ``corruptions`` entry (source, what is left out,
    relative to clean)."""

    mean: float
    mean_relative_to_clean: float | None
    per_corruption: dict[str, float]
    cells: dict[tuple[str, int], float]
    left_out: dict[str, str]
    section: dict[str, Any]

    @classmethod
    def from_section(cls, section: dict[str, Any]) -> CorruptionAccuracies:
        return cls(
            mean=section["mean"],
            mean_relative_to_clean=section["mean_relative_to_clean"],
            per_corruption={k: v["accuracy"] for k, v in section["per_corruption"].items()},
            cells={(c["corruption"], c["severity"]): c["accuracy"] for c in section["cells"]},
            left_out=dict(section["left_out"]),
            section=section,
        )


@dataclass(frozen=True)
class EvalTable:
    """The outcome of one evaluation, in percent of ``n_examples``.

    ``robust_accuracy[threat]`` is a threat model's worst case over every attack run (a point
    counts only if no attack broke it); ``union`` is robust to all threat models at once.
    ``record`` is the full ``eval.json`` record; ``str(table)`` renders ``results.md``.
    """

    clean_accuracy: float
    robust_accuracy: ThreatAccuracies
    union: float
    n_examples: int
    warnings: list[str]
    record: dict[str, Any]
    folder: Path | None = None
    """Where the evaluation's files were written (``out``), else None."""
    corruptions: CorruptionAccuracies | None = None
    """The common-corruptions track's results, when ``corruptions`` was given."""

    @classmethod
    def from_record(cls, record: dict[str, Any], folder: Path | None) -> EvalTable:
        threat_warnings = [w for entry in record["threats"] for w in entry["warnings"]]
        section = record.get("corruptions")
        return cls(
            clean_accuracy=record["clean"]["accuracy"],
            robust_accuracy=ThreatAccuracies(
                {entry["threat"]: entry["worst_case"]["accuracy"] for entry in record["threats"]}
            ),
            union=record["union"]["accuracy"],
            n_examples=record["data"]["n_examples"],
            warnings=[*record["warnings"], *threat_warnings],
            record=record,
            folder=folder,
            corruptions=None if section is None else CorruptionAccuracies.from_section(section),
        )

    def __str__(self) -> str:
        from generalist.evaluation.tables import render_markdown

        return render_markdown(self.record)


# --------------------------------------------------------------------------- shared checks


def _at_least_one(value: int | None, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} {cut(value)}: must be a whole number of at least 1")


def _suite(
    threats: Sequence[str | ThreatModel],
    attacks: Sequence[str],
    *,
    seed: int,
    batch_size: int,
    n_iter: int | None,
    progress: bool,
) -> EvaluationSuite:
    if isinstance(threats, str | ThreatModel):
        threats = [threats]  # one threat given bare, not as a list
    if not threats:
        raise ConfigError("threats: give at least one threat model, e.g. ['Linf:8/255']")
    if isinstance(attacks, str):
        attacks = [attacks]
    _at_least_one(batch_size, "batch_size")
    _at_least_one(n_iter, "n_iter")
    return EvaluationSuite(
        threats, attacks, seed=seed, batch_size=batch_size, n_iter=n_iter, progress=progress
    )


def _raise_warnings(table: EvalTable) -> None:
    for message in table.warnings:
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------- any model


def evaluate(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    *,
    threats: Sequence[str | ThreatModel] = (),
    attacks: Sequence[str] = (AUTOATTACK,),
    corruptions: str | None = None,
    batch_size: int = DEFAULT_BATCH,
    n_iter: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    out: str | Path | None = None,
    progress: bool = False,
) -> EvalTable:
    """Attack ``model`` on ``x, y`` under every threat model; AutoAttack standard by default.

    ``corruptions``: also score common corruptions of ``x`` (``"generated"``, or a CIFAR-C /
    ImageNet-C folder whose images are ``x``'s), in ``table.corruptions``; with no ``threats``
    only them.

    ``x``: images (N, C, H, W) as uint8 or float in [0, 1] (floats are evaluated as their
    8-bit values; a warning says when that changes them), ``y``: N class indices. ``device``
    defaults to the model's. The model is attacked in eval mode and handed back in its own
    mode. With ``out`` the evaluation's folder is written there, and a folder holding an
    unfinished evaluation of the same model, data and settings is continued. It runs in this
    one process, also under torchrun (every rank would evaluate every point); sharding over
    processes is :func:`run_eval`'s, on saved weights (``generalist eval --nproc N``).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch nn.Module, got a {type(model).__name__}")
    started = time.perf_counter()
    _at_least_one(batch_size, "batch_size")
    suite = None  # with corruptions and no threats: the corruption track alone
    if threats or not corruptions:
        suite = _suite(
            threats, attacks, seed=seed, batch_size=batch_size, n_iter=n_iter, progress=progress
        )
    subject = _given_subject(model, x, y, device)
    folder = None if out is None else _claim(Path(out), "a separate evaluation needs its own out")
    arguments = {"threats": [str(t) for t in threats], "corruptions": corruptions}
    record = _score_in_process(
        suite,
        subject,
        folder,
        corruptions,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
        settings=_settings(subject.device, seed, 1, arguments),
        started=started,
    )
    table = EvalTable.from_record(record, folder)
    _raise_warnings(table)
    return table


@dataclass(frozen=True)
class _Subject:
    """What one evaluation scores: the model on its device and the points, described for
    ``eval.json``, and the identity a state file must have been written for to be resumed."""

    model: nn.Module
    data: ImageDataset
    device: torch.device
    model_meta: dict[str, Any]
    """``eval.json``'s ``model`` section."""
    data_meta: dict[str, Any]
    """``eval.json``'s ``data`` section."""
    identity: dict[str, Any]


def _given_subject(model: nn.Module, x: Any, y: Any, device: str | torch.device | None) -> _Subject:
    """:func:`evaluate`'s model and arrays, checked, on the given device (else the model's)."""
    data = _given_data(x, y)
    run_device = torch.device(device) if device is not None else _device_of(model)
    model_hash = _state_sha256(model)
    data_meta = {
        "dataset": "given tensors",
        "split": "given",
        "fingerprint": data.fingerprint(),
        "num_classes": None,
        "image_shape": list(data.images.shape[1:]),
    }
    model_meta = {
        "path": f"<{type(model).__name__} in Python>",
        "which": None,
        "selected": None,
        "sha256": model_hash,
        "architecture": type(model).__name__,
        "spec": None,
        "trained_on": None,
    }
    identity = {"model_sha256": model_hash, "data_fingerprint": data_meta["fingerprint"]}
    return _Subject(model, data, run_device, model_meta, data_meta, identity)


def _score_in_process(
    suite: EvaluationSuite | None,
    subject: _Subject,
    folder: Path | None,
    corruptions: str | None,
    *,
    seed: int,
    batch_size: int,
    progress: bool,
    settings: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """Run the suite and the corruption track in this process; the record (and with
    ``folder``, the evaluation's files)."""
    result = (
        None
        if suite is None
        else suite.run(
            subject.model,
            subject.data,
            state_path=None if folder is None else folder / STATE_FILE,
            identity=subject.identity,
            device=subject.device,
        )
    )
    track = _corruption_track(
        corruptions, subject, seed=seed, batch_size=batch_size, folder=folder, progress=progress
    )
    return build_outputs(
        result,
        suite,
        settings,
        started,
        model=subject.model_meta,
        data=subject.data_meta,
        out=folder,
        corruptions=track,
    )


def _settings(
    device: torch.device, seed: int, processes: int | None, arguments: dict[str, Any]
) -> dict[str, Any]:
    """``eval.json``'s settings of the run itself: where, with which seed, on how many
    processes, and the arguments it was given."""
    return {
        "device": str(device),
        "seed": seed,
        "processes": processes,
        "arguments": _json_ready(arguments),
    }


def _json_ready(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with tuples as lists, as JSON writes and reads them back."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _output_classes(model: nn.Module, data: ImageDataset, device: torch.device) -> int:
    """The model's number of outputs, from one image (what an ImageNet-C folder must match)."""
    from generalist.data import to_float
    from generalist.inference import eval_mode

    with eval_mode(model), torch.no_grad():
        return int(model(to_float(data.images[:1]).to(device)).shape[-1])


def _corruption_track(
    source: str | None,
    subject: _Subject,
    *,
    seed: int,
    batch_size: int,
    folder: Path | None,
    progress: bool,
    on_progress: Callable[[Progress], None] | None = None,
) -> CorruptionOutcome | None:
    """The common-corruptions track over the evaluated points when ``source`` is given,
    resumable from ``folder``'s :data:`CORRUPTIONS_STATE_FILE`; else None."""
    if not source:
        return None
    from generalist.evaluation.corruptions import run_corruptions

    model, data, meta = subject.model, subject.data, subject.data_meta
    return run_corruptions(
        model,
        data,
        source,
        seed=seed,
        batch_size=batch_size,
        image_shape=meta["image_shape"],
        num_classes=meta["num_classes"] or _output_classes(model, data, subject.device),
        state_path=None if folder is None else folder / CORRUPTIONS_STATE_FILE,
        identity=subject.identity,
        device=subject.device,
        on_progress=on_progress,
        progress=progress,
    )


def _device_of(model: nn.Module) -> torch.device:
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


def _state_sha256(model: nn.Module) -> str:
    """SHA-256 of the model's tensors (names, dtypes, shapes, bytes): which weights were
    evaluated, as a saved file's hash would say."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {value.dtype} {tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _given_data(x: Any, y: Any) -> ImageDataset:
    """uint8 images and int64 labels from the caller's arrays, checked with parameter names."""
    images = as_array(x, "x")
    labels = as_array(y, "y")
    if images.ndim != 4:
        raise DataError(f"x has shape {images.shape}; give images as (N, C, H, W)")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating):
            raise DataError(f"x has dtype {images.dtype}; give uint8 pixels or floats in [0, 1]")
        if not ((images >= 0) & (images <= 1)).all():
            raise DataError("x holds values outside [0, 1] (or NaN); scale images to [0, 1]")
        rounded = np.rint(images * 255)
        change = float(np.abs(rounded / 255 - images).max(initial=0))
        if change > 1e-6:
            warnings.warn(
                f"x is not on the 8-bit grid: it is evaluated as its uint8 values (each pixel "
                f"moved by at most {change:.4f}); give uint8 images to evaluate them exactly",
                RuntimeWarning,
                stacklevel=4,  # the caller of evaluate
            )
        images = rounded.astype(np.uint8)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"y must hold one integer class index per image, got dtype {labels.dtype} "
            f"shape {labels.shape}"
        )
    if len(labels) != len(images):
        raise DataError(f"x has {len(images)} images but y {len(labels)} labels; give one each")
    if len(labels) == 0:
        raise DataError("x holds no images; give at least one")
    return ImageDataset(
        torch.from_numpy(np.ascontiguousarray(images)),
        torch.from_numpy(labels.astype(np.int64)),
    )


# --------------------------------------------------------------------------- saved weights


@dataclass(frozen=True)
class EvalRequest:
    """What ``generalist eval`` evaluates, as typed values (``None``: the run's own, or the
    default). Written resolved to ``request.json``, so ``--resume DIR`` needs only DIR."""

    target: str
    """A run directory, or a weights file (``.safetensors``, a ``torch.save`` state dict)."""
    which: str | None = None
    """In a run directory: ``last`` (default) or ``best``."""
    arch: str | None = None
    """The architecture of weights without ``model.json``: a name or ``pkg.mod:Callable``."""
    num_classes: int | None = None
    """With ``arch``: the model's classes (default: the dataset's)."""
    attacks: tuple[str, ...] = (AUTOATTACK,)
    threats: tuple[str, ...] = ()
    """Default: the run's training threat models."""
    corruptions: str | None = None
    """The common-corruptions track's source: ``generated``, a CIFAR-10-C/-100-C folder or an
    ImageNet-C folder. With ``attacks`` and ``threats`` both empty it runs alone."""
    n_examples: int | None = None
    batch_size: int | None = None
    n_iter: int | None = None
    seed: int = 0
    dataset: str | None = None
    data_dir: str | None = None
    split: str = "test"
    out: str | None = None
    device: str = "auto"
    processes: int | None = None
    """How many processes the points are split over: torchrun's (``generalist eval --nproc N``
    starts it; :func:`run_eval` starts none itself). Default: torchrun's count, 1 without it;
    a resume takes the saved one."""
    threads: int | None = None
    compile: bool = False
    trust_unhashed: bool = False
    trust_changed_code: bool = False
    progress: bool = True

    def with_values(self, **values: Any) -> EvalRequest:
        return dataclasses.replace(self, **values)


RESOLVED_FIELDS = (
    "target",
    "which",
    "arch",
    "num_classes",
    "attacks",
    "threats",
    "corruptions",
    "n_examples",
    "batch_size",
    "n_iter",
    "seed",
    "dataset",
    "data_dir",
    "split",
    "trust_unhashed",
    "trust_changed_code",
    "processes",
)
"""What a resumed evaluation takes from ``request.json``: everything its results depend on."""


def resumed_request(folder: str | Path, **given: Any) -> EvalRequest:
    """The request saved in ``folder`` with the ``given`` values (those not None) on top.

    A given value that changes the evaluation is refused later by the state file's plan check,
    naming the key, rather than silently mixing two evaluations.
    """
    path = Path(folder) / REQUEST_FILE
    given = {key: value for key, value in given.items() if value is not None}
    _check_resumable(Path(folder))
    if not path.is_file():  # written by an older version: the options must come again
        if "target" not in given:
            raise ConfigError(
                f"resume {folder}: it has no {REQUEST_FILE} (an older version wrote it); give "
                "the target and the options it was started with again"
            )
        return EvalRequest(**given, out=str(folder))
    try:
        saved = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{path} is not readable JSON; start a new evaluation") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("target"), str):
        raise ConfigError(f"{path} is not an evaluation request; start a new evaluation")
    values = {key: saved[key] for key in RESOLVED_FIELDS if key in saved}
    for key in ("attacks", "threats"):
        values[key] = tuple(values.get(key) or ())
    values.update(given)
    return EvalRequest(**values, out=str(folder))


def run_eval(
    request: EvalRequest,
    *,
    resume: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
) -> tuple[Path, dict[str, Any] | None]:
    """Evaluate saved weights as ``request`` says, write every output; ``(folder, record)``.

    ``resume`` continues the unfinished evaluation in ``request.out`` (see
    :func:`resumed_request`). Under torchrun every rank evaluates its shard of the points and
    rank 0 merges them and writes the outputs; the record is ``None`` on the other ranks. An
    error every rank meets alike is said once, by rank 0.
    """
    with said_by_rank_zero(), ExitStack() as group:
        return _run_eval(request, resume, on_progress, group)


def _run_eval(
    request: EvalRequest,
    resume: bool,
    on_progress: Callable[[Progress], None] | None,
    group: ExitStack,
) -> tuple[Path, dict[str, Any] | None]:
    started = time.perf_counter()
    plan = _plan(request)
    # the request is checked: now join the other processes (torchrun), if any
    processes = group.enter_context(evaluation_processes(resolve_device(request.device, "device")))
    out = processes.agree(lambda: _out_dir(request, plan.run_dir, resume, processes.count))
    _check_processes(request, processes)  # after a resume's own check, which says more
    apply_threads(request.threads)
    subject = _saved_subject(request, plan, processes.device)
    processes.agree(lambda: _claim(out, "a separate evaluation needs its own --out"))
    resolved = request.with_values(
        target=str(plan.target.resolve()),
        which=plan.which,
        threats=tuple(str(t) for t in plan.suite.threats) if plan.suite else (),
        attacks=tuple(plan.suite.attack_names) if plan.suite else (),
        corruptions=_resolved_source(request.corruptions),
        batch_size=plan.batch_size,
        dataset=subject.data_meta["dataset"],
        data_dir=subject.data_meta["data_dir"],
        out=str(out),
        processes=processes.count,
    )
    # Written once, before the first attack, so an interrupted evaluation has it; a resume
    # never rewrites it (options refused by the plan check below must not replace it).
    first_request = not (out / REQUEST_FILE).is_file()
    if first_request and not resume and processes.is_main:
        _write_request(out, resolved)
    result = (
        None
        if plan.suite is None
        else run_sharded(
            plan.suite,
            subject.model,
            subject.data,
            folder=out,
            state_file=STATE_FILE,
            identity=subject.identity,
            processes=processes,
            on_progress=on_progress,
        )
    )
    if not processes.is_main:  # rank 0 writes the merged folder
        return out, None
    late_request = first_request and resume  # a folder from an older version
    return out, _finish(resolved, plan, subject, result, out, late_request, started, on_progress)


@dataclass(frozen=True)
class _Plan:
    """What a checked request evaluates, found before any other process joins."""

    target: Path
    weights: Path
    which: str | None
    """``last`` or ``best`` in a run directory; None for a weights file."""
    run_dir: Path
    config: Any
    """The run's resolved config; None for bare weights or with ``arch``."""
    batch_size: int
    suite: EvaluationSuite | None
    """None: the corruption track alone."""


def _plan(request: EvalRequest) -> _Plan:
    """The request's values checked, its weights found and its suite built."""
    target = Path(request.target)
    if not target.exists():
        raise CheckpointError(
            f"{target} does not exist; pass a run directory from `generalist train` "
            "or a weights file"
        )
    if request.split not in SPLITS:
        raise ConfigError(f"split {cut(request.split)}: use one of {', '.join(SPLITS)}")
    _at_least_one(request.n_examples, "n_examples")
    _at_least_one(request.num_classes, "num_classes")
    _at_least_one(request.batch_size, "batch_size")
    _at_least_one(request.processes, "processes")
    weights, which = _weights_of(target, request.which)
    run_dir = target if target.is_dir() else target.parent
    config = _run_config(run_dir) if request.arch is None else None
    batch_size = request.batch_size or (config.data.eval_batch_size if config else DEFAULT_BATCH)
    alone = bool(request.corruptions) and not (request.attacks or request.threats)
    suite = (
        None  # the corruption track alone
        if alone
        else _suite(
            _threats(request, config),
            request.attacks or [AUTOATTACK],
            seed=request.seed,
            batch_size=batch_size,
            n_iter=request.n_iter,
            progress=request.progress and is_rank_zero(),
        )
    )
    return _Plan(target, weights, which, run_dir, config, batch_size, suite)


def _saved_subject(request: EvalRequest, plan: _Plan, device: torch.device) -> _Subject:
    """The saved model loaded on ``device`` and the data it is evaluated on, refused when
    they do not fit each other."""
    from generalist.weights import load_model, sha256_file

    dataset_name = _dataset_name(request, plan.config, plan.weights)
    if request.arch is not None:
        data, data_meta = _evaluation_data(request, None, dataset_name, 0)
        model, spec = load_model(
            plan.weights,
            device,
            arch=_arch_spec(request, data_meta),
            trust_changed_code=request.trust_changed_code,
        )
    else:
        model, spec = load_model(
            plan.weights,
            device,
            trust_unhashed=request.trust_unhashed,
            trust_changed_code=request.trust_changed_code,
        )
        size = spec["model"].get("image_size") or 224
        data, data_meta = _evaluation_data(request, plan.config, dataset_name, size)
    if request.compile:
        compile_in_place(model)  # in place: the model's names and hash are unchanged
    model_hash = sha256_file(plan.weights)
    _check_fits(spec, data_meta, plan.target, more_classes_ok=request.num_classes is not None)
    model_meta = {
        "path": str(plan.weights),
        "which": plan.which,
        "selected": spec.get("selected"),
        "sha256": model_hash,
        "architecture": spec["model"]["name"],
        "spec": spec["model"],
        "trained_on": spec.get("dataset"),
    }
    identity = {
        "model_sha256": model_hash,
        "data_fingerprint": data_meta["fingerprint"],
        "dataset": data_meta["dataset"],
        "split": data_meta["split"],
    }
    return _Subject(model, data, device, model_meta, data_meta, identity)


def _finish(
    resolved: EvalRequest,
    plan: _Plan,
    subject: _Subject,
    result: SuiteResult | None,
    out: Path,
    late_request: bool,
    started: float,
    on_progress: Callable[[Progress], None] | None,
) -> dict[str, Any]:
    """Rank 0's part after the attacks: the corruption track, then every output; the record.

    ``late_request``: the folder has no ``request.json`` (an older version's), written now
    that its options passed the plan checks."""
    corruptions = _corruption_track(
        resolved.corruptions,
        subject,
        seed=resolved.seed,
        batch_size=plan.batch_size,
        folder=out,
        progress=resolved.progress,
        on_progress=on_progress,
    )
    if late_request:
        _write_request(out, resolved)
    arguments = dataclasses.asdict(resolved)
    settings = _settings(subject.device, resolved.seed, resolved.processes, arguments)
    return build_outputs(
        result,
        plan.suite,
        settings,
        started,
        model=subject.model_meta,
        data=subject.data_meta,
        out=out,
        run_name=plan.run_dir.name,
        corruptions=corruptions,
    )


def _resolved_source(source: str | None) -> str | None:
    """A corruptions folder as an absolute path (a resume may start elsewhere)."""
    if not source:
        return None
    from generalist.evaluation.corruptions import GENERATED_SOURCE

    return source if source == GENERATED_SOURCE else str(Path(source).resolve())


def _write_request(out: Path, request: EvalRequest) -> None:
    from generalist.durable import write_text_durably

    values = _json_ready({key: getattr(request, key) for key in RESOLVED_FIELDS})
    write_text_durably(out / REQUEST_FILE, json.dumps(values, indent=2) + "\n")


def build_outputs(
    result: SuiteResult | None,
    suite: EvaluationSuite | None,
    settings: dict[str, Any],
    started: float,
    *,
    model: dict[str, Any],
    data: dict[str, Any],
    out: Path | None,
    run_name: str | None = None,
    corruptions: CorruptionOutcome | None = None,
) -> dict[str, Any]:
    """The record of a finished suite and/or corruption track (``result`` and ``suite`` are
    None for the corruption track alone); with ``out``, every file of the evaluation folder."""
    from generalist.evaluation.records import build_record

    if suite is None or result is None:
        if corruptions is None:
            raise ValueError("build_outputs needs a suite result, a corruption track or both")
        result = SuiteResult(corruptions.clean, corruptions.clean_seconds, [], [])
    settings = {
        "attacks": suite.attack_names if suite else [],
        "threats": [str(t) for t in suite.threats] if suite else [],
        "seed": suite.seed if suite else None,
        "batch_size": suite.batch_size if suite else corruptions.batch_size,
        "n_iter": suite.n_iter if suite else None,
        "precision": "fp32",
        **settings,
    }
    record = build_record(
        result, model=model, data=data, settings=settings, seconds=time.perf_counter() - started
    )
    if corruptions is not None:
        from generalist.evaluation import corruptions as track

        record["corruptions"] = track.corruption_section(corruptions)
    if out is not None:
        name = run_name or model["architecture"]
        _write_outputs(record, out, name, model, data, suite is not None, corruptions is not None)
    return record


def _write_outputs(
    record: dict[str, Any],
    out: Path,
    name: str,
    model: dict[str, Any],
    data: dict[str, Any],
    attacked: bool,
    corrupted: bool,
) -> None:
    """The evaluation folder's files: the model infos (one per threat model, one for the
    corruption track), ``results.md`` and, last, ``eval.json`` listing every file there."""
    from generalist.durable import write_text_durably
    from generalist.evaluation.records import model_info, model_info_filename
    from generalist.evaluation.tables import render_markdown

    infos = {
        model_info_filename(record, i): model_info(
            record, i, name=name, architecture=model["architecture"]
        )
        for i in range(len(record["threats"]))
    }
    written = [RECORD_FILE, TABLES_FILE, *infos] + ([STATE_FILE] if attacked else [])
    if corrupted:
        from generalist.evaluation import corruptions as track

        infos[track.MODEL_INFO_FILE] = track.corruption_model_info(
            record["corruptions"],
            dataset=data["dataset"],
            name=name,
            architecture=model["architecture"],
        )
        written += [track.MODEL_INFO_FILE, CORRUPTIONS_STATE_FILE]
    if (out / REQUEST_FILE).is_file():
        written.append(REQUEST_FILE)
    if (out / SHARD_FOLDER).is_dir():
        written.append(f"{SHARD_FOLDER}/")
    record["files"] = written
    for file_name, info in infos.items():
        write_text_durably(out / file_name, json.dumps(info, indent=2) + "\n")
    write_text_durably(out / TABLES_FILE, render_markdown(record))
    write_text_durably(out / RECORD_FILE, json.dumps(record, indent=2) + "\n")


def _weights_of(target: Path, which: str | None) -> tuple[Path, str | None]:
    """The weights file ``which`` names in a run directory, and ``last``/``best`` (None for a
    weights file given directly)."""
    from generalist.weights import BEST_STEM, WEIGHTS_FILE

    if which is not None and which not in MODEL_CHOICES:
        raise ConfigError(f"which {cut(which)}: use one of {', '.join(MODEL_CHOICES)}")
    if not target.is_dir():
        if which is not None:
            raise ConfigError(
                f"which {which} picks a model inside a run directory; pass the run directory "
                f"instead of {target}"
            )
        return target, None
    which = which or "last"
    weights = target / (WEIGHTS_FILE if which == "last" else f"{BEST_STEM}.safetensors")
    if which == "best" and not weights.is_file():
        raise CheckpointError(
            f"{target} has no {weights.name}: no validated model was selected (eval.select: "
            "none, no epoch passed the clean gate, or training has not validated yet); "
            "evaluate the last model instead: which='last' in Python, --model last"
        )
    return weights, which


def _run_config(run_dir: Path) -> Any:
    """The training run's resolved config, or ``None`` for bare weights without one."""
    from generalist.config import build_config

    path = run_dir / "config.yaml"
    return build_config(user_yaml=path) if path.is_file() else None


def _threats(request: EvalRequest, config: Any) -> list[ThreatModel]:
    threats = [ThreatModel.parse(text) for text in request.threats]
    if threats:
        return threats
    if config is not None and config.eval_threats():
        return config.eval_threats()
    raise ConfigError(
        f"{request.target} has no config.yaml to take threat models from; "
        "name them, e.g. --threat Linf:8/255 (threats=['Linf:8/255'] in Python)"
    )


def _check_processes(request: EvalRequest, processes: Processes) -> None:
    if request.corruptions and processes.count > 1:
        raise ConfigError(
            "corruptions: the corruption track runs in one process; evaluate it without --nproc "
            "(or in its own evaluation folder)"
        )
    if request.processes not in (None, processes.count):
        raise ConfigError(
            f"processes {request.processes}: this evaluation runs on {processes.count}; "
            "run_eval starts no processes, torchrun does (generalist eval --nproc N)"
        )


def _claim(out: Path, advice: str) -> Path:
    """``out``, made and locked for this evaluation alone; ``advice`` says what to do when
    another holds it."""
    out.mkdir(parents=True, exist_ok=True)
    lock_folder(out, "evaluation folder", advice)
    return out


def _out_dir(request: EvalRequest, run_dir: Path, resume: bool, processes: int) -> Path:
    if resume:
        out = Path(request.out or "")
        _check_resumable(out)
        if holds_evaluation(out, STATE_FILE):  # the attacks' state: one process or shards
            check_resumable(out, STATE_FILE, processes)
        return out
    if request.out:
        out = Path(request.out)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"out {out} is a file; give a folder for the evaluation's files")
    else:
        base = run_dir / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
        out, n = base, 1
        while out.exists():
            n += 1
            out = base.with_name(f"{base.name}-{n}")
    if holds_evaluation(out, STATE_FILE) or (out / CORRUPTIONS_STATE_FILE).exists():
        raise ConfigError(
            f"{out} already holds an evaluation; continue it with --resume {out} or another --out"
        )
    return out


def _check_resumable(folder: Path) -> None:
    """A folder to resume holds the attacks' state (one process or shards) or the corruption
    track's."""
    if not (holds_evaluation(folder, STATE_FILE) or (folder / CORRUPTIONS_STATE_FILE).is_file()):
        raise ConfigError(
            f"resume {folder}: no {STATE_FILE} or {CORRUPTIONS_STATE_FILE} there; pass the "
            "folder of an interrupted eval"
        )


def _dataset_name(request: EvalRequest, config: Any, weights: Path) -> str:
    """The dataset given, else the run's, else the one ``model.json`` names."""
    from generalist.weights import spec_path_of

    if request.dataset:
        return request.dataset
    if config is not None:
        return config.data.dataset
    spec_path = spec_path_of(weights)
    if request.arch is None and spec_path.is_file():
        try:
            named = json.loads(spec_path.read_text()).get("dataset")
        except (ValueError, UnicodeDecodeError, AttributeError):
            named = None
        if isinstance(named, str) and named:
            return named
    raise ConfigError(
        f"cannot tell which dataset {request.target} was trained on; name it "
        "(--dataset and --data-dir)"
    )


def _arch_spec(request: EvalRequest, data: dict[str, Any]) -> dict[str, Any]:
    """``create_model``'s arguments for ``arch`` on this data (a plug-in with its source)."""
    from generalist.models import model_source

    spec: dict[str, Any] = {
        "name": request.arch,
        "num_classes": request.num_classes or data["num_classes"],
        "in_channels": data["image_shape"][0],
        "image_size": data["image_shape"][-1],
    }
    source = model_source(str(request.arch))
    if source is not None:
        spec["source"] = source
    return spec


def _evaluation_data(
    request: EvalRequest, config: Any, name: str, image_size: int
) -> tuple[ImageDataset, dict[str, Any]]:
    """The evaluated subset (the first ``n_examples`` of the split) and its description.

    ``image_size`` is what an image folder is decoded at without a run config (0: the
    folder default)."""
    from generalist.data import load_splits
    from generalist.data.folders import FolderOptions

    data_dir = request.data_dir or (
        config.data.data_dir if config and not request.dataset else None
    )
    split_settings = (
        {
            "val_size": config.data.val_size,
            "split_seed": config.data.split_seed,
            "train_limit": config.data.train_limit,
        }
        if config
        else {}
    )
    if config is not None:
        folder = FolderOptions.from_settings(config.data)
    else:
        folder = FolderOptions(image_size=image_size) if image_size else FolderOptions()
    splits = load_splits(name, data_dir, folder=folder, **split_settings)
    data = splits.test if request.split == "test" else splits.val
    if request.n_examples is not None:
        if not 1 <= request.n_examples <= len(data):
            raise ConfigError(
                f"n_examples {request.n_examples}: the {name} {request.split} split has "
                f"{len(data)} examples; use 1 to {len(data)}"
            )
        data = data.subset(torch.arange(request.n_examples))
    meta = {
        "dataset": name,
        "data_dir": None if data_dir is None else str(data_dir),
        "split": request.split,
        **split_settings,
        "fingerprint": data.fingerprint(),
        "num_classes": splits.info.num_classes,
        "image_shape": list(splits.info.image_shape),
    }
    return data, meta


def _check_fits(
    spec: dict[str, Any], data: dict[str, Any], target: Path, *, more_classes_ok: bool
) -> None:
    """Refuse data the model cannot take, before an attack fails with a shape error;
    ``more_classes_ok``: a model with more outputs than the dataset's classes, as asked."""
    model = spec["model"]
    expected = {
        "num_classes": (model.get("num_classes"), data["num_classes"]),
        "in_channels": (model.get("in_channels"), data["image_shape"][0]),
        "image_size": (model.get("image_size"), data["image_shape"][-1]),
    }
    for key, (wants, has) in expected.items():
        if key == "num_classes" and more_classes_ok and wants is not None and wants > has:
            continue
        if wants is not None and wants != has:
            raise ConfigError(
                f"{target} was built for {key}={wants} but {data['dataset']} has {has}; "
                "evaluate it on the dataset it was trained on"
            )
