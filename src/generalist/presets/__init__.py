"""Shipped recipes: method presets (the learners and the merge) and dataset profiles.

Method presets live in ``methods/<name>.yaml`` and may carry ``by_dataset`` sections for values
that differ per benchmark; dataset profiles in ``datasets/<name>.yaml`` hold what is standard for
a benchmark whatever the method (architecture, epochs, batch size, attack budgets).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

from generalist.errors import ConfigError, cut


def _folder(kind: str) -> Any:
    return resources.files(__package__).joinpath(kind)


def _names(kind: str) -> list[str]:
    return sorted(p.name[:-5] for p in _folder(kind).iterdir() if p.name.endswith(".yaml"))


def list_presets() -> list[str]:
    return _names("methods")


def list_profiles() -> list[str]:
    return _names("datasets")


def _load(kind: str, name: str, what: str, known: list[str]) -> dict[str, Any]:
    if name not in known:
        raise ConfigError(f"unknown {what} {cut(name)}; choose one of {', '.join(known)}")
    return yaml.safe_load(_folder(kind).joinpath(f"{name}.yaml").read_text()) or {}


def load_method_preset(name: str) -> dict[str, Any]:
    return _load("methods", name, "preset", list_presets())


def load_dataset_profile(name: str) -> dict[str, Any]:
    """A dataset without a profile (``npz``, ``imagefolder``) starts from the CIFAR-10 one."""
    known = list_profiles()
    return _load("datasets", name if name in known else "cifar10", "dataset", known)


def describe_preset(name: str) -> str:
    return str(load_method_preset(name).get("description", ""))
