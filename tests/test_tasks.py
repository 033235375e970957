"""Tasks as plug-ins: every registered task is checked here by the same tests (a new task file
is tested by registering it), and old configs with flat task keys still read the same."""

from __future__ import annotations

import dataclasses
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from training_runs import (
    assert_same_result,
    quiet,
    sigterm_at_step,
    tiny_config,
    train_tiny,
)

from generalist.attacks.threat import NORMS, ThreatModel
from generalist.cli import main as cli_main
from generalist.config import build_config
from generalist.data import BatchAugment
from generalist.errors import ConfigError
from generalist.models import create_model
from generalist.rundir import RunDir
from generalist.schedules import PiecewiseLinear
from generalist.training import loop
from generalist.training import tasks as tasks_package
from generalist.training.learner import Learner
from generalist.training.processes import check_replicas
from generalist.training.save_and_resume import config_difference
from generalist.training.signals import TrainingInterrupted
from generalist.training.tasks import (
    TaskContext,
    TrainingAttack,
    list_tasks,
    register_task,
    registry,
    task_spec,
)
from generalist.training.unlabeled_pool import PseudoLabeledPool

TASK_KEYS = ("type", "norm", "eps", "steps", "step_size", "random_start", "params", "source")
DIGITS = ("data.train_limit=64", "data.test_limit=32", "data.val_size=16")


def _pgd_at(*overrides: str):
    return build_config("pgd-at", dataset="digits", overrides=list(overrides))


def _as_robust_learner(kind: str, *extra: str) -> list[str]:
    """Overrides that make pgd-at's one learner a ``kind`` learner, with what that task needs."""
    spec = task_spec(kind)
    needs = [f"learners.adv_linf.task.type={kind}"]
    if not spec.capabilities.attack:
        needs.append("learners.adv_linf.task.norm=null")
    if spec.capabilities.reads_unlabeled:
        needs += ["data.unlabeled=rest", "pseudo_labels.epochs=1"]
    return [*DIGITS, *needs, *extra]


def _context(kind: str, model: torch.nn.Module) -> TaskContext:
    spec = task_spec(kind)
    attack = None
    if spec.capabilities.attack:
        attack = TrainingAttack(ThreatModel.of(spec.capabilities.norms[0], "0.1"), 2, 0.05)
    pool = None
    if spec.capabilities.reads_unlabeled:
        images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
        pool = PseudoLabeledPool(images, torch.arange(64) % 10, BatchAugment())
    return TaskContext(attack=attack, model=model, epochs=2, seed=3, key="t", pseudo_labeled=pool)


def _two_steps(kind: str) -> tuple[list[float], Learner]:
    torch.manual_seed(0)
    model = create_model("tiny-cnn", num_classes=10, in_channels=1, image_size=8)
    spec = task_spec(kind)
    learner = Learner(
        name=kind,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9),
        lr_schedule=PiecewiseLinear.constant(0.05),
        gamma=PiecewiseLinear.constant(1.0),
        task=spec.build(spec.params(), _context(kind, model)),
        generator=torch.Generator().manual_seed(1),
    )
    batch = torch.Generator().manual_seed(2)
    x, y = torch.rand(16, 1, 8, 8, generator=batch), torch.randint(0, 10, (16,), generator=batch)
    # positions past any default warm-up (CURE's natural 10 %), so the task's own loss runs
    return [float(learner.train_step(x, y, position)) for position in (1.5, 2.0)], learner


def test_every_file_of_the_package_is_one_registered_task():
    """A new task is one file: the package imports every module in it (no list to extend)."""
    folder = Path(tasks_package.__file__).parent
    files = {p.stem for p in folder.glob("*.py")} - {"__init__", "base", "registry"}
    assert files == set(list_tasks())
    for kind in list_tasks():
        assert task_spec(kind).task.__module__ == f"generalist.training.tasks.{kind}"


@pytest.mark.parametrize("kind", list_tasks())
def test_every_task_declares_params_with_defaults_that_pass_its_own_check(kind):
    spec = task_spec(kind)
    defaults = spec.params()  # every parameter has a default
    spec.check(defaults, f"learners.x.task.params ({kind})", epochs=10)
    assert not set(spec.param_names()) & set(TASK_KEYS)
    assert set(spec.capabilities.norms) <= set(NORMS) and spec.capabilities.norms


