"""Model registry: build any architecture by name, timm-style.

Families register factories with ``@register_model("name")`` (exact names) or
``@register_model_pattern(regex, hint)`` (parametric names such as ``wrn-DEPTH-WIDTH``).
``create_model`` is the single entry point; it validates arguments once and adds the input
normalisation, so factories only build the bare network.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Protocol

from torch import nn

from generalist.errors import ConfigError, cut
from generalist.models.normalization import InputNormalization, NormalizedModel


class ModelFactory(Protocol):
    def __call__(self, *, num_classes: int, in_channels: int, image_size: int) -> nn.Module: ...


NameCheck = Callable[[re.Match[str]], "str | None"]
"""A pattern family's check of a matching name: the problem (one line), or None if buildable."""


class PatternFactory(Protocol):
    def __call__(
        self, match: re.Match[str], *, num_classes: int, in_channels: int, image_size: int
    ) -> nn.Module: ...


_MODELS: dict[str, ModelFactory] = {}
_PATTERNS: list[tuple[re.Pattern[str], str, PatternFactory, NameCheck | None]] = []


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register ``factory(*, num_classes, in_channels, image_size)`` under ``name``."""

    def decorate(factory: ModelFactory) -> ModelFactory:
        if name in _MODELS:
            raise ConfigError(f"model name {name!r} is already registered; pick another name")
        _MODELS[name] = factory
        return factory

    return decorate


def register_model_pattern(
    pattern: str, hint: str, check: NameCheck | None = None
) -> Callable[[PatternFactory], PatternFactory]:
    """Register a factory for every name fully matching ``pattern``; ``hint`` is shown to users.

    ``check`` vets a matching name before anything is built (``wrn-10-0`` matches the pattern
    but has no channels), so a config naming it fails at ``--dry-run``, not at model creation.
    """

    def decorate(factory: PatternFactory) -> PatternFactory:
        _PATTERNS.append((re.compile(pattern), hint, factory, check))
        return factory

    return decorate


def list_models() -> list[str]:
    """The registered exact names (parametric families, e.g. ``wrn-D-W``, accept more)."""
    return sorted(_MODELS)


def is_known_model(name: str) -> bool:
    """Whether ``create_model`` can build ``name``: lets configs fail before any data is loaded."""
    return model_name_problem(name) is None


def model_name_problem(name: str) -> str | None:
    """Why ``create_model`` cannot build ``name`` (one line), or None if it can."""
    if name in _MODELS:
        return None
    for pattern, _, _, check in _PATTERNS:
        match = pattern.fullmatch(name)
        if match is not None:
            return None if check is None else check(match)
    return unknown_model_message(name)


def unknown_model_message(name: str) -> str:
    hints = "".join(f" or {hint}" for _, hint, _, _ in _PATTERNS)
    return f"unknown model {cut(name)}; use one of {', '.join(list_models())}{hints}"


def count_parameters(model: nn.Module) -> int:
    """Number of trainable-or-not parameters (buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def _check_positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive whole number; got {cut(value)}")
    return value


def _bare_model(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    sizes = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    factory = _MODELS.get(name)
    if factory is not None:
        return factory(**sizes)
    for pattern, _, pattern_factory, check in _PATTERNS:
        match = pattern.fullmatch(name)
        if match is not None:
            problem = None if check is None else check(match)
            if problem is not None:
                raise ConfigError(problem)
            return pattern_factory(match, **sizes)
    raise ConfigError(unknown_model_message(name))


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """Build ``name`` for inputs of shape [B, in_channels, image_size, image_size] in [0,1].

    With ``mean`` and ``std`` the network is wrapped in a ``NormalizedModel`` so callers (and
    attacks) never normalise themselves; without them the bare network is returned.
    """
    if not isinstance(name, str):
        raise ConfigError(f"model name must be text such as 'resnet18'; got {cut(name)}")
    _check_positive_int(num_classes, "num_classes")
    _check_positive_int(in_channels, "in_channels")
    _check_positive_int(image_size, "image_size")
    if (mean is None) != (std is None):
        raise ConfigError("give both mean and std for input normalisation, or neither")
    net = _bare_model(name, num_classes, in_channels, image_size)
    if mean is None or std is None:
        return net
    normalize = InputNormalization(mean, std)
    if normalize.num_channels not in (1, in_channels):
        raise ConfigError(
            f"mean/std have {normalize.num_channels} values but the model has {in_channels} "
            "input channels; give one value per channel"
        )
    return NormalizedModel(normalize, net)
