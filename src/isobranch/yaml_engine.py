"""Build a CompiledGraph from a YAML document (the format: docs/yaml.md).

Every mistake becomes a ``GraphError`` that lists all problems found, each
naming the file and the node, edge or setting at fault: unknown keys at
every level (with the closest allowed name), Python and Lua syntax errors
(found without running anything), bad settings. With
``allow_python=False`` a document may contain only sandboxed Lua.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .cache_store import SqliteCache
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
from .yaml_lines import CodeLines
from .yaml_reading import read_workflow
from .yaml_settings import EngineOptions
from .yaml_subgraphs import CHAIN_ARROW, IncludeChain

# settings.parallel keys the engine's own arguments stand for, so not options.
_ENGINE_ARGUMENTS = frozenset({"isolation", "strategy", "max_workers"})
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
    graphs this engine loads, in place of any YAML ``settings.checkpoint``;
    ``cache`` (a ``SqliteCache``) serves their cached nodes, in place of any
    YAML ``settings.cache``.
    """

    def __init__(self, lua_enabled: bool = True, lua_timeout: float = _UNSET,
                 isolation: str | None = None, max_workers: int | None = None, *,
                 allow_python: bool = True, checkpointer: SqliteCheckpointer | None = None,
                 cache: SqliteCache | None = None, **options: Any) -> None:
        _check_engine_options(options)
        if checkpointer is not None and not isinstance(checkpointer, SqliteCheckpointer):
            raise GraphError(f"YAMLEngine(checkpointer=...): must be a SqliteCheckpointer, got "
                             f"{type(checkpointer).__name__}")
        if cache is not None and not isinstance(cache, SqliteCache):
            raise GraphError(f"YAMLEngine(cache=...): must be a SqliteCache, got "
                             f"{type(cache).__name__}")
        self._options = EngineOptions(
            lua_enabled=lua_enabled, lua_timeout_explicit=lua_timeout is not _UNSET,
            lua_timeout=DEFAULT_LUA_TIMEOUT if lua_timeout is _UNSET else lua_timeout,
            isolation=isolation, max_workers=max_workers, allow_python=allow_python,
            checkpointer=checkpointer, cache=cache, parallel=dict(options))

    @property
    def allow_python(self) -> bool:
        """Whether documents may contain Python code (False: Lua only)."""
        return self._options.allow_python

    def load_from_file(self, path: str | Path) -> CompiledGraph:
        """Read, validate and compile the workflow in ``path``.

        Relative ``file:`` references in nodes resolve against the YAML
        file's own directory, never the current directory.
        """
        document, source, code_lines = read_workflow(path)
        resolved = Path(path).resolve()
        return self._build(document, source, resolved.parent, code_lines, resolved)

    def load_from_dict(self, document: Mapping[str, Any], *, source: str | None = None,
                       base_dir: str | Path | None = None) -> CompiledGraph:
        """Validate and compile a workflow given as a parsed YAML mapping.

        A parsed mapping has no line numbers: errors in its code name the
        node and the line within it, not a line of ``source``.
        """
        return self._build(document, source, Path(base_dir) if base_dir else None, {})

    def _build(self, document: Any, source: str | None, base_dir: Path | None,
               code_lines: CodeLines, path: Path | None = None) -> CompiledGraph:
        """``path``: the document's file (resolved), if it was read from one."""
        return DocumentBuilder(self._options, document, source, base_dir, code_lines,
                               includes=IncludeChain.top(source, path)).build()

    def validate_file(self, path: str | Path) -> list[str]:
        """Every problem in the workflow at ``path`` (empty if it is valid)."""
        try:
            document, source, code_lines = read_workflow(path)
        except GraphError as exc:
            return [str(exc)]
        resolved = Path(path).resolve()
        return self._problems(document, source, resolved.parent, code_lines, resolved)

    def validate_dict(self, document: Mapping[str, Any], *, source: str | None = None,
                      base_dir: str | Path | None = None) -> list[str]:
        """Every problem in a parsed workflow (empty if it is valid)."""
        return self._problems(document, source, Path(base_dir) if base_dir else None, {})

    def _problems(self, document: Any, source: str | None, base_dir: Path | None,
                  code_lines: CodeLines, path: Path | None = None) -> list[str]:
        try:
            graph = self._build(document, source, base_dir, code_lines, path)
        except GraphError as exc:
            # A problem of an included file starts with its chain of files, this one first.
            return [problem if not source or problem.startswith(f"{source}{CHAIN_ARROW}")
                    else f"{source}: {problem}" for problem in exc.problems]
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