@pytest.mark.parametrize("kind", list_tasks())
def test_every_task_takes_finite_reproducible_steps_and_leaves_train_mode(kind):
    losses, learner = _two_steps(kind)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert learner.model.training
    start = create_model("tiny-cnn", num_classes=10, in_channels=1, image_size=8)
    moved = [
        not torch.equal(a, b)
        for a, b in zip(learner.model.parameters(), start.parameters(), strict=True)
    ]
    assert any(moved)
    again, _ = _two_steps(kind)
    assert again == losses  # the learner's generator alone decides every draw


@pytest.mark.parametrize("kind", list_tasks())
def test_every_task_is_configured_by_type_and_its_params_reach_config_yaml(kind, tmp_path):
    config = build_config("pgd-at", dataset="digits", overrides=_as_robust_learner(kind))
    task = config.learners["adv_linf"].task
    assert task.params == task_spec(kind).params()
    written = tmp_path / "config.yaml"
    written.write_text(config.to_yaml())
    saved = config.to_dict()["learners"]["adv_linf"]["task"]["params"]
    assert saved == dataclasses.asdict(task_spec(kind).params())  # every value used, recorded
    again = build_config(user_yaml=written)
    assert again.to_dict() == config.to_dict()
    assert config.eval_threats() if task_spec(kind).capabilities.attack else True


@pytest.mark.parametrize("kind", list_tasks())
def test_every_norm_a_task_does_not_support_is_refused_in_one_line(kind):
    spec = task_spec(kind)
    if not spec.capabilities.attack:
        with pytest.raises(ConfigError, match=rf"^learners\.adv_linf\.task: a {kind} learner has"):
            build_config(
                "pgd-at", dataset="digits", overrides=[f"learners.adv_linf.task.type={kind}"]
            )
        return
    for norm in NORMS:
        overrides = _as_robust_learner(
            kind, f"learners.adv_linf.task.norm={norm}", "learners.adv_linf.task.eps=0.5"
        )
        if norm in spec.capabilities.norms:
            assert build_config("pgd-at", dataset="digits", overrides=[*overrides])
            continue
        with pytest.raises(ConfigError) as error:
            build_config("pgd-at", dataset="digits", overrides=overrides)
        message = str(error.value)
        assert message.startswith(f"learners.adv_linf.task.norm: {kind} supports ")
        assert message.endswith(f", not {norm}") and "\n" not in message


@pytest.mark.parametrize("kind", list_tasks())
def test_an_unknown_parameter_names_the_key_and_the_valid_ones(kind):
    with pytest.raises(ConfigError) as error:
        build_config(
            "pgd-at",
            dataset="digits",
            overrides=_as_robust_learner(kind, "learners.adv_linf.task.params.betta=1"),
        )
    valid = ", ".join(sorted(task_spec(kind).param_names()))
    assert str(error.value) == (
        f"unknown key 'learners.adv_linf.task.params.betta'; valid keys here: {valid}"
    )


@pytest.mark.parametrize("kind", list_tasks())
def test_unlabeled_data_goes_with_the_tasks_that_read_it(kind):
    needs = _as_robust_learner(kind)
    reads = task_spec(kind).capabilities.reads_unlabeled
    without = [o for o in needs if not o.startswith(("data.unlabeled", "pseudo_labels"))]
    with_data = [*without, "data.unlabeled=rest"]
    with pytest.raises(ConfigError) as error:
        _pgd_at(*(without if reads else with_data))
    if reads:
        assert str(error.value).startswith(
            f"learners.adv_linf.task.type: {kind} needs unlabeled images; set data.unlabeled"
        )
    else:
        assert str(error.value).startswith("data.unlabeled: no learner uses unlabeled images")
    assert _pgd_at(*(with_data if reads else without))


@pytest.mark.parametrize("kind", list_tasks())
def test_data_parallel_replicas_are_refused_only_for_whole_batch_tasks(kind):
    config = _pgd_at(*_as_robust_learner(kind))
    batches = SimpleNamespace(num_examples=64, batch_size=16)
    reason = task_spec(kind).capabilities.whole_batch
    if reason is None:
        check_replicas(config, 2, batches)
        return
    with pytest.raises(ConfigError) as error:
        check_replicas(config, 2, batches)
    assert str(error.value) == (
        f"learners.adv_linf is a {kind} learner, {reason}, so it cannot train with 2 "
        "data-parallel replicas per learner; use one process per learner"
    )


