"""What each file of a run folder must hold for a report to read it, checked before it is used.

Reports read folders that may be years old, half-written, or edited by hand; a wrong type deep
inside ``eval.json`` used to surface as a traceback from a table renderer. Each file is checked
here against a small description of the fields the reports read (types, finite numbers, counts
that are not negative), and the first problem comes back as text naming the field, so the
caller can skip that file or run with one line and report the others.
"""

from __future__ import annotations

import math
from typing import Any


class _Number:
    """A finite int or float (never a bool)."""


class _Count:
    """An int >= 0."""


NUMBER = _Number()
COUNT = _Count()
TEXT = str
FLAG = bool

Schema = Any
"""A type, NUMBER or COUNT; ``{key: schema}`` (a key ending in ``?`` may be absent, ``*``
matches any other key); ``[schema]`` for a list; a tuple for alternatives (``None`` allowed)."""

SCORE = {"accuracy": NUMBER, "count": COUNT}
PASSES = {
    "forward": COUNT,
    "backward": COUNT,
    "forward_per_point": NUMBER,
    "backward_per_point": NUMBER,
}
STAGE = {"name": TEXT, "accuracy": NUMBER, "count": COUNT, "seconds": NUMBER, "cost?": PASSES}
ATTACK = {**STAGE, "stages?": [STAGE]}
THREAT = {
    "threat": TEXT,
    "eps": NUMBER,
    "attacks": [ATTACK],
    "worst_case": SCORE,
    "warnings": [TEXT],
}
CELL = {"corruption": TEXT, "severity": COUNT, "accuracy": NUMBER, "count": COUNT}
CORRUPTIONS = {
    "source": {"kind": TEXT},
    "n_examples": COUNT,
    "covered": [TEXT],
    "left_out": {"*": TEXT},
    "clean": SCORE,
    "mean": NUMBER,
    "mean_relative_to_clean": (NUMBER, None),
    "per_corruption": {"*": {"accuracy": NUMBER, "relative_to_clean": (NUMBER, None)}},
    "cells": [CELL],
}
EVALUATION = {
    "format": TEXT,
    "created?": TEXT,
    "model": {"path": TEXT, "sha256": TEXT},
    "data": {"n_examples": COUNT, "split": TEXT, "dataset": TEXT, "fingerprint": TEXT},
    "settings": {"attacks": [TEXT], "seed": int, "processes?": COUNT},
    "clean": SCORE,
    "cost?": {**PASSES, "clean?": PASSES},
    "threats": [THREAT],
    "union": SCORE,
    "warnings": [TEXT],
    "corruptions?": CORRUPTIONS,
}
SUMMARY = {
    "test": {"clean": NUMBER, "*": NUMBER},
    "test_pgd_steps?": (COUNT, None),
    "test_examples?": COUNT,
    "seconds?": NUMBER,
    "preset?": (TEXT, None),
}
METRICS_RECORD = {
    "epoch": COUNT,
    "val?": {"*": {"*": NUMBER}},
    "gamma?": {"*": NUMBER},
    "redistributed?": FLAG,
}
CONFIG = {
    "name?": (TEXT, int, float, None),
    "preset?": (TEXT, None),
    "data?": {"dataset?": TEXT},
    "epochs?": (COUNT, None),
    "eval?": {"learners?": FLAG, "val_steps?": (COUNT, None)},
}
"""Only what reports read; the rest of a config is not a report's business."""


def problem(value: Any, schema: Schema, where: str = "") -> str:
    """The first way ``value`` does not fit ``schema``, as ``field: what is wrong``; "" if none."""
    if isinstance(schema, tuple):
        if any(not problem(value, option, where) for option in schema if option is not None):
            return ""
        if value is None and None in schema:
            return ""
        return f"{where or 'the file'}: unexpected {_kind(value)}"
    if schema is NUMBER:
        ok = isinstance(value, float) and math.isfinite(value)
        ok = ok or (isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63)
        return "" if ok else f"{where}: not a finite number"
    if schema is COUNT:
        ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63
        return "" if ok else f"{where}: not a whole number >= 0"
    if isinstance(schema, type):
        return "" if isinstance(value, schema) else f"{where}: expected {schema.__name__}"
    if isinstance(schema, list):
        if not isinstance(value, list):
            return f"{where or 'the file'}: expected a list, got {_kind(value)}"
        return next(
            (p for i, item in enumerate(value) if (p := problem(item, schema[0], f"{where}[{i}]"))),
            "",
        )
    return _mapping_problem(value, schema, where)


def _mapping_problem(value: Any, schema: dict[str, Schema], where: str) -> str:
    if not isinstance(value, dict):
        return f"{where or 'the file'}: expected a mapping, got {_kind(value)}"
    for key, inner in schema.items():
        name = key.removesuffix("?")
        if key == "*":
            continue
        if name not in value:
            if key.endswith("?"):
                continue
            return f"{_join(where, name)}: missing"
        found = problem(value[name], inner, _join(where, name))
        if found:
            return found
    if "*" in schema:
        named = {key.removesuffix("?") for key in schema}
        for key, item in value.items():
            if key not in named:
                found = problem(item, schema["*"], _join(where, str(key)[:40]))
                if found:
                    return found
    return ""


def evaluation_problem(record: dict[str, Any]) -> str:
    """:data:`EVALUATION`, plus what types cannot say: every threat lists the same attacks as
    the settings, and counts never exceed the points evaluated."""
    found = problem(record, EVALUATION)
    if found:
        return found
    n = record["data"]["n_examples"]
    attacks = record["settings"]["attacks"]
    for i, threat in enumerate(record["threats"]):
        names = [attack["name"] for attack in threat["attacks"]]
        if names != attacks:
            return f"threats[{i}].attacks: {names[:4]} differ from settings.attacks {attacks[:4]}"
    scores = [record["clean"], record["union"]] + [t["worst_case"] for t in record["threats"]]
    if any(score["count"] > n for score in scores):
        return f"a count exceeds data.n_examples ({n})"
    return ""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
