"""Plain data (parsed YAML, Python values) to the schema's dataclasses, checked key by key.

One generic coercer for every section: it walks a dataclass's type hints, so a new field needs
no code here. An unknown key or a value of the wrong type is a :class:`ConfigError` naming the
dotted key and what was expected; ranges and cross-field rules are
:mod:`generalist.config.validation`'s. Task parameters (each task's own dataclass) are read by
the same coercer.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from generalist.config.schema import INT_LIMITS
from generalist.errors import ConfigError, cut
from generalist.schedules import parse_number


def from_dict(cls: type, data: Any, key: str) -> Any:
    """Build dataclass ``cls`` from plain data, rejecting unknown keys and wrong types by name."""
    if data is None and key:
        raise ConfigError(
            f"{key}: is null, which would reset the whole section to defaults; set its keys "
            "one by one, or leave it out"
        )
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {cut(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for name in data:
        if name not in names:
            valid = ", ".join(sorted(names))
            raise ConfigError(
                f"unknown key {cut(dotted_key(key, str(name)))}; valid keys here: {valid}"
            )
    kwargs = {
        name: _coerce(hints[name], value, dotted_key(key, name)) for name, value in data.items()
    }
    return cls(**kwargs)


def dotted_key(prefix: str, name: str) -> str:
    """A dotted key for messages; a name that is not short printable text is shown quoted."""
    if not (name.isprintable() and len(name) <= 40):
        name = cut(name, 40)
    return f"{prefix}.{name}" if prefix else name


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """``value`` as the type ``hint`` names (a field's annotation), or a ConfigError at ``key``.

    YAML gives no float for ``8/255`` and no text for ``0.625``: floats are parsed as numbers
    (fractions included), text keys also take a number as written."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {cut(value)}")
        return {str(k): _coerce(args[1], v, dotted_key(key, str(k))) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {cut(value)}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {cut(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected a whole number, got {cut(value)}")
        if abs(value) >= 2**63:  # before validate(): a whole number this big breaks arithmetic
            limit = INT_LIMITS.get(key, "2**63 - 1")
            raise ConfigError(f"{key}: {cut(value)} is too large; at most {limit}")
        return value
    if hint is float:
        return parse_number(value, key)
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{key}: expected text or a number, got {cut(value)}")
        return str(value)
    raise TypeError(f"unsupported config type {hint} at {key}")
