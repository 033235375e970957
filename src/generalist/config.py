"""Typed run configuration: presets, user YAML and ``--set`` overrides, validated up front.

A config is built in layers, later ones winning key by key:

1. the dataset profile (``presets/datasets/<dataset>.yaml``: model, epochs, batch size and the
   attack budgets that are standard for that benchmark),
2. the method preset (``presets/methods/<name>.yaml``: the learners and the merge),
3. an optional user YAML, 4. ``--set a.b.c=value`` overrides.

Everything is checked before any data is read or any weight is allocated, and every error names
the dotted key that is wrong, because a typo found after an hour of training is an hour lost.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from generalist.attacks.threat import NORMS, ThreatModel, parse_eps, parse_norm
from generalist.devices import PRECISIONS
from generalist.errors import ConfigError, cut
from generalist.optimizers import OPTIMIZERS
from generalist.plain_yaml import YamlSyntaxError, load_plain_yaml
from generalist.plugins import check_source_record, is_import_path, source_record
from generalist.schedules import (
    REMAINDER,
    SCHEDULE_GRANULARITIES,
    SCHEDULE_UNITS,
    build_schedule,
    mixing_weights,
    parse_exact,
    parse_number,
    parse_step_size,
)
from generalist.threads import MAX_THREADS
from generalist.training.tasks import ATTACK_FIELDS, TaskSpec, list_tasks, task_spec

UNLABELED_REST = "rest"
"""``data.unlabeled: rest``: the training examples ``data.train_limit`` leaves out."""
REDISTRIBUTE_POLICIES = ("per_step_in_epoch", "once_per_c_epochs", "never")
SELECTION_CRITERIA = ("clean+robust", "robust", "clean_gated_robust", "none")
INIT_POLICIES = ("same", "independent")
NONFINITE_POLICIES = ("stop", "skip")
MAX_CONFIG_BYTES = 1 << 20
MAX_OVERRIDE_CHARS = 10_000
MAX_EPOCHS = 10_000
"""Beyond any real run (the recipe has 120); keeps validation's per-epoch checks instant."""
MAX_SEED = 2**32 - 1
"""Seeds are combined (``seed * 7919 + learner``) into generator seeds that must fit 64 bits."""
MAX_NAME_BYTES = 200
"""A run folder is ``NAME-YYYYmmdd-HHMMSS[-N]``: room for that within a 255-byte file name."""
MAX_IMAGE_SIZE = 4096
"""Image folders: a side length beyond any dataset's (ImageNet trains at 224); a typo such as
224000 would otherwise pass --dry-run and run out of memory at the first decoded batch."""
MIN_VALIDATION_IMAGES = 100
"""Below this many validation images one image moves an accuracy by more than a point, so
choosing ``model-best`` by it is mostly noise: a run with fewer says so when it starts."""
MAX_WORKERS = 256
"""Loader processes: beyond any machine's cores; more would fail when the loader starts."""
INT_LIMITS = {
    "seed": "2**32 - 1",
    "data.split_seed": "2**32 - 1",
    "epochs": str(MAX_EPOCHS),
    "threads": str(MAX_THREADS),
    "data.image_size": str(MAX_IMAGE_SIZE),
    "data.workers": str(MAX_WORKERS),
}
"""The real limit of the whole-number keys validate() bounds, for a number beyond 64 bits."""


@dataclass
class DataConfig:
    dataset: str = "cifar10"
    data_dir: str | None = None
    val_size: float = 0.02
    """Held-out validation split carved from the training data: a fraction, or a count if >= 1."""
    split_seed: int = 0
    batch_size: int = 128
    eval_batch_size: int = 500
    crop_padding: int | None = None
    """``None`` uses the dataset's standard augmentation (pad-4 crop on CIFAR, none on digits)."""
    flip: bool | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    image_size: int = 224
    """Image folders (imagefolder, imagenet): side length images are cropped and resized to.
    ``build_config`` gives an ``imagefolder`` its images' own size unless a layer sets it."""
    storage: str = "auto"
    """Image folders: ``memory`` (decoded once, on the device), ``stream`` (decoded by loader
    workers every epoch) or ``auto`` (memory while the decoded splits fit memory_budget_gb)."""
    memory_budget_gb: float = 4.0
    workers: int = 4
    """Loader processes decoding a streamed folder (0: in the training process)."""
    bad_files: str = "error"
    """Image folders: ``error`` stops at an unreadable file, naming it; ``skip`` counts it."""
    unlabeled: str | None = None
    """Unlabeled images for ``rst`` learners: ``rest`` (the training examples ``train_limit``
    leaves out, their labels hidden), an ``.npz`` holding ``x_unlabeled``, or a folder of image
    files. They are pseudo-labeled once per run (see ``pseudo_labels``)."""


