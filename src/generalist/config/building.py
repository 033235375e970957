"""Building a config: presets, a user YAML and ``--set`` overrides layered into one ``Config``.

A config is built in layers, later ones winning key by key:

1. the dataset profile (``presets/datasets/<dataset>.yaml``: model, epochs, batch size and the
   attack budgets that are standard for that benchmark),
2. the method preset (``presets/methods/<name>.yaml``: the learners and the merge),
3. an optional user YAML, 4. ``--set a.b.c=value`` overrides.

The layers are plain mappings until the end, when :func:`~generalist.config.coercion.from_dict`
types them and :func:`~generalist.config.validation.validate` checks the whole, so everything is
checked before any data is read or any weight is allocated. Tasks written the old flat way
(``task: {type: trades, beta: 6}``) are read here as ``params``, in every layer.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from generalist.config.coercion import dotted_key, from_dict
from generalist.config.schema import Config
from generalist.config.validation import validate
from generalist.errors import ConfigError, cut
from generalist.plain_yaml import YamlSyntaxError, load_plain_yaml
from generalist.training.tasks import ATTACK_FIELDS, TaskSpec, task_spec

MAX_CONFIG_BYTES = 1 << 20
"""A config is a few kB: a file beyond this is the wrong path given to ``--config``."""
MAX_OVERRIDE_CHARS = 10_000
"""The longest ``--set`` value: beyond any real one (a learner given inline is a few hundred)."""


def build_config(
    preset: str | None = None,
    *,
    dataset: str | None = None,
    user_yaml: str | Path | None = None,
    overrides: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
) -> Config:
    """Resolve preset → dataset profile → user YAML → ``--set`` overrides into a valid Config.

    ``overrides`` are ``"key=value"`` texts as ``--set`` takes them (the value read as YAML);
    ``values`` maps dotted keys to Python values (``{"epochs": 30, "model.kwargs": {...}}``),
    applied last.
    """
    from generalist.presets import dataset_profile, load_method_preset

    user = read_config_file(user_yaml) if user_yaml is not None else {}
    method = load_method_preset(preset) if preset else {}
    for section in ("data", "learners"):
        if not isinstance(user.get(section, {}), dict):
            found = type(user[section]).__name__
            raise ConfigError(f"{section}: expected a mapping of keys, got a {found}")
    dataset = dataset or _dig(user, "data", "dataset") or _dig(method, "data", "dataset")
    dataset = dataset or "cifar10"
    if not isinstance(dataset, str):
        raise ConfigError(f"data.dataset: expected a dataset name, got {cut(dataset)}")
    # npz and image folders take the recipe of their images' band: look where they are first
    data_dir = _layered_value([method, user], overrides, "data", "data_dir")
    recipe, profile = dataset_profile(dataset, data_dir if isinstance(data_dir, str) else None)
    tree: dict[str, Any] = {}
    tree = merge_layer(tree, profile)
    by_dataset = method.pop("by_dataset", {}) or {}
    tree = merge_layer(tree, method)
    tree = merge_layer(tree, by_dataset.get(recipe, {}))
    tree = merge_layer(tree, user)
    tree.setdefault("data", {})["dataset"] = dataset
    if preset:
        tree["preset"] = preset
        tree.setdefault("name", preset)
    if isinstance(overrides, str):
        raise ConfigError("overrides: give a list of 'key=value' texts, not one text")
    for item in overrides:
        apply_override(tree, item)
    for key, value in (values or {}).items():
        if not isinstance(key, str):
            raise ConfigError(f"overrides: key {cut(key)} is not text; write e.g. 'epochs'")
        set_key(tree, key, copy.deepcopy(value), "overrides")
    if isinstance(tree.get("learners"), dict):  # `--set learners.X=null` removes X, as in YAML
        tree["learners"] = {k: v for k, v in tree["learners"].items() if v is not None}
    config = from_dict(Config, tree, "")
    validate(config)
    return config


def _layered_value(layers: list[dict], overrides: Sequence[str], *keys: str) -> Any:
    """The value of ``keys`` that the layers and ``--set`` overrides leave, later ones winning,
    read before the tree is built (the dataset profile depends on it)."""
    value = None
    for layer in layers:
        found = _dig(layer, *keys)
        value = found if found is not None else value
    dotted = ".".join(keys)
    for item in overrides:
        if item.partition("=")[0].strip() == dotted:
            scratch: dict[str, Any] = {}
            apply_override(scratch, item)
            value = _dig(scratch, *keys)
    return value


def _dig(tree: dict, *keys: str) -> Any:
    for key in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds, as written (no presets, no defaults); a missing,
    oversized, non-UTF-8 or non-mapping file is one :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; check the path given to --config")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"config file {path} is {path.stat().st_size:,} bytes; a config is a few kB, so "
            "check the path given to --config"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (a binary file?); check the path given "
            "to --config"
        ) from None
    data = load_plain_yaml(text, f"config file {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of keys, not {type(data).__name__}"
        )
    return data


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into a copy of ``base``; a ``null`` learner entry removes that learner."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    if isinstance(merged.get("learners"), dict):
        merged["learners"] = {k: v for k, v in merged["learners"].items() if v is not None}
    return merged


def merge_layer(tree: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """:func:`deep_merge` of one config layer whose tasks are read as tasks: flat task keys go
    into ``params`` (:func:`nest_task_params`), and a learner whose ``type`` the layer changes
    keeps only the earlier ``params`` its new task also has."""
    layer = nest_task_params(layer)
    for name, task in _tasks_of(layer):
        if "type" in task:
            _retype(_tasks_of(tree, name), task["type"])
    return deep_merge(tree, layer)


TASK_KEYS = ("type", *ATTACK_FIELDS, "params", "source")
"""The keys of a task mapping; any other key is a parameter written the old flat way."""


def _tasks_of(tree: dict[str, Any], only: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """``(learner name, task mapping)`` of the learners in ``tree`` that have one."""
    learners = tree.get("learners")
    if not isinstance(learners, dict):
        return []
    return [
        (name, learner["task"])
        for name, learner in learners.items()
        if (only is None or name == only)
        and isinstance(learner, dict)
        and isinstance(learner.get("task"), dict)
    ]


def _spec_or_none(kind: Any) -> TaskSpec | None:
    """The task a layer names, or None when it does not name a known one (validate says so)."""
    try:
        return task_spec(kind)
    except ConfigError:
        return None


def nest_task_params(layer: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``layer`` with every task's flat parameters moved into ``task.params``.

    Configs written before tasks had ``params`` (presets, user YAML and every run's
    ``config.yaml`` until then) put them beside the attack: ``{type: trades, beta: 6}``. There a
    ``null`` meant "the default", and every task carried ``beta: 6.0`` whether it read it or
    not; both are dropped, so an old run's config reads as it did.
    """
    layer = copy.deepcopy(layer)
    for name, task in _tasks_of(layer):
        flat = [key for key in task if key not in TASK_KEYS]
        params = task.get("params", {})
        if not flat or not isinstance(params, dict):
            continue
        spec = _spec_or_none(task.get("type"))
        for key in flat:
            value = task.pop(key)
            if value is None or (key == "beta" and spec and "beta" not in spec.param_names()):
                continue
            if key in params:
                raise ConfigError(
                    f"{dotted_key(f'learners.{name}.task', str(key))}: given both here and in "
                    f"learners.{name}.task.params; keep one"
                )
            params[key] = value
        task["params"] = params
    return layer