# ---- the flat form of configs written before task.params ---------------------------------


def test_flat_task_keys_are_read_into_params(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("learners:\n  trades:\n    task: {type: trades, norm: Linf, beta: 3}\n")
    config = build_config("trades", dataset="digits", user_yaml=flat)
    assert config.learners["trades"].task.params.beta == 3
    by_set = build_config("trades", dataset="digits", overrides=["learners.trades.task.beta=2"])
    assert by_set.learners["trades"].task.params.beta == 2
    later = build_config(
        "trades", dataset="digits", user_yaml=flat, overrides=["learners.trades.task.params.beta=4"]
    )
    assert later.learners["trades"].task.params.beta == 4  # the later layer wins, either form
    both = tmp_path / "both.yaml"
    both.write_text("learners:\n  trades:\n    task: {beta: 3, params: {beta: 4}}\n")
    with pytest.raises(ConfigError) as error:
        build_config("trades", dataset="digits", user_yaml=both)
    assert str(error.value) == (
        "learners.trades.task.beta: given both here and in learners.trades.task.params; keep one"
    )


def test_a_config_yaml_of_the_flat_era_builds_and_matches_todays(tmp_path):
    """Every task of a run's config.yaml carried all 16 fields then: ``beta: 6.0`` whatever the
    task, ``null`` for the others' fields. It must build, and compare equal on resume."""
    now = build_config("cure", dataset="digits", overrides=["learners.cure.task.beta=5"])
    old = now.to_dict()
    task = old["learners"]["cure"]["task"]
    params = task.pop("params")
    del task["source"]
    task.update(params, tau=None, mixup_alpha=None, unlabeled_fraction=None, revision_rate=None)
    assert config_difference(old, now.to_dict()) == ""
    natural = build_config("generalist-d", dataset="digits").to_dict()
    for learner in natural["learners"].values():
        learner["task"].pop("params"), learner["task"].pop("source")
        learner["task"].update(beta=6.0, tau=None, mask_fraction=None, natural_warmup=None)
    written = tmp_path / "config.yaml"
    written.write_text(__import__("yaml").safe_dump(natural))
    rebuilt = build_config(user_yaml=written)
    assert config_difference(natural, rebuilt.to_dict()) == ""
    assert rebuilt.learners["natural"].task.params == task_spec("natural").params()


def test_a_stopped_run_whose_config_yaml_is_in_the_flat_form_resumes_bit_identically(tmp_path):
    """A run started before ``task.params`` has a flat config.yaml; it must still resume, to
    the bit, with its task's own state (CURE's revision model) restored."""
    extra = ("learners.cure.task.steps=2",)
    reference = train_tiny(tmp_path / "reference", *extra, preset="cure")
    config = tiny_config(
        tmp_path / "stopped", "checkpoint.every_minutes=null", *extra, preset="cure"
    )
    with sigterm_at_step(13), pytest.raises(TrainingInterrupted) as stopped:
        loop.train(config, progress=False, echo=quiet)
    run = RunDir.open(stopped.value.run)
    tree = yaml.safe_load(run.config_path.read_text())
    task = tree["learners"]["cure"]["task"]
    task.update(task.pop("params"), tau=None, mixup_alpha=None, unlabeled_fraction=None)
    del task["source"]
    run.config_path.write_text(yaml.safe_dump(tree, sort_keys=False))
    assert "params" not in run.config_path.read_text()
    assert cli_main(["train", "--resume", str(run.path), "--no-progress"]) == 0
    assert_same_result(run.path, reference)


def test_a_new_type_keeps_only_the_params_it_has():
    cure_to_trades = build_config(
        "cure", dataset="digits", overrides=["learners.cure.task.type=trades"]
    )
    assert cure_to_trades.learners["cure"].task.params == task_spec("trades").params(beta=5.0)
    to_adversarial = build_config(
        "cure", dataset="digits", overrides=["learners.cure.task.type=adversarial"]
    )
    assert to_adversarial.learners["cure"].task.params == task_spec("adversarial").params()


# ---- a task given by import path ---------------------------------------------------------

PLUGIN = """
from dataclasses import dataclass

import torch.nn.functional as F

from generalist.errors import ConfigError
from generalist.training.tasks import register_task


@dataclass(frozen=True)
class ScaledParams:
    weight: float = 2.0

    def check(self, key, epochs):
        if not self.weight > 0:
            raise ConfigError(f"{key}.weight: must be > 0, got {self.weight:g}")


@register_task("scaled-adversarial-test", params=ScaledParams, norms=("Linf",))
@dataclass(frozen=True)
class ScaledTask:
    attack: object
    weight: float
    name: str = "scaled-adversarial-test"

    @classmethod
    def build(cls, params, context):
        return cls(context.require_attack("scaled"), params.weight)

    def loss(self, model, x, y, generator, position):
        return self.weight * F.cross_entropy(model(self.attack.craft(model, x, y, generator)), y)


class NotATask:
    pass
"""


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """``./mylosses.py`` in the working directory; the registry and imports restored after."""
    (tmp_path / "mylosses.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(registry, "_TASKS", dict(registry._TASKS))
    yield tmp_path
    sys.modules.pop("mylosses", None)


def test_a_task_by_import_path_trains_and_records_its_source(plugin_dir):
    overrides = [*DIGITS, "learners.adv_linf.task.type=mylosses:ScaledTask", "epochs=1"]
    overrides.append(f"out_dir={plugin_dir / 'runs'}")
    config = build_config("pgd-at", dataset="digits", overrides=overrides)
    task = config.learners["adv_linf"].task
    assert task.params.weight == 2.0
    assert task.source["import_path"] == "mylosses:ScaledTask"
    assert task.source["file"] == str((plugin_dir / "mylosses.py").resolve())
    assert len(task.source["sha256"]) == 64
    result = loop.train(config, progress=False, echo=lambda *_: None)
    assert torch.isfinite(torch.tensor(result.run.read_metrics()[0]["train_loss"]["adv_linf"]))
    saved = build_config(user_yaml=result.run.config_path)  # what --resume and eval read
    assert saved.learners["adv_linf"].task.source == task.source
    (plugin_dir / "mylosses.py").write_text(textwrap.dedent(PLUGIN) + "\n# edited\n")
    with pytest.raises(ConfigError) as error:
        build_config(user_yaml=result.run.config_path)
    assert str(error.value).startswith(
        "learners.adv_linf.task.type 'mylosses:ScaledTask': "
    ) and "changed since the run recorded it" in str(error.value)


@pytest.mark.parametrize(
    ("type_", "message"),
    [
        (
            "mylosses:NotATask",
            "learners.adv_linf.task.type: 'mylosses:NotATask' is not a registered task; decorate "
            "the class with @generalist.register_task('name', ...) (see docs/extending.md)",
        ),
        (
            "nomodule:Task",
            "learners.adv_linf.task.type 'nomodule:Task': cannot import module 'nomodule'; run "
            "from the folder that holds it or add that folder to PYTHONPATH",
        ),
    ],
)
def test_a_bad_import_path_is_one_line(plugin_dir, type_, message):
    with pytest.raises(ConfigError) as error:
        _pgd_at(f"learners.adv_linf.task.type={type_}")
    assert str(error.value) == message


def test_a_plugin_params_check_and_norms_apply(plugin_dir):
    base = ["learners.adv_linf.task.type=mylosses:ScaledTask"]
    with pytest.raises(ConfigError, match=r"^learners\.adv_linf\.task\.params\.weight: must be"):
        build_config(
            "pgd-at", dataset="digits", overrides=[*base, "learners.adv_linf.task.weight=0"]
        )
    with pytest.raises(ConfigError, match=r"scaled-adversarial-test supports Linf, not L2$"):
        build_config(
            "pgd-at", dataset="digits", overrides=[*base, "learners.adv_linf.task.norm=L2"]
        )


def test_registering_a_taken_name_or_a_clashing_parameter_is_refused(monkeypatch):
    monkeypatch.setattr(registry, "_TASKS", dict(registry._TASKS))

    @dataclasses.dataclass(frozen=True)
    class Clashing:
        eps: float = 0.1

    with pytest.raises(TypeError, match="parameter 'eps' is a task config key"):
        register_task("clash", params=Clashing)

    class Other:
        @classmethod
        def build(cls, params, context):
            return cls()

    with pytest.raises(ConfigError, match="task name 'trades' is already registered"):
        register_task("trades")(Other)
