"""Tasks: how a base learner turns a clean batch into the loss it descends, one file each.

``base.py`` says what a task is, ``registry.py`` holds ``@register_task``; every other file is
one task. Importing this package registers the built-in ones, in the order of ``BUILT_IN`` (the
order error messages list them in).
"""

import importlib

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
for _name in BUILT_IN:
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
