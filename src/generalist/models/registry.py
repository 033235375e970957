"""Model registry: build any architecture by name, timm-style.

Families register factories with ``@register_model("name")`` (exact names) or
``@register_model_pattern(regex, hint)`` (parametric names such as ``wrn-DEPTH-WIDTH``).
``create_model`` is the single entry point; it validates arguments once and adds the input
normalisation, so factories only build the bare network.

A name of the form ``package.module:callable`` is a plug-in (:mod:`generalist.plugins`): the
user's own class or function, given the keyword arguments it accepts of ``num_classes``,
``in_channels`` and ``image_size`` plus the model's ``kwargs``. Its source record (import path
and file SHA-256) travels with the spec, so a rebuild from ``model.json`` refuses an edited file.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from torch import nn

from generalist.errors import ConfigError, cut
from generalist.models.normalization import InputNormalization, NormalizedModel
from generalist.plugins import check_source_record, is_import_path, load_object, source_record


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
    """Whether ``create_model`` can build ``name``: lets configs fail before any data is loaded.

    An import path is "known" when it names a callable (importing its module to find out);
    a broken one raises its own one-line :class:`ConfigError` instead of returning False.
    """
    return model_name_problem(name) is None


def model_name_problem(name: str) -> str | None:
    """Why ``create_model`` cannot build ``name`` (one line), or None if it can (an import
    path is imported to find out; a broken one raises its own one-line ConfigError)."""
    if is_import_path(name):
        _plugin(name, "model.name")
        return None
    if name in _MODELS:
        return None
    for pattern, _, _, check in _PATTERNS:
        match = pattern.fullmatch(name)
        if match is not None:
            return None if check is None else check(match)
    return unknown_model_message(name)


def check_model_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse ``model.kwargs`` the model cannot take, at config time (before any data is read)
    rather than when the first model is built."""
    if not kwargs:
        return
    if not is_import_path(name):
        raise ConfigError(
            f"model.kwargs is only for a model given by import path; {cut(name)} takes none"
        )
    factory = _plugin(name, "model.name")
    clash = sorted(set(kwargs) & {"num_classes", "in_channels", "image_size"})
    if clash:
        raise ConfigError(
            f"model.kwargs sets {', '.join(clash)}, which generalist passes from the data; "
            "remove it from model.kwargs"
        )
    unknown = sorted(set(kwargs) - set(_accepted(factory, dict(kwargs))))
    if unknown:
        raise ConfigError(
            f"model.kwargs {', '.join(unknown)}: {cut(name)} takes no such argument; match "
            "model.kwargs to its parameters"
        )


def model_source(name: str) -> dict[str, Any] | None:
    """What a run records about a plug-in model (import path, file, SHA-256); None for a
    registered name, which ships with generalist and needs no record."""
    return source_record(name, what="model.name") if is_import_path(name) else None


def _plugin(name: str, what: str, source: Mapping[str, Any] | None = None) -> Callable[..., Any]:
    """The callable ``name`` imports; with ``source``, also checked against the recorded file."""
    if source is not None:
        factory = check_source_record(dict(source), what=what)
    else:
        factory = load_object(name, what=what)
    if not callable(factory):
        raise ConfigError(
            f"{what} {cut(name)} is a {type(factory).__name__}, not a class or function that "
            "builds an nn.Module"
        )
    return factory


def _accepted(factory: Callable[..., Any], offered: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``offered`` that ``factory`` accepts (all with ``**kwargs``)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: offer nothing
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return dict(offered)
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {key: value for key, value in offered.items() if key in names}


def _plugin_model(
    name: str, sizes: dict[str, int], kwargs: Mapping[str, Any], source: Mapping[str, Any] | None
) -> nn.Module:
    factory = _plugin(name, "model.name", source)
    check_model_kwargs(name, kwargs)
    try:
        model = factory(**_accepted(factory, sizes), **kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"model.name {cut(name)} could not be called with {sorted(kwargs) or 'no'} "
            f"model.kwargs ({exc}); match model.kwargs to its parameters"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model.name {cut(name)} returned a {type(model).__name__}, not a torch nn.Module"
        )
    return model


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


def _bare_model(
    name: str,
    sizes: dict[str, int],
    kwargs: Mapping[str, Any] | None,
    source: Mapping[str, Any] | None,
) -> nn.Module:
    if is_import_path(name):
        return _plugin_model(name, sizes, kwargs or {}, source)
    check_model_kwargs(name, kwargs or {})
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
    kwargs: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build ``name`` for inputs of shape [B, in_channels, image_size, image_size] in [0,1].

    ``name`` is a registered name (``resnet18``, ``wrn-28-10``) or an import path
    (``mynets:TinyNet``), which is called with ``kwargs`` too. ``source`` is the record
    :func:`model_source` made when a run started: the plug-in's file must still have that
    SHA-256. With ``mean`` and ``std`` the network is wrapped in a ``NormalizedModel`` so
    callers (and attacks) never normalise themselves; without them the bare network is returned.
    """
    if not isinstance(name, str):
        raise ConfigError(f"model name must be text such as 'resnet18'; got {cut(name)}")
    _check_positive_int(num_classes, "num_classes")
    _check_positive_int(in_channels, "in_channels")
    _check_positive_int(image_size, "image_size")
    if (mean is None) != (std is None):
        raise ConfigError("give both mean and std for input normalisation, or neither")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ConfigError(f"model.kwargs must be a mapping of keyword arguments; got {cut(kwargs)}")
    sizes = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    net = _bare_model(name, sizes, kwargs, source)
    if mean is None or std is None:
        return net
    normalize = InputNormalization(mean, std)
    if normalize.num_channels not in (1, in_channels):
        raise ConfigError(
            f"mean/std have {normalize.num_channels} values but the model has {in_channels} "
            "input channels; give one value per channel"
        )
    return NormalizedModel(normalize, net)
