"""No function in ``src/generalist`` is longer than 60 lines, so each one fits on a screen.

A function's length runs from its ``def`` line to its last line: its docstring, comments and
blank lines count, its decorators do not. Methods and nested functions count on their own (a
nested function's lines count towards its outer function too).

Run this file as a script to list every function over a length, longest first::

    PYTHONPATH=src python tests/test_function_length.py [LINES]
"""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

import generalist

PACKAGE = Path(generalist.__file__).parent
MAX_LINES = 60
STILL_LONG: set[tuple[str, str]] = set()
# Functions still longer than MAX_LINES (none now). An entry fails the test once its function is
# short, so this list can only shrink. Never add to it: split the new function instead.


def function_lengths(source: str) -> dict[str, tuple[int, int]]:
    """Every function and method in ``source``: qualified name (``Class.method``,
    ``outer.inner``) -> (first line, length in lines, decorators left out)."""
    lengths: dict[str, tuple[int, int]] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = prefix + child.name
                lengths[name] = (child.lineno, child.end_lineno - child.lineno + 1)
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return lengths


def package_lengths() -> dict[tuple[str, str], tuple[int, int]]:
    """(path below ``src/generalist``, qualified name) -> (first line, length), for every
    function of the package."""
    return {
        (path.relative_to(PACKAGE).as_posix(), name): where
        for path in sorted(PACKAGE.rglob("*.py"))
        for name, where in function_lengths(path.read_text(encoding="utf-8")).items()
    }


def test_no_function_is_longer_than_the_limit():
    too_long = [
        f"{path}:{line} {name} has {length} lines"
        for (path, name), (line, length) in package_lengths().items()
        if length > MAX_LINES and (path, name) not in STILL_LONG
    ]
    assert not too_long, (
        f"functions over {MAX_LINES} lines; split each by what it does:\n" + "\n".join(too_long)
    )


def test_the_list_of_functions_still_long_only_shrinks():
    lengths = package_lengths()
    short_now = [
        f"{path} {name}: "
        + (f"{lengths[path, name][1]} lines" if (path, name) in lengths else "no such function")
        for path, name in sorted(STILL_LONG)
        if lengths.get((path, name), (0, 0))[1] <= MAX_LINES
    ]
    assert not short_now, "delete these entries from STILL_LONG:\n" + "\n".join(short_now)


def test_length_counts_from_def_to_the_last_line_without_decorators():
    body = "\n".join(f"    x = {i}" for i in range(MAX_LINES - 1))
    source = textwrap.dedent(
        """\
        import functools


        @functools.cache
        def at_the_limit():
        {body}


        class Holder:
            @staticmethod
            def over_the_limit():
                '''One more line: this docstring.'''
        {indented}

                def nested():
                    return 1
        """
    ).format(body=body, indented=textwrap.indent(body, "    "))
    lengths = function_lengths(source)
    assert lengths["at_the_limit"] == (5, MAX_LINES)
    assert lengths["Holder.over_the_limit"][1] == MAX_LINES + 4  # docstring, blank, nested
    assert lengths["Holder.over_the_limit.nested"][1] == 2


if __name__ == "__main__":
    limit = int(sys.argv[1]) if len(sys.argv) > 1 else MAX_LINES
    rows = sorted(package_lengths().items(), key=lambda item: -item[1][1])
    for (path, name), (line, length) in rows:
        if length > limit:
            print(f"{length:4d}  {path}:{line}  {name}")