@dataclass
class ModelConfig:
    name: str = "resnet18"
    """A registered architecture (``generalist presets`` lists them; ``wrn-D-W`` too) or your own
    as ``package.module:callable``, imported from the working directory or PYTHONPATH and given
    the keyword arguments it accepts of num_classes, in_channels and image_size."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """More keyword arguments for a model given by import path (e.g. ``{width: 64}``)."""
    normalize: bool = False
    """Put the dataset's mean/std normalisation inside the model (the paper's recipe does not)."""
    channels_last: bool = False
    """Keep 4-d weights and the training batches in NHWC memory. Convolutions on tensor cores and
    with AMX bf16 want it (1.36x on this project's CPU in bf16); in fp32 on the CPU it gained
    only 1.04x, and it changes the convolution algorithms, so it is opt-in (BENCHMARKS.md)."""
    compile: bool = False
    """Compile each learner's model with ``torch.compile`` (training steps, their attacks and
    validation/test PGD). Opt-in until a GPU measurement says it pays: it costs a compile at
    the start, and again whenever a batch shape changes."""
    init_from: str | None = None
    """Start every learner from saved weights (a run directory or a ``model.safetensors``) of
    the same architecture instead of a random initialisation, e.g. CURE from a natural model."""


@dataclass
class BudgetConfig:
    """The attack budget of one norm: used by training tasks and validation unless overridden."""

    eps: str = "8/255"
    steps: int = 10
    step_size: str | None = None
    """``None`` means 2.5·ε/steps (Madry et al.)."""


@dataclass
class TaskConfig:
    """A learner's task: its ``type``, its attack, and its own ``params``.

    The attack fields (``norm``, ``eps``, ``steps``, ``step_size``, ``random_start``) are the
    same for every task that has an attack; ε and steps default to ``budgets``. ``params`` are
    the task's own (TRADES' ``beta``, FAT's ``tau``, ...): each task file declares them with
    their defaults (``generalist.training.tasks``). A task written the old flat way
    (``task: {type: trades, beta: 6}``) is read as ``params: {beta: 6}``.
    """

    type: str = "natural"
    """A registered task (``natural``, ``adversarial``, ``trades``, ...) or an import path
    ``package.module:Class`` to a class decorated with ``@register_task``."""
    norm: str | None = None
    """Threat norm of the attack; ε/steps default to ``budgets``."""
    eps: str | None = None
    steps: int | None = None
    step_size: str | None = None
    random_start: bool = True
    params: Any = field(default_factory=dict)
    """The task's parameters: a mapping as written, resolved by :func:`validate` to the task's
    own dataclass with its defaults filled in (so ``config.yaml`` records every value used)."""
    source: dict[str, Any] | None = None
    """For an import-path ``type``: its source file and SHA-256, recorded when the run starts
    and checked when it is resumed or evaluated (see :mod:`generalist.plugins`)."""


@dataclass
class OptimizerConfig:
    type: str = "sgd"
    lr: Any = 0.1
    """A number or a schedule ``{unit: fraction|epoch, points: [[x, lr], ...]}``."""
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class LearnerConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    gamma: Any = REMAINDER
    """Mixing weight: a number, a schedule, or ``remainder`` (1 minus the others; at most one)."""


@dataclass
class RedistributeConfig:
    """When the global learner is copied back into the base learners (docs/algorithm.md)."""

    policy: str = "per_step_in_epoch"
    unit: str | None = None
    """``fraction``: ``start`` and ``every`` are fractions of the run, laid on E epochs like
    every other schedule; ``epoch``: whole epochs, the official rule e >= t' and e mod c == 0.
    Unset (configs written before this key existed): ``fraction``, unless ``every`` > 1, which
    then counts epochs from ``start``·E as it used to."""
    start: str = "0.625"
    """t': the first redistribution (official: epoch 75 of 120 = 0.625)."""
    every: str = "1/24"
    """c: the spacing (official: 5 of 120 epochs = 1/24); with ``fraction`` the grid is anchored
    at the end of the run, so the last epoch always redistributes."""
    min_gap: int = 1
    """With ``fraction``: the fewest epochs between two redistributions. A run whose laid grid
    is closer (a short run: the official ten epochs become consecutive) redistributes every
    ``min_gap`` epochs back from the last one, while ≥ round(t'·E), leaving the learners whole
    epochs to train apart; a grid already that far apart (E = 120: every 5) is unchanged."""


@dataclass
class MergeConfig:
    ema_decay: Any = "auto"
    """d_max in d_t = min(d_max, (t+1)/(t+10)): a number in [0, 1), or ``auto`` for
    1 − 1/(ema_horizon · total steps), which is exactly 0.999 in the official run."""
    ema_horizon: str = "1000/46920"
    """With ``ema_decay: auto``: the EMA's averaging horizon 1/(1 − d_max) as a fraction of the
    run's steps (official: 1000 of 46,920 steps)."""
    warmup: bool = True
    init: str = "same"
    redistribute: RedistributeConfig = field(default_factory=RedistributeConfig)


@dataclass
class EvalConfig:
    threats: list[str] | None = None
    """Threats for validation and the final test; ``None`` = the learners' (or ``budgets.Linf``)."""
    val_steps: int = 10
    test_steps: int = 20
    every: int = 1
    learners: bool = True
    """Also validate every base learner each epoch, not only the global model."""
    test_examples: int | None = None
    select: str = "clean+robust"
    """Which validated global model is kept as ``model-best.safetensors``: the highest
    ``clean+robust`` (the official criterion), ``robust``, ``clean_gated_robust`` (the most
    robust among those with clean >= ``select_min_clean``) or ``none``. Robust = the weakest
    validated threat. The test split never takes part."""
    select_min_clean: float | None = None
    """The clean-accuracy gate (%) of ``clean_gated_robust``."""


@dataclass
class CheckpointConfig:
    """When the complete training state is saved to ``RUN/checkpoints/``.

    A checkpoint is always written at the end of every epoch and when SIGTERM or SIGINT asks the
    run to stop; these settings add saves inside long epochs, so a preempted job loses at most
    that much work.
    """

    every_steps: int | None = None
    """Also save every N optimizer steps (``None``: not by step count)."""
    every_minutes: float | None = 10.0
    """Also save when this many minutes have passed since the last save (``None``: never)."""
    keep: int = 2
    """Checkpoints kept; older ones are the fallback when the newest is damaged."""
    on_nonfinite: str = "stop"
    """A NaN/inf loss ``stop``s the run naming the step and learner, or ``skip``s that batch for
    that learner (its weights, BatchNorm statistics and optimizer state stay as they were)."""


