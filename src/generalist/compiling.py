"""``torch.compile`` for the models and the attacks' inner step, without changing any name.

``torch.compile(model)`` returns a wrapper whose state-dict keys all start with ``_orig_mod.``;
the merge's flat views, checkpoints and ``save_model`` all address weights by name, so the
wrapper would break each of them. :func:`compile_in_place` compiles the module's own forward
instead (``nn.Module.compile``): same object, same keys, same parameters. It must run after
every ``copy.deepcopy`` of the model (a compiled module does not deep-copy), i.e. once the
learners, teachers and global model exist.

An attack on a compiled model takes its projected step through :func:`compiled` too (see
:mod:`generalist.attacks.pgd`), so the PGD inner loop is forward, backward and one fused
element-wise kernel per step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

BACKEND = "inductor"
"""The ``torch.compile`` back end; the CPU tests swap in ``aot_eager`` (same tracing, no C++
code generation: inductor took 49 s to compile a tiny CNN's first step on this project's CPU)."""


def compile_in_place(*modules: nn.Module) -> None:
    """Compile each module's forward in place; keys, parameters and identity are unchanged."""
    for module in modules:
        if not is_compiled(module):
            module.compile(backend=BACKEND)


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def compiled(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``function`` compiled once per process and back end, so every attack shares it."""
    return _compiled(function, BACKEND)


@functools.cache
def _compiled(function: Callable[..., torch.Tensor], backend: str) -> Callable[..., torch.Tensor]:
    return torch.compile(function, backend=backend)
