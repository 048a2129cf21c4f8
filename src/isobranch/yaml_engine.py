"""Build a CompiledGraph from a YAML document (the format: docs/yaml.md).

Every mistake becomes a ``GraphError`` that lists all problems found, each
naming the file and the node, edge or setting at fault: unknown keys at
every level (with the closest allowed name), Python and Lua syntax errors
(found without running anything), bad settings. With
``allow_python=False`` a document may contain only sandboxed Lua.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .checkpoint.store import SqliteCheckpointer
from .compiled import CompiledGraph
from .defaults import (
    DEFAULT_LUA_TIMEOUT,
)
from .errors import GraphError
from .isolation.registry import available_backends, backend_options
from .keys import (
    PARALLEL_KEYS,
    unknown,
)
from .yaml_builder import DocumentBuilder
from .yaml_lines import CodeLines, load_with_code_lines
from .yaml_settings import EngineOptions

# settings.parallel keys the engine's own arguments stand for, so not options.
_ENGINE_ARGUMENTS = frozenset({"isolation", "strategy", "max_workers"})
# Keys whose value is code: a YAML error on their line gets the block-form hint.
_CODE_KEYS = frozenset({"run", "when", "over"})
_KEY = re.compile(r"(?:^|[\s{,])([A-Za-z_][\w-]*)\s*:(?=\s|$)")
_UNSET: Any = object()


class YAMLEngine:
    """Loads YAML workflows into compiled graphs.

    Isolation precedence: the ``isolation`` argument, then YAML
    ``settings.parallel.isolation`` (alias ``strategy``), then ``"thread"``.
    ``options`` override any ``settings.parallel`` key (``branch_timeout``,
    ``fail_fast``, ``max_steps`` or a backend's own option); an option no
    backend knows is a ``GraphError`` at once.

    ``allow_python=False`` is for documents you do not trust: a Python
    ``run:`` body or ``when:`` condition is full Python with the caller's
    rights, so every one is refused at load time, and so is a ``file:``
    outside the document's directory. What remains is sandboxed Lua, whose
    time and memory limits the document may lower but not raise.

    ``checkpointer`` (a ``SqliteCheckpointer``) records every run of the
    graphs this engine loads, in place of any YAML ``settings.checkpoint``.
    """

    def __init__(self, lua_enabled: bool = True, lua_timeout: float = _UNSET,
                 isolation: str | None = None, max_workers: int | None = None, *,
                 allow_python: bool = True, checkpointer: SqliteCheckpointer | None = None,
                 **options: Any) -> None:
        _check_engine_options(options)
        if checkpointer is not None and not isinstance(checkpointer, SqliteCheckpointer):
            raise GraphError(f"YAMLEngine(checkpointer=...): must be a SqliteCheckpointer, got "
                             f"{type(checkpointer).__name__}")
        self._options = EngineOptions(
            lua_enabled=lua_enabled, lua_timeout_explicit=lua_timeout is not _UNSET,
            lua_timeout=DEFAULT_LUA_TIMEOUT if lua_timeout is _UNSET else lua_timeout,
            isolation=isolation, max_workers=max_workers, allow_python=allow_python,
            checkpointer=checkpointer, parallel=dict(options))

    @property
    def allow_python(self) -> bool:
        """Whether documents may contain Python code (False: Lua only)."""
        return self._options.allow_python

    def load_from_file(self, path: str | Path) -> CompiledGraph:
        """Read, validate and compile the workflow in ``path``.

        Relative ``file:`` references in nodes resolve against the YAML
        file's own directory, never the current directory.
        """
        document, source, code_lines = _read_workflow(path)
        return self._build(document, source, Path(path).resolve().parent, code_lines)

    def load_from_dict(self, document: Mapping[str, Any], *, source: str | None = None,
                       base_dir: str | Path | None = None) -> CompiledGraph:
        """Validate and compile a workflow given as a parsed YAML mapping.

        A parsed mapping has no line numbers: errors in its code name the
        node and the line within it, not a line of ``source``.
        """
        return self._build(document, source, Path(base_dir) if base_dir else None, {})

    def _build(self, document: Any, source: str | None, base_dir: Path | None,
               code_lines: CodeLines) -> CompiledGraph:
        return DocumentBuilder(self._options, document, source, base_dir, code_lines).build()

    def validate_file(self, path: str | Path) -> list[str]:
        """Every problem in the workflow at ``path`` (empty if it is valid)."""
        try:
            document, source, code_lines = _read_workflow(path)
        except GraphError as exc:
            return [str(exc)]
        return self._problems(document, source, Path(path).resolve().parent, code_lines)

    def validate_dict(self, document: Mapping[str, Any], *, source: str | None = None,
                      base_dir: str | Path | None = None) -> list[str]:
        """Every problem in a parsed workflow (empty if it is valid)."""
        return self._problems(document, source, Path(base_dir) if base_dir else None, {})

    def _problems(self, document: Any, source: str | None, base_dir: Path | None,
                  code_lines: CodeLines) -> list[str]:
        try:
            graph = self._build(document, source, base_dir, code_lines)
        except GraphError as exc:
            prefix = f"{source}: " if source else ""
            return [f"{prefix}{problem}" for problem in exc.problems]
        graph.close()
        return []


def _check_engine_options(options: Mapping[str, Any]) -> None:
    """Refuse at once a ``YAMLEngine`` keyword that no backend or setting knows."""
    backends = available_backends()
    allowed = set(PARALLEL_KEYS - _ENGINE_ARGUMENTS) | set(backends)
    for name in backends:
        declared = backend_options(name)
        if declared is None:
            return  # some backend takes any option
        allowed |= declared
    problems = [unknown(f"YAMLEngine(): unknown option {key!r}", key, allowed)
                for key in sorted(set(options) - allowed, key=str)]
    if problems:
        raise GraphError(problems=problems)


def read_yaml_file(path: str | Path) -> tuple[Any, str]:
    """Parse a YAML file; errors are a ``GraphError`` with file, line and column."""
    document, source, _ = _read_workflow(path)
    return document, source


def _read_workflow(path: str | Path) -> tuple[Any, str, CodeLines]:
    """The parsed file, its name as given, and the file line where each code value starts."""
    source = str(path)
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