@dataclass
class LoggingConfig:
    tensorboard: bool = False
    """Also write each epoch's metrics as TensorBoard scalars to ``RUN/tensorboard`` (needs the
    ``tensorboard`` extra); ``metrics.jsonl`` stays the record reports are made from."""


@dataclass
class PseudoLabelConfig:
    """Where RST's pseudo-labels come from (used only when ``data.unlabeled`` is set)."""

    model: str | None = None
    """The labeler: a run directory or ``model.safetensors`` of this run's architecture.
    ``None``: ``model.init_from`` if given, else a ``standard`` model trained first on the
    labeled data inside the run (``RUN/pseudo-labeler/``)."""
    epochs: int | None = None
    """Epochs of that standard model; ``None`` = this run's ``epochs``."""


@dataclass
class Config:
    name: str = "run"
    preset: str | None = None
    description: str = ""
    seed: int = 0
    epochs: int = 120
    schedule_granularity: str = "epoch"
    """``epoch``: learning rates, γ and the tasks' schedules hold their value of epoch e for
    the whole epoch (the official code); ``step``: lr and task schedules move every step."""
    device: str = "auto"
    precision: str = "fp32"
    deterministic: bool = False
    """CUDA: deterministic kernels only, so a resumed run ends bit-identical to an uninterrupted
    one (see :mod:`generalist.backends`); slower. CPU runs are deterministic anyway."""
    threads: int | None = None
    """CPU threads for the kernels; ``null``: PyTorch's choice, or only the cores other work
    leaves free (see :mod:`generalist.threads`)."""
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    budgets: dict[str, BudgetConfig] = field(default_factory=dict)
    learners: dict[str, LearnerConfig] = field(default_factory=dict)
    merge: MergeConfig = field(default_factory=MergeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    pseudo_labels: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def threat_of(self, task: TaskConfig, key: str) -> tuple[ThreatModel, int, float]:
        """Resolve a task's threat, steps and step size, filling gaps from ``budgets``."""
        norm = parse_norm(task.norm or "Linf")
        budget = self.budgets.get(norm)
        if budget is None and (task.eps is None or task.steps is None):
            raise ConfigError(f"{key}.norm: no budgets.{norm} for this dataset; set {key}.eps")
        eps_text = task.eps if task.eps is not None else budget.eps
        where = f"{key}.eps" if task.eps is not None else f"budgets.{norm}.eps"
        try:
            threat = ThreatModel.of(norm, eps_text)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
        steps = task.steps if task.steps is not None else budget.steps
        step_text = (
            task.step_size
            if task.step_size is not None
            else (budget.step_size if task.eps is None else None)
        )
        step_size = (
            threat.default_step_size(steps)
            if step_text is None
            else parse_step_size(step_text, parse_exact(eps_text, where), f"{key}.step_size")
        )
        return threat, steps, step_size

    def eval_threats(self) -> list[ThreatModel]:
        if self.eval.threats:
            return [ThreatModel.parse(t) for t in self.eval.threats]
        threats: list[ThreatModel] = []
        for name, learner in self.learners.items():
            if task_spec(learner.task.type, f"learners.{name}.task").capabilities.attack:
                threat = self.threat_of(learner.task, f"learners.{name}.task")[0]
                if str(threat) not in {str(t) for t in threats}:
                    threats.append(threat)
        if not threats and "Linf" in self.budgets:
            threats.append(ThreatModel.of("Linf", self.budgets["Linf"].eps))
        return threats


# --------------------------------------------------------------------------- building


def build_config(
    preset: str | None = None,
    *,
    dataset: str | None = None,
    user_yaml: str | Path | None = None,
    overrides: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
) -> Config:
    """Resolve preset → dataset profile → user YAML → ``--set`` overrides into a valid Config.

    ``overrides`` are ``"key=value"`` texts as ``--set`` takes them (the value read as YAML);
    ``values`` maps dotted keys to Python values (``{"epochs": 30, "model.kwargs": {...}}``),
    applied last.
    """
    from generalist.presets import dataset_profile, load_method_preset

    user = read_config_file(user_yaml) if user_yaml is not None else {}
    method = load_method_preset(preset) if preset else {}
    for section in ("data", "learners"):
        if not isinstance(user.get(section, {}), dict):
            found = type(user[section]).__name__
            raise ConfigError(f"{section}: expected a mapping of keys, got a {found}")
    dataset = dataset or _dig(user, "data", "dataset") or _dig(method, "data", "dataset")
    dataset = dataset or "cifar10"
    if not isinstance(dataset, str):
        raise ConfigError(f"data.dataset: expected a dataset name, got {cut(dataset)}")
    # npz and image folders take the recipe of their images' band: look where they are first
    data_dir = _layered_value([method, user], overrides, "data", "data_dir")
    recipe, profile = dataset_profile(dataset, data_dir if isinstance(data_dir, str) else None)
    tree: dict[str, Any] = {}
    tree = merge_layer(tree, profile)
    by_dataset = method.pop("by_dataset", {}) or {}
    tree = merge_layer(tree, method)
    tree = merge_layer(tree, by_dataset.get(recipe, {}))
    tree = merge_layer(tree, user)
    tree.setdefault("data", {})["dataset"] = dataset
    if preset:
        tree["preset"] = preset
        tree.setdefault("name", preset)
    if isinstance(overrides, str):
        raise ConfigError("overrides: give a list of 'key=value' texts, not one text")
    for item in overrides:
        apply_override(tree, item)
    for key, value in (values or {}).items():
        if not isinstance(key, str):
            raise ConfigError(f"overrides: key {cut(key)} is not text; write e.g. 'epochs'")
        set_key(tree, key, copy.deepcopy(value), "overrides")
    if isinstance(tree.get("learners"), dict):  # `--set learners.X=null` removes X, as in YAML
        tree["learners"] = {k: v for k, v in tree["learners"].items() if v is not None}
    config = from_dict(Config, tree, "")
    validate(config)
    return config


def _layered_value(layers: list[dict], overrides: Sequence[str], *keys: str) -> Any:
    """The value of ``keys`` that the layers and ``--set`` overrides leave, later ones winning,
    read before the tree is built (the dataset profile depends on it)."""
    value = None
    for layer in layers:
        found = _dig(layer, *keys)
        value = found if found is not None else value
    dotted = ".".join(keys)
    for item in overrides:
        if item.partition("=")[0].strip() == dotted:
            scratch: dict[str, Any] = {}
            apply_override(scratch, item)
            value = _dig(scratch, *keys)
    return value


def _dig(tree: dict, *keys: str) -> Any:
    for key in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds, as written (no presets, no defaults); a missing,
    oversized, non-UTF-8 or non-mapping file is one :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; check the path given to --config")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"config file {path} is {path.stat().st_size:,} bytes; a config is a few kB, so "
            "check the path given to --config"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (a binary file?); check the path given "
            "to --config"
        ) from None
    data = load_plain_yaml(text, f"config file {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of keys, not {type(data).__name__}"
        )
    return data


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into a copy of ``base``; a ``null`` learner entry removes that learner."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    if isinstance(merged.get("learners"), dict):
        merged["learners"] = {k: v for k, v in merged["learners"].items() if v is not None}
    return merged