def canonical_tasks(tree: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``tree`` (a config as a mapping: a checkpoint's, a ``config.yaml``) with every
    task in today's form: flat parameters nested and ``params`` completed with the task's
    defaults, so that configs written before and after ``params`` existed compare equal when
    they mean the same."""
    tree = nest_task_params(tree)
    for _, task in _tasks_of(tree):
        spec = _spec_or_none(task.get("type", "natural"))
        params = task.get("params", {})
        if spec is None or not isinstance(params, dict):
            continue
        try:
            task["params"] = dataclasses.asdict(from_dict(spec.params, params, "params"))
        except ConfigError:  # a value validate() refuses: compared as written
            continue
    return tree


def _retype(tasks: list[tuple[str, dict[str, Any]]], new_type: Any) -> None:
    """A learner's task becomes ``new_type``: keep the parameters it also has, drop the rest
    (and the old type's source record)."""
    for _, task in tasks:
        if task.get("type") == new_type:
            continue
        task.pop("source", None)
        spec = _spec_or_none(new_type)
        if spec is not None and isinstance(task.get("params"), dict):
            names = spec.param_names()
            task["params"] = {k: v for k, v in task["params"].items() if k in names}


def apply_override(tree: dict[str, Any], item: str) -> None:
    """Apply ``a.b.c=value``; the value is read as YAML so numbers, lists and null work."""
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"--set {cut(item)}: write it as key=value, e.g. --set epochs=30")
    if len(text) > MAX_OVERRIDE_CHARS:
        raise ConfigError(f"--set {cut(key)}: the value is {len(text):,} characters; too long")
    try:
        value = load_plain_yaml(text, f"--set {cut(key)}") if text.strip() else None
    except YamlSyntaxError:
        value = text
    set_key(tree, key, value, "--set")


def set_key(tree: dict[str, Any], key: str, value: Any, what: str = "--set") -> None:
    """Set the dotted ``key`` of a config tree to ``value``; ``what`` names the source in
    errors (``--set`` on the command line, ``overrides`` from Python)."""
    parts = key.split(".")
    if len(key) > 200 or len(parts) > 8:
        raise ConfigError(f"{what} {cut(key)}: no config key is that long; see --dry-run")
    learners = tree.get("learners") if isinstance(tree.get("learners"), dict) else {}
    if parts == ["learners", parts[-1]] and value is None and parts[1] not in learners:
        known = ", ".join(map(str, learners)) or "none"
        raise ConfigError(
            f"--set {key}=null: there is no learner {parts[1]!r} to remove (learners: {known})"
        )
    if parts[0] == "learners" and len(parts) >= 3 and parts[1] not in learners:
        known = ", ".join(map(str, learners)) or "none"
        raise ConfigError(f"{what} {key}: there is no learner {parts[1]!r} (learners: {known})")
    if parts[0] == "learners" and len(parts) == 4 and parts[2] == "task":
        if parts[3] not in TASK_KEYS:  # the old flat form: --set learners.X.task.beta=1
            parts.insert(3, "params")
        elif parts[3] == "type":
            _retype(_tasks_of(tree, parts[1]), value)
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None and depth == 1 and parts[0] == "learners":
            raise ConfigError(f"{what} {key}: learner {part!r} was removed (null) before")
        if not isinstance(child, dict):
            raise ConfigError(f"{what} {key}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value
    if parts[0] == "learners" and len(parts) <= 3:  # a whole learner or task, maybe flat
        tree.update(nest_task_params({"learners": tree["learners"]}))
