"""generalist-at: Generalist adversarial training and honest robustness evaluation.

The public Python API (docs: README "Python API", docs/extending.md)::

    import generalist
    result = generalist.train("generalist-d", data=(x_train, y_train, x_test, y_test),
                              model=MyNet(), overrides={"epochs": 30}, out="runs")
    table = generalist.evaluate(result.model, x_test, y_test, threats=["Linf:8/255"])

Names are imported on first use, so ``import generalist`` (and every command) stays fast and
the package's own modules can import ``generalist`` without pulling in the whole stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "train": "generalist.api",
    "TrainResult": "generalist.api",
    "evaluate": "generalist.evaluation.api",
    "EvalTable": "generalist.evaluation.api",
    "build_config": "generalist.config",
    "create_model": "generalist.models",
    "register_model": "generalist.models",
    "load_model": "generalist.weights",
    "AutoAttack": "generalist.attacks",
    "GeneralistMerge": "generalist.training.generalist",
    "generalist_step": "generalist.training.generalist",
    "register_task": "generalist.training.tasks",
}
"""Public name -> the module that defines it."""

__all__ = [
    "AutoAttack",
    "EvalTable",
    "GeneralistMerge",
    "TrainResult",
    "__version__",
    "build_config",
    "create_model",
    "evaluate",
    "generalist_step",
    "load_model",
    "register_model",
    "register_task",
    "train",
]

if TYPE_CHECKING:
    from generalist.api import TrainResult, train
    from generalist.attacks import AutoAttack
    from generalist.config import build_config
    from generalist.evaluation.api import EvalTable, evaluate
    from generalist.models import create_model, register_model
    from generalist.training.generalist import GeneralistMerge, generalist_step
    from generalist.weights import load_model


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'generalist' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