def merge_layer(tree: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """:func:`deep_merge` of one config layer whose tasks are read as tasks: flat task keys go
    into ``params`` (:func:`nest_task_params`), and a learner whose ``type`` the layer changes
    keeps only the earlier ``params`` its new task also has."""
    layer = nest_task_params(layer)
    for name, task in _tasks_of(layer):
        if "type" in task:
            _retype(_tasks_of(tree, name), task["type"])
    return deep_merge(tree, layer)


TASK_KEYS = ("type", *ATTACK_FIELDS, "params", "source")
"""The keys of a task mapping; any other key is a parameter written the old flat way."""


def _tasks_of(tree: dict[str, Any], only: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """``(learner name, task mapping)`` of the learners in ``tree`` that have one."""
    learners = tree.get("learners")
    if not isinstance(learners, dict):
        return []
    return [
        (name, learner["task"])
        for name, learner in learners.items()
        if (only is None or name == only)
        and isinstance(learner, dict)
        and isinstance(learner.get("task"), dict)
    ]


def _spec_or_none(kind: Any) -> TaskSpec | None:
    """The task a layer names, or None when it does not name a known one (validate says so)."""
    try:
        return task_spec(kind)
    except ConfigError:
        return None


def nest_task_params(layer: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``layer`` with every task's flat parameters moved into ``task.params``.

    Configs written before tasks had ``params`` (presets, user YAML and every run's
    ``config.yaml`` until then) put them beside the attack: ``{type: trades, beta: 6}``. There a
    ``null`` meant "the default", and every task carried ``beta: 6.0`` whether it read it or
    not; both are dropped, so an old run's config reads as it did.
    """
    layer = copy.deepcopy(layer)
    for name, task in _tasks_of(layer):
        flat = [key for key in task if key not in TASK_KEYS]
        params = task.get("params", {})
        if not flat or not isinstance(params, dict):
            continue
        spec = _spec_or_none(task.get("type"))
        for key in flat:
            value = task.pop(key)
            if value is None or (key == "beta" and spec and "beta" not in spec.param_names()):
                continue
            if key in params:
                raise ConfigError(
                    f"{_join(f'learners.{name}.task', str(key))}: given both here and in "
                    f"learners.{name}.task.params; keep one"
                )
            params[key] = value
        task["params"] = params
    return layer


def canonical_tasks(tree: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``tree`` (a config as a mapping: a checkpoint's, a ``config.yaml``) with every
    task in today's form: flat parameters nested and ``params`` completed with the task's
    defaults, so that configs written before and after ``params`` existed compare equal when
    they mean the same."""
    tree = nest_task_params(tree)
    for _, task in _tasks_of(tree):
        spec = _spec_or_none(task.get("type", "natural"))
        params = task.get("params", {})
        if spec is None or not isinstance(params, dict):
            continue
        try:
            task["params"] = dataclasses.asdict(from_dict(spec.params, params, "params"))
        except ConfigError:  # a value validate() refuses: compared as written
            continue
    return tree


def _retype(tasks: list[tuple[str, dict[str, Any]]], new_type: Any) -> None:
    """A learner's task becomes ``new_type``: keep the parameters it also has, drop the rest
    (and the old type's source record)."""
    for _, task in tasks:
        if task.get("type") == new_type:
            continue
        task.pop("source", None)
        spec = _spec_or_none(new_type)
        if spec is not None and isinstance(task.get("params"), dict):
            names = spec.param_names()
            task["params"] = {k: v for k, v in task["params"].items() if k in names}


def apply_override(tree: dict[str, Any], item: str) -> None:
    """Apply ``a.b.c=value``; the value is read as YAML so numbers, lists and null work."""
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"--set {cut(item)}: write it as key=value, e.g. --set epochs=30")
    if len(text) > MAX_OVERRIDE_CHARS:
        raise ConfigError(f"--set {cut(key)}: the value is {len(text):,} characters; too long")
    try:
        value = load_plain_yaml(text, f"--set {cut(key)}") if text.strip() else None
    except YamlSyntaxError:
        value = text
    set_key(tree, key, value, "--set")


def set_key(tree: dict[str, Any], key: str, value: Any, what: str = "--set") -> None:
    """Set the dotted ``key`` of a config tree to ``value``; ``what`` names the source in
    errors (``--set`` on the command line, ``overrides`` from Python)."""
    parts = key.split(".")
    if len(key) > 200 or len(parts) > 8:
        raise ConfigError(f"{what} {cut(key)}: no config key is that long; see --dry-run")
    learners = tree.get("learners") if isinstance(tree.get("learners"), dict) else {}
    if parts == ["learners", parts[-1]] and value is None and parts[1] not in learners:
        known = ", ".join(map(str, learners)) or "none"
        raise ConfigError(
            f"--set {key}=null: there is no learner {parts[1]!r} to remove (learners: {known})"
        )
    if parts[0] == "learners" and len(parts) >= 3 and parts[1] not in learners:
        known = ", ".join(map(str, learners)) or "none"
        raise ConfigError(f"{what} {key}: there is no learner {parts[1]!r} (learners: {known})")
    if parts[0] == "learners" and len(parts) == 4 and parts[2] == "task":
        if parts[3] not in TASK_KEYS:  # the old flat form: --set learners.X.task.beta=1
            parts.insert(3, "params")
        elif parts[3] == "type":
            _retype(_tasks_of(tree, parts[1]), value)
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None and depth == 1 and parts[0] == "learners":
            raise ConfigError(f"{what} {key}: learner {part!r} was removed (null) before")
        if not isinstance(child, dict):
            raise ConfigError(f"{what} {key}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value
    if parts[0] == "learners" and len(parts) <= 3:  # a whole learner or task, maybe flat
        tree.update(nest_task_params({"learners": tree["learners"]}))


def from_dict(cls: type, data: Any, key: str) -> Any:
    """Build dataclass ``cls`` from plain data, rejecting unknown keys and wrong types by name."""
    if data is None and key:
        raise ConfigError(
            f"{key}: is null, which would reset the whole section to defaults; set its keys "
            "one by one, or leave it out"
        )
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {cut(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for name in data:
        if name not in names:
            valid = ", ".join(sorted(names))
            raise ConfigError(f"unknown key {cut(_join(key, str(name)))}; valid keys here: {valid}")
    kwargs = {name: _coerce(hints[name], value, _join(key, name)) for name, value in data.items()}
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    """A dotted key for messages; a name that is not short printable text is shown quoted."""
    if not (name.isprintable() and len(name) <= 40):
        name = cut(name, 40)
    return f"{prefix}.{name}" if prefix else name


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {cut(value)}")
        return {str(k): _coerce(args[1], v, _join(key, str(k))) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {cut(value)}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {cut(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected a whole number, got {cut(value)}")
        if abs(value) >= 2**63:  # before validate(): a whole number this big breaks arithmetic
            limit = INT_LIMITS.get(key, "2**63 - 1")
            raise ConfigError(f"{key}: {cut(value)} is too large; at most {limit}")
        return value
    if hint is float:
        return parse_number(value, key)
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{key}: expected text or a number, got {cut(value)}")
        return str(value)
    raise TypeError(f"unsupported config type {hint} at {key}")


# --------------------------------------------------------------------------- validation


def validate(config: Config) -> None:
    """Cross-field checks that types alone cannot express; raises ConfigError naming the key."""
    from generalist.data import is_known_dataset, list_datasets
    from generalist.models.registry import check_model_kwargs, model_name_problem

    _at_least(config.epochs, 1, "epochs")
    _at_most(config.epochs, MAX_EPOCHS, "epochs")
    for key, seed in (("seed", config.seed), ("data.split_seed", config.data.split_seed)):
        _at_least(seed, 0, key)
        _at_most(seed, MAX_SEED, key)
    if config.threads is not None:
        _at_least(config.threads, 1, "threads")
        _at_most(config.threads, MAX_THREADS, "threads")
    _choice(config.schedule_granularity, SCHEDULE_GRANULARITIES, "schedule_granularity")
    validate_name(config.name)
    _validate_out_dir(config.out_dir)
    _validate_device(config.device)
    _choice(config.precision, PRECISIONS, "precision")
    if not is_known_dataset(config.data.dataset):
        _choice(config.data.dataset, list_datasets(), "data.dataset")
    problem = model_name_problem(config.model.name)
    if problem is not None:
        raise ConfigError(f"model.name: {problem}")
    check_model_kwargs(config.model.name, config.model.kwargs)
    _at_least(config.data.batch_size, 1, "data.batch_size")
    _at_least(config.data.eval_batch_size, 1, "data.eval_batch_size")
    val_size = config.data.val_size
    if val_size < 0 or (val_size >= 1 and val_size != int(val_size)):
        raise ConfigError("data.val_size: use a fraction in [0, 1) or a whole count of examples")
    if config.data.crop_padding is not None:
        _at_least(config.data.crop_padding, 0, "data.crop_padding")
    _at_least(config.data.image_size, 8, "data.image_size")
    _at_most(config.data.image_size, MAX_IMAGE_SIZE, "data.image_size")
    _choice(config.data.storage, ("auto", "memory", "stream"), "data.storage")
    _at_least(config.data.memory_budget_gb, 0, "data.memory_budget_gb")
    _at_least(config.data.workers, 0, "data.workers")
    _at_most(config.data.workers, MAX_WORKERS, "data.workers")
    _choice(config.data.bad_files, ("error", "skip"), "data.bad_files")
    for key in ("train_limit", "test_limit"):
        if getattr(config.data, key) is not None:
            _at_least(getattr(config.data, key), 1, f"data.{key}")
    for norm, budget in config.budgets.items():
        if norm not in NORMS:
            raise ConfigError(f"budgets.{norm}: unknown norm; use {', '.join(NORMS)}")
        try:
            parse_eps(budget.eps)
        except ConfigError as error:
            raise ConfigError(f"budgets.{norm}.eps: {error}") from None
        _at_least(budget.steps, 0, f"budgets.{norm}.steps")
        if budget.step_size is not None:
            eps = parse_exact(budget.eps, f"budgets.{norm}.eps")
            _positive(parse_step_size(budget.step_size, eps, f"budgets.{norm}.step_size"), norm)
    if not config.learners:
        raise ConfigError("learners: at least one learner is needed; pick a --preset")
    _validate_robust_preset_keeps_an_attack(config)
    for name, learner in config.learners.items():
        _validate_learner(config, name, learner)
    validate_gammas(config)
    merge = config.merge
    _validate_ema(merge)
    _choice(merge.init, INIT_POLICIES, "merge.init")
    _choice(merge.redistribute.policy, REDISTRIBUTE_POLICIES, "merge.redistribute.policy")
    redistribute_rule(config)
    if config.model.init_from is not None:
        if not Path(config.model.init_from).exists():
            raise ConfigError(
                f"model.init_from: {config.model.init_from} does not exist; pass a run "
                "directory or a model.safetensors file"
            )
        if merge.init != "same":
            raise ConfigError("model.init_from: needs merge.init: same (one shared start)")
    _validate_unlabeled(config)
    _at_least(config.eval.val_steps, 0, "eval.val_steps")
    _at_least(config.eval.test_steps, 0, "eval.test_steps")
    _at_least(config.eval.every, 1, "eval.every")
    _validate_selection(config.eval)
    if config.eval.test_examples is not None:
        _at_least(config.eval.test_examples, 1, "eval.test_examples")
    config.eval_threats()
    _validate_checkpoint(config.checkpoint)
    if config.logging.tensorboard:
        from generalist.tensorboard import require_tensorboard

        require_tensorboard()


def _validate_robust_preset_keeps_an_attack(config: Config) -> None:
    """A robust preset whose every adversarial learner was removed (``learners.X=null``) is
    standard training under a robust method's name: refused, not run. (A learner whose task
    type the user set to ``natural`` is a choice made by name, and is kept.)"""
    from generalist.presets import list_presets, load_method_preset

    if config.preset not in list_presets():
        return
    if any(lc.task.type != "natural" for lc in config.learners.values()):
        return
    robust = [
        name
        for name, learner in (load_method_preset(config.preset).get("learners") or {}).items()
        if (learner or {}).get("task", {}).get("type", "natural") != "natural"
        and name not in config.learners
    ]
    if robust:
        raise ConfigError(
            f"learners.{robust[0]}: the {config.preset} preset without its adversarial "
            f"learner{'s' if len(robust) > 1 else ''} ({', '.join(robust)}) is standard "
            "training; use --preset standard, or keep a learner with an attack"
        )


def _validate_unlabeled(config: Config) -> None:
    """``data.unlabeled`` and ``pseudo_labels``: present exactly when an rst learner reads them."""
    source = config.data.unlabeled
    readers = [n for n, lc in config.learners.items() if _reads_unlabeled(lc.task.type)]
    if readers and source is None:
        raise ConfigError(
            f"learners.{readers[0]}.task.type: {config.learners[readers[0]].task.type} needs "
            f"unlabeled images; set data.unlabeled to {UNLABELED_REST!r} (with "
            "data.train_limit), an .npz holding x_unlabeled, or a folder of images"
        )
    labeler = config.pseudo_labels
    if source is None:
        if labeler.model is not None or labeler.epochs is not None:
            raise ConfigError(
                "pseudo_labels: only runs with data.unlabeled pseudo-label; remove it or set "
                "data.unlabeled"
            )
        return
    if not readers:
        kinds = "/".join(t for t in list_tasks() if _reads_unlabeled(t))
        raise ConfigError(
            f"data.unlabeled: no learner uses unlabeled images (only task.type {kinds} does); "
            f"remove it or add an {kinds} learner"
        )
    if source == UNLABELED_REST:
        if config.data.train_limit is None:
            raise ConfigError(
                f"data.unlabeled: {UNLABELED_REST} needs data.train_limit (the labeled part); "
                "the training examples beyond it become the unlabeled data"
            )
    elif not Path(source).expanduser().exists():
        raise ConfigError(
            f"data.unlabeled: {source} does not exist; pass {UNLABELED_REST!r}, an .npz "
            "holding x_unlabeled, or a folder of images"
        )
    if labeler.model is not None and not Path(labeler.model).exists():
        raise ConfigError(
            f"pseudo_labels.model: {labeler.model} does not exist; pass a run directory or a "
            "model.safetensors file, or leave it unset to train a labeler first"
        )
    if labeler.epochs is not None:
        _at_least(labeler.epochs, 1, "pseudo_labels.epochs")


def _reads_unlabeled(kind: str) -> bool:
    return task_spec(kind).capabilities.reads_unlabeled


def _validate_checkpoint(checkpoint: CheckpointConfig) -> None:
    if checkpoint.every_steps is not None:
        _at_least(checkpoint.every_steps, 1, "checkpoint.every_steps")
    minutes = checkpoint.every_minutes
    if minutes is not None and not minutes > 0:
        raise ConfigError(
            f"checkpoint.every_minutes: must be > 0, got {minutes:g}; use null to turn it off"
        )
    _at_least(checkpoint.keep, 1, "checkpoint.keep")
    _choice(checkpoint.on_nonfinite, NONFINITE_POLICIES, "checkpoint.on_nonfinite")


def _validate_learner(config: Config, name: str, learner: LearnerConfig) -> None:
    key = f"learners.{name}"
    _validate_task(config, f"{key}.task", learner.task)
    opt = learner.optimizer
    _choice(opt.type, OPTIMIZERS, f"{key}.optimizer.type")
    build_schedule(opt.lr, config.epochs, f"{key}.optimizer.lr")
    if not 0 <= opt.momentum < 1:
        raise ConfigError(f"{key}.optimizer.momentum: {opt.momentum:g} must be in [0, 1)")
    if opt.nesterov and opt.type == "sgd" and opt.momentum == 0:
        raise ConfigError(
            f"{key}.optimizer.nesterov: Nesterov momentum needs a momentum > 0; set "
            f"{key}.optimizer.momentum or nesterov: false"
        )
    if opt.weight_decay < 0:
        raise ConfigError(f"{key}.optimizer.weight_decay: must be >= 0, got {opt.weight_decay:g}")
    if len(opt.betas) != 2 or not all(0 <= b < 1 for b in opt.betas):
        raise ConfigError(f"{key}.optimizer.betas: give two numbers in [0, 1), e.g. [0.9, 0.999]")


def resolve_task(task: TaskConfig, key: str) -> TaskSpec:
    """The task ``task.type`` names; turns ``task.params`` into its parameters dataclass (the
    task's defaults filled in) and records or checks an import path's source file."""
    spec = task_spec(task.type, key)
    if not isinstance(task.params, spec.params):  # as written: a mapping (or null)
        if task.params is not None and not isinstance(task.params, dict):
            raise ConfigError(f"{key}.params: expected a mapping, got {cut(task.params)}")
        task.params = from_dict(spec.params, task.params or {}, f"{key}.params")
    if not is_import_path(task.type):
        if task.source is not None:
            raise ConfigError(f"{key}.source: only an import-path task type records one; remove it")
    elif task.source is None or task.source.get("import_path") != task.type:
        task.source = source_record(task.type, what=f"{key}.type")
    else:
        check_source_record(task.source, what=f"{key}.type")
    return spec


def _validate_task(config: Config, key: str, task: TaskConfig) -> None:
    """The attack a task's capabilities ask for, and its own parameters' checks."""
    spec = resolve_task(task, key)
    if spec.capabilities.attack:
        threat, steps, step_size = config.threat_of(task, key)
        _at_least(steps, 1, f"{key}.steps")
        if not step_size > 0:
            raise ConfigError(f"{key}.step_size: must be > 0, got {step_size:g}")
        if steps > 1 and step_size > threat.eps and _explicit_step_size(config, task, threat):
            raise ConfigError(
                f"{key}.step_size: {step_size:g} is larger than epsilon {threat.eps:g}, so "
                f"each of the {steps} steps overshoots the ball; use at most epsilon (or leave it "
                "unset for 2.5·epsilon/steps)"
            )
        norms = spec.capabilities.norms
        if threat.norm not in norms:
            listed = " and ".join([", ".join(norms[:-1]), norms[-1]] if len(norms) > 1 else norms)
            raise ConfigError(f"{key}.norm: {spec.name} supports {listed}, not {threat.norm}")
    else:
        given = [f for f in ("norm", "eps", "steps", "step_size") if getattr(task, f) is not None]
        if given:
            raise ConfigError(
                f"{key}: a {spec.name} learner has no attack; remove {'/'.join(given)}"
            )
    spec.check(task.params, f"{key}.params", config.epochs)


def validate_gammas(config: Config) -> None:
    """γ_i(e) must lie in [0, 1] and sum to 1 at every epoch e = 1..E (docs/algorithm.md)."""
    remainders = [n for n, lc in config.learners.items() if lc.gamma == REMAINDER]
    if len(remainders) > 1:
        raise ConfigError(
            f"learners.{remainders[1]}.gamma: only one learner may take the 'remainder'"
        )
    curves = mixing_weights({n: lc.gamma for n, lc in config.learners.items()}, config.epochs)
    for epoch in range(1, config.epochs + 1):
        if remainders:
            remainder = curves[remainders[0]](epoch)
            if remainder < -1e-6:
                raise ConfigError(
                    f"learners.*.gamma: the fixed γ already sum to {1 - remainder:.4g} > 1 at "
                    f"epoch {epoch}, leaving a negative remainder for learners.{remainders[0]}"
                )
            continue
        total = sum(curve(epoch) for curve in curves.values())
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ConfigError(
                f"learners.*.gamma: γ sum to {total:.4g}, not 1, at epoch {epoch}; "
                "fix the curves or set one learner's gamma to 'remainder'"
            )


def _validate_ema(merge: MergeConfig) -> None:
    if merge.ema_decay != "auto":
        decay = parse_number(merge.ema_decay, "merge.ema_decay")
        if not 0 <= decay < 1:
            raise ConfigError(
                f"merge.ema_decay: {decay:g} must be in [0, 1), or auto to scale with the run"
            )
    horizon = parse_exact(merge.ema_horizon, "merge.ema_horizon")
    if not 0 < horizon <= 1:
        raise ConfigError(
            f"merge.ema_horizon: {float(horizon):g} must be a fraction of the run's steps in "
            "(0, 1], e.g. 1000/46920 (the official run)"
        )


def _validate_selection(evaluation: EvalConfig) -> None:
    _choice(evaluation.select, SELECTION_CRITERIA, "eval.select")
    gate = evaluation.select_min_clean
    if evaluation.select == "clean_gated_robust":
        if gate is None or not 0 <= gate <= 100:
            raise ConfigError(
                "eval.select_min_clean: clean_gated_robust needs a clean-accuracy gate in "
                "[0, 100] %, e.g. --set eval.select_min_clean=88"
            )
    elif gate is not None:
        raise ConfigError(
            f"eval.select_min_clean: only eval.select=clean_gated_robust uses it (here "
            f"{evaluation.select}); remove it"
        )


def redistribute_rule(config: Config) -> tuple[str, Fraction, Fraction]:
    """``(unit, t', c)`` of ``merge.redistribute``, checked and exact (see
    :func:`generalist.training.generalist.redistribution_epochs`)."""
    rule = config.merge.redistribute
    start = parse_exact(rule.start, "merge.redistribute.start")
    every = parse_exact(rule.every, "merge.redistribute.every")
    if start < 0:
        raise ConfigError(f"merge.redistribute.start: must be >= 0, got {float(start):g}")
    unit = rule.unit
    if unit is None and every > 1:  # the rule before `unit` existed: t' a fraction, c epochs
        unit, start = "epoch", start * config.epochs if start <= 1 else start
    unit = unit or "fraction"
    _choice(unit, SCHEDULE_UNITS, "merge.redistribute.unit")
    _at_least(rule.min_gap, 1, "merge.redistribute.min_gap")
    if rule.min_gap != 1 and unit == "epoch":
        raise ConfigError(
            "merge.redistribute.min_gap: only for unit: fraction (with unit: epoch, every is "
            "already the gap); remove min_gap or set unit=fraction"
        )
    if unit == "epoch":
        if every < 1 or every.denominator != 1:
            raise ConfigError(
                f"merge.redistribute.every: {float(every):g} is not a whole number of epochs "
                "(unit: epoch); write e.g. 5"
            )
    elif not 0 < every <= 1 or start > 1:
        raise ConfigError(
            f"merge.redistribute: start {float(start):g} and every {float(every):g} must be "
            "fractions of the run in [0, 1] (unit: fraction; official 0.625 and 1/24), or set "
            "merge.redistribute.unit=epoch to give whole epochs (official 75 and 5)"
        )
    return unit, start, every


def validate_name(name: str) -> None:
    """A run name is one folder name: no separators, no ``..``, room for the timestamp."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(
            f"name: {cut(name)} is not a folder name; use letters, digits, '-', '_' or '.' "
            "without '/', and put the run elsewhere with --out"
        )
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ConfigError(
            f"name: {len(name.encode('utf-8'))} bytes is too long for a folder name; use at "
            f"most {MAX_NAME_BYTES}"
        )


def _validate_out_dir(out_dir: str) -> None:
    """The folder runs go into must be a folder, or creatable as one (no file in the way)."""
    path = Path(out_dir)
    for ancestor in (path, *path.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                where = "is" if ancestor == path else f"is below {ancestor}, which is"
                raise ConfigError(f"out_dir: {cut(out_dir)} {where} a file; give a folder")
            return


def _validate_device(device: str) -> None:
    """A device that exists on this machine: ``mps`` without Apple's GPU, or ``cuda:3`` on a
    two-GPU machine, fails here at ``--dry-run`` rather than when the weights are moved."""
    if device == "auto":
        return
    import torch

    from generalist.devices import resolve_device

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device: {cut(device)} cannot train; use auto, cpu, cuda or cuda:N")
    resolve_device(device)


def _explicit_step_size(config: Config, task: TaskConfig, threat: ThreatModel) -> bool:
    """Whether the step size was written down rather than defaulted to 2.5·ε/steps."""
    if task.step_size is not None:
        return True
    budget = config.budgets.get(threat.norm)
    return task.eps is None and budget is not None and budget.step_size is not None


def _positive(step_size: float, norm: str) -> None:
    if not step_size > 0:
        raise ConfigError(f"budgets.{norm}.step_size: must be > 0, got {step_size:g}")


def _at_most(value: int, high: int, key: str) -> None:
    if value > high:
        raise ConfigError(f"{key}: must be <= {high}, got {cut(value)}")


def _at_least(value: int, low: int, key: str) -> None:
    if value < low:
        raise ConfigError(f"{key}: must be >= {low}, got {cut(value)}")


def _choice(value: str, choices: Any, key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: unknown value {cut(value)}; choose one of {', '.join(choices)}")
