"""Property-based fuzzing of everything a user types or a report reads.

Two readers take arbitrary input: the config builder (``--set`` values and ``--config`` files)
and the run-folder reader behind ``report``/``compare``. For any input, each must either work
or raise the project's one-line error; a traceback, a hang or a message that repeats unbounded
input is a bug. Hypothesis runs with a fixed seed (``derandomize``) and a bounded budget, so the
suite stays deterministic and takes seconds.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from training_runs import train_tiny

from generalist.cli import main
from generalist.config import Config, build_config
from generalist.errors import GeneralistError
from generalist.evaluation.tables import render_markdown
from generalist.reporting.compare import comparison_table, render_text
from generalist.reporting.runs import load_runs, run_labels

FUZZ = settings(
    derandomize=True,
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ_FOLDERS = settings(FUZZ, max_examples=50)
"""Each run-folder example copies two small runs: fewer examples, the same few seconds."""

LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.sampled_from([10**400, -1, 0, 2**64, 1e999, -1e999])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["8/255", "1e999/1", "Linf:2", "remainder", "nan", "", "../x", "meta"])
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _dotted_keys(tree: Any, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict) or not tree:
        return [prefix] if prefix else []
    keys = [prefix] if prefix else []
    for key, value in tree.items():
        keys += _dotted_keys(value, f"{prefix}.{key}" if prefix else str(key))
    return keys


KEYS = sorted(
    set(_dotted_keys(build_config("generalist-d", dataset="digits").to_dict()))
    | set(_dotted_keys(Config().to_dict()))
)


def _one_line(error: GeneralistError) -> None:
    message = str(error)
    assert message and "\n" not in message and len(message) < 700, message


@FUZZ
@given(
    overrides=st.lists(
        st.tuples(st.sampled_from(KEYS) | st.text(max_size=10), VALUES | st.text(max_size=30)),
        min_size=1,
        max_size=3,
    )
)
def test_any_set_override_builds_a_config_or_is_one_line(overrides):
    items = []
    for key, value in overrides:
        text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True)
        items.append(f"{key}={text.strip()}")
    try:
        build_config("generalist-d", dataset="digits", overrides=items)
    except GeneralistError as error:
        _one_line(error)


@FUZZ
@given(
    tree=st.dictionaries(st.sampled_from(sorted({k.split(".")[0] for k in KEYS})), VALUES),
    raw=st.none() | st.binary(max_size=64) | st.text(max_size=64),
)
def test_any_config_file_builds_a_config_or_is_one_line(tree, raw):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        if raw is None:
            path.write_text(yaml.safe_dump(tree))
        elif isinstance(raw, bytes):
            path.write_bytes(raw)
        else:
            path.write_text(raw)
        try:
            build_config("generalist-d", dataset="digits", user_yaml=path)
        except GeneralistError as error:
            _one_line(error)


# --- run folders --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory) -> Path:
    """A finished tiny run with one evaluation, its checkpoints dropped (the reader skips
    them) so that copying it per example is cheap."""
    run = train_tiny(tmp_path_factory.mktemp("fuzz"), "epochs=2")
    shutil.rmtree(run / "checkpoints")
    argv = ["eval", str(run), "--attacks", "pgd-1", "--n-examples", "8", "--no-progress"]
    assert main([*argv, "--threat", "Linf:0.1", "--threat", "L2:1", "--out", str(run / "ev")]) == 0
    return run


FILES = ("config.yaml", "metrics.jsonl", "summary.json", "ev/eval.json")


def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            found += _paths(value, (*prefix, index))
    return found


def _mutate(tree: Any, path: tuple, action: str, value: Any) -> Any:
    if not path:
        return value if action != "delete" else {}
    parent = tree
    for step in path[:-1]:
        parent = parent[step]
    if action == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif action == "duplicate" and isinstance(parent, list):
        parent.append(parent[path[-1]])
    else:
        parent[path[-1]] = value
    return tree


def _read(path: Path) -> Any:
    if path.name == "config.yaml":
        return yaml.safe_load(path.read_text())
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return json.loads(path.read_text())


def _write(path: Path, tree: Any) -> None:
    if path.name == "config.yaml":
        path.write_text(yaml.safe_dump(tree))
    elif path.suffix == ".jsonl":
        lines = tree if isinstance(tree, list) else [tree]
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    else:
        path.write_text(json.dumps(tree))


@FUZZ_FOLDERS
@given(data=st.data())
def test_report_readers_skip_a_damaged_run_and_report_the_others(evaluated_run, data):
    with tempfile.TemporaryDirectory() as folder:
        damaged = Path(shutil.copytree(evaluated_run, Path(folder) / "damaged"))
        intact = Path(shutil.copytree(evaluated_run, Path(folder) / "intact"))
        for _ in range(data.draw(st.integers(1, 3))):
            target = damaged / data.draw(st.sampled_from(FILES))
            tree = _read(target)
            path = data.draw(st.sampled_from(_paths(tree)))
            action = data.draw(st.sampled_from(["replace", "delete", "duplicate"]))
            value = data.draw(VALUES | st.sampled_from([math.nan, math.inf]))
            _write(target, _mutate(tree, path, action, value))
        skipped: list[str] = []
        try:
            runs = load_runs([damaged, intact], skipped)
        except GeneralistError as error:
            raise AssertionError(f"the intact run was not reported: {error}") from None
        assert intact.resolve() in [run.path.resolve() for run in runs]
        assert all("\n" not in line and len(line) < 700 for line in skipped)
        render_text(comparison_table(runs, run_labels(runs)))
        for run in runs:
            for evaluation in run.evaluations:
                render_markdown(evaluation.record)
