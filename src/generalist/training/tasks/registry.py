"""The task registry: ``@register_task("name")`` on a task class, looked up by a config's
``task.type``, which is a registered name or an import path ``package.module:Class``.

A task class carries everything a config needs to know about it (see
:mod:`generalist.training.tasks.base`): its parameters dataclass, its capabilities and a
``build(params, context)`` classmethod. Registering it is the only step: the config check, the
recipe that builds the learners and the tests parametrised over :func:`list_tasks` all read it
from here, so a new task is one new file (docs/extending.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from generalist.attacks.threat import NORMS
from generalist.errors import ConfigError, cut
from generalist.plugins import is_import_path, load_object
from generalist.training.tasks.base import Capabilities, NoParams, Task, TaskContext

ATTACK_FIELDS = ("norm", "eps", "steps", "step_size", "random_start")
"""The keys of a task's config that describe its attack; ``type`` and ``params`` are the rest."""


class TaskClass(Protocol):
    @classmethod
    def build(cls, params: Any, context: TaskContext) -> Task: ...


T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: how to build it, from which parameters, and what it can do."""

    name: str
    task: TaskClass
    params: type
    """A dataclass; its fields are the ``task.params`` keys, with their defaults."""
    capabilities: Capabilities

    def build(self, params: Any, context: TaskContext) -> Task:
        return self.task.build(params, context)

    def param_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.params))

    def check(self, params: Any, key: str, epochs: int) -> None:
        """The parameters' own range checks (``check(key, epochs)``), if they have any."""
        checker = getattr(params, "check", None)
        if checker is not None:
            checker(key, epochs)


_TASKS: dict[str, TaskSpec] = {}
SPEC_ATTRIBUTE = "task_spec"
"""The attribute :func:`register_task` sets on a task class, so an import path finds its spec."""


def register_task(
    name: str,
    *,
    params: type = NoParams,
    attack: bool = True,
    norms: tuple[str, ...] = NORMS,
    whole_batch: str | None = None,
    reads_unlabeled: bool = False,
) -> Callable[[T], T]:
    """Register a task class under ``name`` (its ``task.type``) with its parameters dataclass
    and capabilities (see :class:`~generalist.training.tasks.base.Capabilities`).

    The class needs a ``build(params, context)`` classmethod returning an object with
    ``name`` and ``loss(model, x, y, generator, position)``.
    """
    if not dataclasses.is_dataclass(params) or not isinstance(params, type):
        raise TypeError(f"task {name!r}: params must be a dataclass type, got {params!r}")
    clashes = [f for f in (*ATTACK_FIELDS, "type", "params") if f in _field_names(params)]
    if clashes:
        raise TypeError(f"task {name!r}: parameter {clashes[0]!r} is a task config key; rename it")
    unknown = [n for n in norms if n not in NORMS]
    if unknown:
        raise TypeError(f"task {name!r}: unknown norm {unknown[0]!r}; use {', '.join(NORMS)}")
    capabilities = Capabilities(
        attack=attack, norms=tuple(norms), whole_batch=whole_batch, reads_unlabeled=reads_unlabeled
    )

    def decorate(task: T) -> T:
        if not callable(getattr(task, "build", None)):
            raise TypeError(f"task {name!r}: {task!r} needs a build(params, context) classmethod")
        if name in _TASKS and _TASKS[name].task is not task:
            raise ConfigError(f"task name {name!r} is already registered; pick another name")
        spec = TaskSpec(name=name, task=task, params=params, capabilities=capabilities)
        _TASKS[name] = spec
        setattr(task, SPEC_ATTRIBUTE, spec)
        return task

    return decorate


def _field_names(params: type) -> set[str]:
    return {f.name for f in dataclasses.fields(params)}


def list_tasks() -> list[str]:
    """The registered task names, in registration order (the built-in ones first); a config
    may also name a task by import path."""
    return list(_TASKS)


def task_spec(kind: str, key: str = "task") -> TaskSpec:
    """The spec of ``kind``: a registered name, or ``package.module:Class`` imported now.

    ``key`` is the task's dotted config key; an unknown name or a bad import path is a one-line
    :class:`ConfigError` naming ``key.type``.
    """
    if is_import_path(kind):
        task = load_object(kind, what=f"{key}.type")
        spec = getattr(task, SPEC_ATTRIBUTE, None)
        if not isinstance(spec, TaskSpec) or spec.task is not task:
            raise ConfigError(
                f"{key}.type: {cut(kind)} is not a registered task; decorate the class with "
                "@generalist.register_task('name', ...) (see docs/extending.md)"
            )
        return spec
    spec = _TASKS.get(kind) if isinstance(kind, str) else None
    if spec is None:
        raise ConfigError(
            f"{key}.type: unknown value {cut(kind)}; choose one of {', '.join(list_tasks())}, "
            "or give an import path such as mypkg.losses:MyTask"
        )
    return spec


def build_task(kind: str, context: TaskContext, params: Any = None) -> Task:
    """The task ``kind`` built from ``context``, with ``params`` (its defaults if None)."""
    spec = task_spec(kind, context.key)
    return spec.build(spec.params() if params is None else params, context)
