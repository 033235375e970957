"""The optimizer types a learner may use (``learners.<name>.optimizer.type``), by name.

Each entry builds a ``torch.optim`` optimizer from a learner's parameters and its config
section (``momentum``, ``nesterov``, ``weight_decay``, ``betas``). Optimizers start at lr 0:
the learner's schedule sets the real value before every step. This table is the only place an
optimizer type is named: the config check reads its names, the recipe builds from it, and a
checkpoint keeps whatever ``optimizer.state_dict()`` holds, so adding a type is one entry here
(docs/extending.md, "Add an optimizer").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def _sgd(params: Iterable[torch.Tensor], section: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params,
        lr=0.0,
        momentum=section.momentum,
        nesterov=section.nesterov,
        weight_decay=section.weight_decay,
    )


def _adam(params: Iterable[torch.Tensor], section: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(
        params, lr=0.0, betas=tuple(section.betas), weight_decay=section.weight_decay
    )


def _adamw(params: Iterable[torch.Tensor], section: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        params, lr=0.0, betas=tuple(section.betas), weight_decay=section.weight_decay
    )


OPTIMIZERS: dict[str, Callable[[Iterable[torch.Tensor], Any], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adam": _adam,
    "adamw": _adamw,
}
