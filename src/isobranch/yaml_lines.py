"""Parsing a YAML workflow while noting the file line where each code value starts.

``yaml.safe_load`` keeps no positions. This parses the same way (compose,
then construct with the safe constructor) and walks the composed tree for
the values that are code: a node's ``run:``, an edge's ``when:`` and a map
edge's ``over:`` (also inside ``{python: ...}`` / ``{lua: ...}``). A line is
recorded only where the value's lines are the file's lines one to one: a
literal block (``run: |``), whose first line follows the ``|``, or a value
that is one line of code. A folded block (``>``) or a quoted value of
several lines of code has no line: its lines do not match the file's.
"""

from __future__ import annotations

from typing import Any

import yaml

from .keys import Language

# ("nodes", 2, "run"), ("edges", 0, "when"), ("edges", 3, "over")
CodeKey = tuple[str, int, str]
# Where each code value's first line is in the file (1-based).
CodeLines = dict[CodeKey, int]

# The keys whose values are code, per top-level list.
_CODE_KEYS = {"nodes": ("run",), "edges": ("when", "over")}
_STRING_TAG = "tag:yaml.org,2002:str"


def load_with_code_lines(text: str) -> tuple[Any, CodeLines]:
    """The document ``text`` holds (as ``yaml.safe_load`` gives it) and its code lines.

    Raises ``yaml.YAMLError`` as ``yaml.safe_load`` does.
    """
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, {}
        # Constructing first: it flattens merge keys (<<) in the tree walked below.
        document = loader.construct_document(root)
    finally:
        loader.dispose()
    return document, _code_lines(root)


def _code_lines(root: yaml.Node) -> CodeLines:
    lines: CodeLines = {}
    for section, items in _pairs(root):
        if section not in _CODE_KEYS or not isinstance(items, yaml.SequenceNode):
            continue
        for index, item in enumerate(items.value):
            for key, value in _pairs(item):
                if key not in _CODE_KEYS[section]:
                    continue
                line = _first_line(_code_value(value))
                if line is not None:
                    lines[(section, index, key)] = line
                else:
                    lines.pop((section, index, key), None)  # a later duplicate key wins
    return lines


def _pairs(node: yaml.Node) -> list[tuple[str, yaml.Node]]:
    """The string keys of a mapping node with their value nodes, in order."""
    if not isinstance(node, yaml.MappingNode):
        return []
    return [(key.value, value) for key, value in node.value
            if isinstance(key, yaml.ScalarNode) and key.tag == _STRING_TAG]


def _code_value(node: yaml.Node) -> yaml.Node:
    """The scalar holding the code: ``node`` itself, or the value of ``{lua: ...}``."""
    pairs = _pairs(node)
    if len(pairs) == 1 and pairs[0][0] in tuple(Language):
        return pairs[0][1]
    return node


def _first_line(node: yaml.Node) -> int | None:
    if not isinstance(node, yaml.ScalarNode) or node.tag != _STRING_TAG:
        return None
    block = node.style in ("|", ">")  # its first line follows the '|' or '>'
    if node.style != "|" and "\n" in node.value.rstrip("\n"):
        return None
    return node.start_mark.line + (2 if block else 1)
