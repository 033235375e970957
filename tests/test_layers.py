"""Imports point down only: a module may import its own layer and the layers below it.

The layers, bottom first, are the architecture docs/architecture.md draws. A new top-level
module must be placed in one, so the map cannot silently go stale.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import generalist

PACKAGE = Path(generalist.__file__).parent
LAYERS = [
    # shared building blocks: no knowledge of configs, runs or training
    {"", "errors", "durable", "schedules", "devices", "inference", "tensorboard"}
    | {"backends", "threads", "compiling"}
    | {"runlock", "plain_yaml", "plugins", "torchrun"}
    | {"attacks", "data", "models", "presets"},
    {"config"},
    {"checkpoint", "rundir", "manifest"},
    {"evaluation"},
    {"training"},
    {"reporting"},
    {"cli", "__main__"},
]
LAYER_OF = {name: index for index, names in enumerate(LAYERS) for name in names}


def _top(dotted: str) -> str:
    """``generalist.training.loop`` -> ``training``; the package itself -> ``""``."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else ""


def _ours(module: str) -> bool:
    return module == "generalist" or module.startswith("generalist.")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every ``generalist`` import, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, _top(a.name)) for a in node.names if _ours(a.name)]
        elif isinstance(node, ast.ImportFrom) and _ours(node.module or ""):
            if node.module == "generalist":  # from generalist import durable / __version__
                names = [a.name if a.name in LAYER_OF else "" for a in node.names]
                found += [(node.lineno, name) for name in names]
            else:
                found.append((node.lineno, _top(node.module)))
    return found


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _layer(path: Path) -> int:
    relative = path.relative_to(PACKAGE)
    top = relative.parts[0].removesuffix(".py")
    return LAYER_OF[top if top != "__init__" else ""]


def test_every_module_has_a_layer():
    unplaced = {
        p.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for p in _modules()
        if p.relative_to(PACKAGE).parts[0].removesuffix(".py") not in LAYER_OF | {"__init__": 0}
    }
    assert not unplaced, f"place these in LAYERS: {sorted(unplaced)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path):
    own = _layer(path)
    upward = [
        f"{path.relative_to(PACKAGE)}:{line} imports generalist.{name} "
        f"(layer {LAYER_OF[name]} > {own})"
        for line, name in _imports(path)
        if LAYER_OF[name] > own
    ]
    assert not upward, "; ".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "config.py"
    bad.write_text("def f():\n    from generalist.training.loop import train\n")
    assert _imports(bad) == [(2, "training")]
    assert LAYER_OF["training"] > LAYER_OF["config"]
