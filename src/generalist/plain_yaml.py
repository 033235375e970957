"""YAML as plain data, with limits: what a config file or a ``--set`` value may be.

``yaml.safe_load`` already refuses to build objects, but it happily expands a 600-byte alias
bomb into gigabytes, recurses until Python gives up on deep nesting, lets a repeated key
silently win, and calls a ``!!python/...`` tag merely "not valid YAML". Here the document is
composed first and its node graph measured without expanding it (aliases are counted as often
as they are used), so a hostile or mistaken file fails in microseconds with one line that says
what is wrong, and never repeats the expanded text.
"""

from __future__ import annotations

import yaml

from generalist.errors import ConfigError

MAX_VALUES = 100_000
"""Scalars, lists and mappings a document may expand to (a big config holds a few hundred)."""
MAX_DEPTH = 50
"""Levels of nesting (configs need about six)."""
_PYTHON_TAG = "tag:yaml.org,2002:python/"
_MERGE_KEY = "tag:yaml.org,2002:merge"
_BEFORE_QUOTE = " \t\n[{,:-?"
"""Where a quote character opens a quoted scalar rather than sitting inside plain text."""


class YamlSyntaxError(ConfigError):
    """The text is not YAML at all (a ``--set`` value then stays the text itself)."""


def load_plain_yaml(text: str, where: str) -> object:
    """The data of YAML ``text``; ``where`` begins every error (``config file X``, ``--set k``).

    Raises :class:`ConfigError` for invalid syntax (with the line), a Python tag, a repeated
    key, more than :data:`MAX_DEPTH` levels or :data:`MAX_VALUES` values, and a number Python
    cannot read.
    """
    if _flow_depth(text) > MAX_DEPTH:  # PyYAML's scanner is quadratic in this depth
        raise ConfigError(f"{where} is nested too deeply; at most {MAX_DEPTH} levels")
    try:
        loader = yaml.SafeLoader(text)  # refuses control characters already
    except yaml.YAMLError:
        raise YamlSyntaxError(f"{where} holds characters YAML does not allow") from None
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise ConfigError(f"{where} is nested too deeply; at most {MAX_DEPTH} levels") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" at line {mark.line + 1}" if mark else ""
            raise YamlSyntaxError(f"{where} is not valid YAML{line}; fix the syntax") from None
        if node is None:
            return None
        _check_graph(node, where)
        try:
            return loader.construct_document(node)
        except yaml.constructor.ConstructorError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(
                f"{where} uses a YAML tag that is not plain data{line}; remove the tag"
            ) from None
        except ValueError:  # int() of more than 4,300 digits
            raise ConfigError(f"{where} holds a number too long to read; shorten it") from None
    finally:
        loader.dispose()


def _flow_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` outside quotes and comments, in one linear pass.

    PyYAML needs time quadratic in this depth before its own recursion limit stops it (2 s at
    5,000 levels, hours for a 1 MB file of brackets), so it is measured first."""
    depth = deepest = 0
    quote = ""
    previous = "\n"
    escaped = comment = False
    for char in text:
        if comment:
            comment = char != "\n"
        elif quote == '"':
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quote = ""
        elif quote == "'":
            quote = "" if char == "'" else quote
        elif _opens_quote(char, previous):
            quote = char
        elif char == "#" and previous in " \t\n":
            comment = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(depth - 1, 0)
        previous = char
    return deepest


def _opens_quote(char: str, previous: str) -> bool:
    """A quote starts a quoted scalar after a separator (``it's`` in plain text does not);
    ``''`` inside single quotes is an escaped quote, which reopens at once."""
    if char == "'" and previous == "'":
        return True
    return char in "\"'" and previous in _BEFORE_QUOTE


def _check_graph(root: yaml.Node, where: str) -> None:
    """Tags, repeated keys, depth and expanded size, without recursion or expansion."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, children_done = stack.pop()
        if depth > MAX_DEPTH:
            raise ConfigError(f"{where} is nested too deeply; at most {MAX_DEPTH} levels")
        children = _children(node)
        if children_done:
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[id(node)] > MAX_VALUES:
                raise ConfigError(
                    f"{where} expands to more than {MAX_VALUES:,} values (YAML aliases "
                    "repeating aliases?); write the values out"
                )
            continue
        if id(node) in sizes:
            continue
        _check_node(node, where)
        stack.append((node, depth, True))
        stack.extend((child, depth + 1, False) for child in children if id(child) not in sizes)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [item for pair in node.value for item in pair]
    return []


def _check_node(node: yaml.Node, where: str) -> None:
    line = node.start_mark.line + 1
    if node.tag.startswith(_PYTHON_TAG):
        name = node.tag[len("tag:yaml.org,2002:") :][:60]
        raise ConfigError(
            f"{where} line {line} uses the tag !!{name}, which would build a Python object; "
            "a config holds plain values only, so remove the tag"
        )
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE_KEY:
                continue
            if key.value in seen:
                shown = key.value if len(key.value) <= 40 else key.value[:39] + "…"
                raise ConfigError(
                    f"{where}: key {shown!r} appears twice (lines {seen[key.value]} and "
                    f"{key.start_mark.line + 1}); keep one"
                )
            seen[key.value] = key.start_mark.line + 1
