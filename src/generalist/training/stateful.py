"""What "stateful" means for the training state, and its generic flattening into a checkpoint.

Each object whose state a resume needs gives ``state_dict()`` and ``load_state_dict()`` in
torch's sense (Lightning Fabric's idiom): modules and optimizers as they are, a learner
(:class:`~generalist.training.learner.Learner`), a task that keeps state (:class:`Stateful`),
the process-wide RNGs and the training state itself (:mod:`generalist.training.state`). A
state dict is a tree of dicts and lists whose leaves are tensors or JSON values;
:func:`flatten` turns it into a checkpoint's two halves (a flat table of tensors, keyed by
their ``/``-joined path, and the JSON left in place) and :func:`unflatten` back. Whether a
checkpoint fits a run is whether its objects take it back: a ``load_state_dict`` that cannot
raises :class:`CheckpointError` naming the misfit, and nothing else describes the layout.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from generalist.errors import CheckpointError, cut

_TENSORS_ONLY = object()
"""What :func:`flatten` leaves in the JSON for a container that held only tensors: nothing."""


@runtime_checkable
class Stateful(Protocol):
    """An object whose state a checkpoint keeps; a task that keeps state between steps (CURE's
    revision model) implements these two and is saved and restored with its learner."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def flatten(tree: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """``(tensors, json)``: every tensor of ``tree`` under its ``/``-joined path (below
    ``prefix``), and the tree without them. A container that held only tensors leaves nothing
    behind (an empty one stays); in a list it leaves ``{}`` so that positions hold."""
    tensors: dict[str, torch.Tensor] = {}
    rest = _split(tree, prefix, tensors)
    return tensors, ({} if rest is _TENSORS_ONLY else rest)


def _split(node: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, torch.Tensor):
        tensors[path] = node
        return _TENSORS_ONLY
    below = f"{path}/" if path else ""
    if isinstance(node, dict):
        kept = {str(k): _split(v, f"{below}{k}", tensors) for k, v in node.items()}
        rest = {k: v for k, v in kept.items() if v is not _TENSORS_ONLY}
        return _TENSORS_ONLY if kept and not rest else rest
    if isinstance(node, (list, tuple)):
        items = [_split(v, f"{below}{i}", tensors) for i, v in enumerate(node)]
        return [{} if v is _TENSORS_ONLY else v for v in items]
    return node


def unflatten(tensors: dict[str, torch.Tensor], rest: Any) -> Any:
    """The tree :func:`flatten` split: each tensor put back at its path into a copy of
    ``rest``; a path the JSON has no room for raises :class:`CheckpointError`."""
    tree = copy.deepcopy(rest)
    for path, tensor in tensors.items():
        *parents, last = path.split("/")
        node = tree
        for key in parents:
            node = _descend(node, key, path)
        if isinstance(node, dict) and last not in node:
            node[last] = tensor
        elif isinstance(node, list) and _is_index(last, node) and node[int(last)] == {}:
            node[int(last)] = tensor
        else:
            raise CheckpointError(f"holds {cut(path)}, which this run has no place for")
    return tree


def _descend(node: Any, key: str, path: str) -> Any:
    if isinstance(node, dict):
        child = node.setdefault(key, {})
        if isinstance(child, (dict, list)):
            return child
    elif isinstance(node, list) and _is_index(key, node):
        return node[int(key)]
    raise CheckpointError(f"holds {cut(path)}, which this run has no place for")


def _is_index(key: str, items: list[Any]) -> bool:
    return key.isdigit() and int(key) < len(items)


def check_entries(
    state: Any, required: set[str], where: str, optional: frozenset[str] = frozenset()
) -> None:
    """``state`` is a dict holding ``required`` and at most ``optional`` besides."""
    if not isinstance(state, dict):
        raise CheckpointError(f"has no record of {where}")
    missing = sorted(required - set(state))
    if missing:
        raise CheckpointError(f"lacks {cut(missing)} of {where}")
    strangers = sorted(set(state) - required - optional)
    if strangers:
        raise CheckpointError(f"holds {cut(strangers)} of {where}, which this run has no place for")


def load_module(module: nn.Module, state: Any, what: str) -> None:
    """``module.load_state_dict``, strict; a misfit names ``what`` and its first difference."""
    if not isinstance(state, dict):
        raise CheckpointError(f"has no weights for this run's {what}")
    check_same_layout(module.state_dict(), state, f"does not fit this run's {what}")
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise CheckpointError(f"does not fit this run's {what}: {first}") from None


def load_generator(generator: torch.Generator, state: Any, what: str) -> None:
    """``generator.set_state``; a state of another size or type names ``what``."""
    try:
        generator.set_state(state)
    except (RuntimeError, TypeError):
        found = f" ({describe_layout(state)})" if isinstance(state, torch.Tensor) else ""
        raise CheckpointError(f"holds a malformed state for {what}{found}") from None


def check_same_layout(expected: dict[str, torch.Tensor], found: dict[str, Any], what: str) -> None:
    """Same names, shapes and dtypes, or :class:`CheckpointError` naming the first difference
    (``load_state_dict`` alone would cast a float16 weight silently)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing or unexpected:
        detail = f"missing {cut(missing[:3])}" if missing else f"unexpected {cut(unexpected[:3])}"
        raise CheckpointError(f"{what}: {detail}")
    for key, tensor in expected.items():
        other = found[key]
        if not isinstance(other, torch.Tensor):
            raise CheckpointError(f"{what}: {cut(key)} is not a tensor")
        if other.shape != tensor.shape or other.dtype != tensor.dtype:
            raise CheckpointError(
                f"{what}: {cut(key)} is {describe_layout(other)} where "
                f"{describe_layout(tensor)} is expected"
            )


def describe_layout(tensor: torch.Tensor) -> str:
    """``float32[64, 3, 3, 3]``: a tensor's dtype and shape as messages show them."""
    return f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}"
