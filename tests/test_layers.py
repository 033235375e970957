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
CONFIG_ROOMS = [{"config.schema"}, {"config.coercion"}, {"config.validation"}, {"config.building"}]
LAYERS = [
    # shared building blocks: no knowledge of configs, runs or training
    {"", "errors", "durable", "schedules", "devices", "inference", "tensorboard"}
    | {"backends", "threads", "compiling"}
    | {"runlock", "plain_yaml", "plugins", "torchrun", "optimizers"}
    | {"attacks", "data", "models", "presets"},
    # the algorithm core: the Generalist update, the learner and the tasks take plain values,
    # never a config (training/recipe.py reads those off the config)
    {"training.tasks", "training.generalist", "training.learner"}
    | {"training.cure", "training.mixup", "training.unlabeled_pool", "training.stateful"},
    # the config's rooms, each a layer of its own: the schema imports no other room, the
    # coercer reads plain data into it, validation checks it, building layers and validates
    # ("config" is the package's __init__, its public names)
    *CONFIG_ROOMS[:-1],
    CONFIG_ROOMS[-1] | {"config", "preflight"},
    {"checkpoint", "weights", "rundir", "manifest"},
    {"evaluation"},
    {"training"},
    {"reporting"},
    {"api"},
    {"cli", "__main__"},
]
LAYER_OF = {name: index for index, names in enumerate(LAYERS) for name in names}


def _top(dotted: str) -> str:
    """``generalist.training.loop`` -> ``training``, ``generalist.training.tasks.cure`` ->
    ``training.tasks`` (a module placed on its own); the package itself -> ``""``."""
    parts = dotted.split(".")
    if len(parts) > 2 and f"{parts[1]}.{parts[2]}" in LAYER_OF:
        return f"{parts[1]}.{parts[2]}"
    return parts[1] if len(parts) > 1 else ""


def _ours(module: str) -> bool:
    return module == "generalist" or module.startswith("generalist.")


def _exported_from(name: str) -> str:
    """The layer name of ``from generalist import name``: a subpackage, a public name of the
    facade (``train`` lives in ``api``), or the package itself (``__version__``)."""
    if name in LAYER_OF:
        return name
    module = generalist._EXPORTS.get(name)
    return _top(module) if module else ""


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """The nodes under ``if TYPE_CHECKING:``: names for type checkers, never imported."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            guarded |= {inner for stmt in node.body for inner in ast.walk(stmt)}
    return guarded


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every ``generalist`` import, function-level ones included.

    The package's ``__init__.py`` is the public facade: it re-exports names of every layer,
    imported lazily by module name, so only its type checkers' imports are left out."""
    tree = ast.parse(path.read_text())
    skipped = _type_checking_only(tree) if path == PACKAGE / "__init__.py" else set()
    found = []
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, _top(a.name)) for a in node.names if _ours(a.name)]
        elif isinstance(node, ast.ImportFrom) and _ours(node.module or ""):
            if node.module == "generalist":  # from generalist import durable / __version__
                found += [(node.lineno, _exported_from(a.name)) for a in node.names]
            elif node.module.count(".") == 1:  # from generalist.training import cure
                top = _top(node.module)
                names = [_top(f"{node.module}.{a.name}") for a in node.names]
                found += [(node.lineno, name if name in LAYER_OF else top) for name in names]
            else:
                found.append((node.lineno, _top(node.module)))
    return found


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _layer(path: Path) -> int:
    relative = path.relative_to(PACKAGE)
    dotted = ".".join(("generalist", *relative.with_suffix("").parts))
    top = _top(dotted)
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


def test_the_check_sees_a_public_name_imported_from_below(tmp_path):
    bad = tmp_path / "models.py"
    bad.write_text("from generalist import evaluate, __version__\n")
    assert _imports(bad) == [(1, "evaluation"), (1, "")]


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "config.py"
    bad.write_text("def f():\n    from generalist.training.loop import train\n")
    assert _imports(bad) == [(2, "training")]
    assert LAYER_OF["training"] > LAYER_OF["config"]


def test_the_algorithm_core_sits_below_the_config(tmp_path):
    """The Generalist update, the learner and the tasks import no config: a task file that did
    would be an upward import."""
    bad = tmp_path / "mytask.py"
    bad.write_text("from generalist.config import Config\nfrom generalist.training import loop\n")
    assert _imports(bad) == [(1, "config"), (2, "training")]
    core = _layer(PACKAGE / "training" / "tasks" / "trades.py")
    assert core == _layer(PACKAGE / "training" / "generalist.py") < LAYER_OF["config.schema"]
    assert core == _layer(PACKAGE / "training" / "learner.py")
    assert _layer(PACKAGE / "training" / "loop.py") > LAYER_OF["config"]


def test_every_config_module_is_a_room():
    """A new file in ``config/`` must be placed among the rooms, or it would pass as the
    package's top and could import any room."""
    rooms = {name for room in CONFIG_ROOMS for name in room}
    files = {f"config.{p.stem}" for p in (PACKAGE / "config").glob("*.py") if p.stem != "__init__"}
    assert files == rooms
    assert all(_layer(PACKAGE / "config" / f"{name[7:]}.py") == LAYER_OF[name] for name in rooms)


def test_the_config_rooms_point_down(tmp_path):
    """schema < coercion < validation < building: a schema that imported validation, or
    validation that imported building (which calls it), would be an upward import; so would a
    room importing the package's public names instead of the room that defines them."""
    layers = [LAYER_OF[name] for room in CONFIG_ROOMS for name in room]
    assert layers == sorted(set(layers))
    assert LAYER_OF["config"] == LAYER_OF["config.building"]
    bad = tmp_path / "schema.py"
    bad.write_text(
        "from generalist.config.validation import validate\n"
        "from generalist.config import Config\n"
        "from generalist.config import schema\n"
    )
    assert _imports(bad) == [(1, "config.validation"), (2, "config"), (3, "config.schema")]
