"""Reading one workflow file: its text, the parsed document, where its code values start.

YAML errors become a ``GraphError`` naming the file, line and column, with
advice when the error sits in a one-line code value. The engine reads the
file it is given with it, and the builder every file a ``subgraph:`` node
names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import GraphError
from .yaml_lines import CodeLines, load_with_code_lines

# Keys whose value is code: a YAML error on their line gets the block-form hint.
_CODE_KEYS = frozenset({"run", "when", "over"})
_KEY = re.compile(r"(?:^|[\s{,])([A-Za-z_][\w-]*)\s*:(?=\s|$)")


def read_yaml_file(path: str | Path) -> tuple[Any, str]:
    """Parse a YAML file; errors are a ``GraphError`` with file, line and column."""
    document, source, _ = read_workflow(path)
    return document, source


def read_workflow(path: str | Path, *, name: str | None = None
                  ) -> tuple[Any, str, CodeLines]:
    """The parsed file, its name, and the file line where each code value starts.

    The name is ``name`` if given (how messages name the file), else ``path`` as given.
    """
    source = name if name is not None else str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise GraphError(f"{source}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise GraphError(f"{source}: not UTF-8 text: {exc}") from exc
    try:
        document, code_lines = load_with_code_lines(text)
        return document, source, code_lines
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise GraphError(f"{where}: invalid YAML: {problem}{_code_value_hint(text, exc)}"
                         ) from exc


def _code_value_hint(text: str, error: yaml.YAMLError) -> str:
    """Advice when a YAML error sits in a one-line code value such as ``run: return {"a": 1}``.

    Code is full of ``: ``, ``{`` and ``#``, which YAML reads as its own
    syntax; the block form (``run: |``) takes the text literally.
    """
    lines = text.splitlines()
    for mark in (getattr(error, "problem_mark", None), getattr(error, "context_mark", None)):
        if mark is None or not 0 <= mark.line < len(lines):
            continue
        # The key is the last one before the error on its line (flow style puts
        # several on one line) or, on a continuation line of a multi-line
        # plain value, the last one on the nearest line above that has one.
        for number in range(mark.line, -1, -1):
            line = lines[number][:mark.column] if number == mark.line else lines[number]
            keys = _KEY.findall(line)
            if not keys:
                continue
            if keys[-1] in _CODE_KEYS:
                return (f" (line {number + 1}: code in '{keys[-1]}:' on one line is read as "
                        f"YAML; write '{keys[-1]}: |' and put the code on the following lines, "
                        f"indented)")
            break
    return ""
