"""Plug-ins by import path: a user's own model, task or dataset reader named as ``module:callable``.

Everywhere a registry name is taken (``model.name``, a task's ``type``, a dataset reader), the
form ``package.module:attribute`` names an object in the user's own code instead. The module is
imported from the working directory and ``PYTHONPATH``, like ``python -m`` does. A run records
the import path and the SHA-256 of the module's source file (:func:`source_record`), so that
``eval``, ``report`` and ``--resume`` rebuild the same object, and say in one line what is
missing when the module is gone or its file changed (:func:`check_source_record`).

Why a file hash and not a version: a researcher's model file has no version, and a run resumed
or evaluated with an edited class is silently a different experiment.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any

from generalist.errors import ConfigError, cut

_IMPORT_PATH = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")


def is_import_path(name: object) -> bool:
    """Whether ``name`` has the ``module:attribute`` form (registry names never contain ':')."""
    return isinstance(name, str) and ":" in name


def _import_module(module_name: str, what: str, path: str) -> Any:
    # The working directory first, as `python -m` and pytest do: a user's ./mynets.py is found
    # without installing it.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(
                f"{what} {cut(path)}: cannot import module {exc.name!r}; run from the folder that "
                "holds it or add that folder to PYTHONPATH"
            ) from None
        raise ConfigError(
            f"{what} {cut(path)}: importing {module_name!r} failed ({exc}); install what it needs"
        ) from None
    except Exception as exc:  # a user's module may raise anything at import time
        raise ConfigError(
            f"{what} {cut(path)}: importing {module_name!r} raised "
            f"{type(exc).__name__}: {str(exc)[:200]}; fix that module"
        ) from None


def load_object(path: str, *, what: str) -> Any:
    """The object ``package.module:attribute`` names (``attribute`` may be dotted).

    ``what`` names the setting in errors ("model.name", "learners.adv.task.type"): a bad path is
    a one-line :class:`ConfigError` that says which part failed and what to do.
    """
    if not isinstance(path, str) or not _IMPORT_PATH.fullmatch(path):
        raise ConfigError(
            f"{what} {cut(path)} is not an import path; write it as 'package.module:name', "
            "e.g. 'mynets:TinyNet'"
        )
    module_name, attribute = path.split(":", 1)
    obj = _import_module(module_name, what, path)
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ConfigError(
                f"{what} {cut(path)}: module {module_name!r} has no {attribute!r}; check the name"
            )
        obj = getattr(obj, part)
    return obj


def _source_file(obj: Any) -> Path | None:
    try:
        file = inspect.getsourcefile(obj) or inspect.getfile(obj)
    except (TypeError, OSError):
        return None
    return Path(file).resolve() if file else None


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_record(path: str, *, what: str) -> dict[str, Any]:
    """What a run stores about a plug-in: its import path, source file and that file's SHA-256.

    The file is stored as given by Python (absolute); the check compares hashes, not places, so
    a run folder moved to another machine with the same module still evaluates.
    """
    obj = load_object(path, what=what)
    source = _source_file(obj)
    record: dict[str, Any] = {"import_path": path, "file": None, "sha256": None}
    if source is not None and source.is_file():
        record["file"] = str(source)
        record["sha256"] = file_sha256(source)
    return record


def check_source_record(
    record: dict[str, Any],
    *,
    what: str,
    trust_changed: bool = False,
    how_to_accept: str = "or accept it as it is now (generalist eval --trust-changed-code)",
) -> Any:
    """Import the plug-in a run recorded and check its source file is still the same.

    Returns the object. A module that cannot be imported, or whose file's SHA-256 differs from
    the recorded one, is a one-line error ending in ``how_to_accept`` (what the caller offers
    instead of restoring the file); ``trust_changed=True`` accepts a changed file.
    """
    path = record.get("import_path")
    obj = load_object(path, what=what) if isinstance(path, str) else None
    if obj is None:
        raise ConfigError(f"{what}: the run's record names no import path; it cannot be rebuilt")
    expected = record.get("sha256")
    source = _source_file(obj)
    if expected and source is not None and source.is_file() and not trust_changed:
        actual = file_sha256(source)
        if actual != expected:
            raise ConfigError(
                f"{what} {cut(path)}: {source} changed since the run recorded it (SHA-256 "
                f"{actual[:12]}… now, {str(expected)[:12]}… then); restore that file, "
                f"{how_to_accept}"
            )
    return obj
