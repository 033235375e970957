"""Tasks: how a base learner turns a clean batch into the loss it descends, one file each.

``base.py`` says what a task is, ``registry.py`` holds ``@register_task``; every other module of
this package is one task, registered by importing it here. A new file is found without being
listed: adding a task is that file (and, if wanted, a preset; docs/extending.md).
"""

import importlib
import pkgutil

from generalist.training.tasks.base import (
    AppliesGradients,
    Capabilities,
    DrawsUnlabeled,
    NoParams,
    Task,
    TaskContext,
    TrainingAttack,
)
from generalist.training.tasks.registry import (
    ATTACK_FIELDS,
    TaskSpec,
    build_task,
    list_tasks,
    register_task,
    task_spec,
)

BUILT_IN = ("natural", "adversarial", "trades", "mart", "fat", "cure", "iat", "rst")
"""The tasks the library ships, in the order messages list them; other files follow by name."""
_FILES = sorted({m.name for m in pkgutil.iter_modules(__path__)} - {"base", "registry"})
for _name in (*BUILT_IN, *(f for f in _FILES if f not in BUILT_IN)):
    importlib.import_module(f"{__name__}.{_name}")

__all__ = [
    "ATTACK_FIELDS",
    "BUILT_IN",
    "AppliesGradients",
    "Capabilities",
    "DrawsUnlabeled",
    "NoParams",
    "Task",
    "TaskContext",
    "TaskSpec",
    "TrainingAttack",
    "build_task",
    "list_tasks",
    "register_task",
    "task_spec",
]
