"""The run configuration's schema: every key, its type, its default and what it means.

A ``Config`` is plain dataclasses, one per section of ``config.yaml``; the docstring under a
field is its documentation (``generalist train --dry-run`` prints the resolved values). The
allowed values of the choice keys and the limits of the numeric ones are named here too, so the
schema is read in one place; :mod:`generalist.config.building` fills it from presets, YAML and
``--set``, and :mod:`generalist.config.validation` checks it against these. ``Config`` also
answers which attack a task means (:meth:`Config.threat_of`), its gaps filled from ``budgets``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from generalist.attacks.threat import ThreatModel, parse_norm
from generalist.errors import ConfigError
from generalist.optimizers import OPTIMIZERS  # noqa: F401  (a choice list of the schema; its table lives with the optimizers)
from generalist.schedules import REMAINDER, parse_exact, parse_step_size
from generalist.threads import MAX_THREADS
from generalist.training.generalist import START_RULES
from generalist.training.tasks import task_spec

# the values a choice key accepts
UNLABELED_REST = "rest"
"""``data.unlabeled: rest``: the training examples ``data.train_limit`` leaves out."""
STORAGES = ("auto", "memory", "stream")
BAD_FILE_POLICIES = ("error", "skip")
REDISTRIBUTE_POLICIES = ("per_step_in_epoch", "once_per_c_epochs", "never")
SELECTION_CRITERIA = ("clean+robust", "robust", "clean_gated_robust", "none")
INIT_POLICIES = tuple(START_RULES)  # merge.init: the rules training/generalist.py defines
NONFINITE_POLICIES = ("stop", "skip")

# the bounds of the numeric keys
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
    """The task's parameters: a mapping as written, resolved by validation
    (:func:`generalist.config.validation.resolve_task`) to the task's own dataclass with its
    defaults filled in (so ``config.yaml`` records every value used)."""
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
        """The threats validation and the final test attack with: ``eval.threats`` if given,
        else each attacking learner's (in learner order, once each), else ``budgets.Linf``."""
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
