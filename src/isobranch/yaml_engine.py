"""Build a CompiledGraph from a YAML document (the format: docs/yaml.md).

Every mistake becomes a ``GraphError`` that lists all problems found, each
naming the file and the node, edge or setting at fault: unknown keys at
every level (with the closest allowed name), Python and Lua syntax errors
(found without running anything), bad settings. With
``allow_python=False`` a document may contain only sandboxed Lua.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from itertools import pairwise
from pathlib import Path
from typing import Any

import yaml

from .checkpoint.store import SqliteCheckpointer
from .compiled import CompiledGraph
from .conditions import Condition, LuaCondition, PythonCondition
from .defaults import (
    DEFAULT_FAIL_FAST,
    DEFAULT_ISOLATION,
    DEFAULT_LUA_TIMEOUT,
    DEFAULT_MAX_STEPS,
)
from .errors import GraphError
from .graph import StateGraph
from .isolation.base import available_backends
from .keys import (
    CHECKPOINT_SETTINGS_KEYS,
    EDGE_KEYS,
    FAN_OUT_EDGE_KEYS,
    LUA_SETTINGS_KEYS,
    MAP_EDGE_KEYS,
    NODE_KEYS,
    PARALLEL_KEYS,
    SETTINGS_KEYS,
    TOP_LEVEL_KEYS,
    UNTRUSTED_BACKEND_OPTIONS,
    EdgeType,
    Language,
    backend_options,
    backends_accepting,
    unknown,
)
from .lua.runtime import DEFAULT_MAX_MEMORY
from .lua.syntax import LuaSyntaxChecker
from .nodes import LuaNode, Node, PythonNode
from .retry import RetryPolicy, parse_policy
from .runner import END, START
from .schema import StateSchema
from .sizes import parse_size

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
        self._checkpointer = checkpointer
        self._lua_enabled = lua_enabled
        self._lua_timeout_explicit = lua_timeout is not _UNSET
        self._lua_timeout = DEFAULT_LUA_TIMEOUT if lua_timeout is _UNSET else lua_timeout
        self._isolation = isolation
        self._max_workers = max_workers
        self._allow_python = allow_python
        self._options = options

    @property
    def allow_python(self) -> bool:
        """Whether documents may contain Python code (False: Lua only)."""
        return self._allow_python

    def load_from_file(self, path: str | Path) -> CompiledGraph:
        """Read, validate and compile the workflow in ``path``.

        Relative ``file:`` references in nodes resolve against the YAML
        file's own directory, never the current directory.
        """
        document, source = read_yaml_file(path)
        return self.load_from_dict(document, source=source, base_dir=Path(path).resolve().parent)

    def load_from_dict(self, document: Mapping[str, Any], *, source: str | None = None,
                       base_dir: str | Path | None = None) -> CompiledGraph:
        """Validate and compile a workflow given as a parsed YAML mapping."""
        builder = _Builder(self, document, source, Path(base_dir) if base_dir else None)
        return builder.build()

    def validate_file(self, path: str | Path) -> list[str]:
        """Every problem in the workflow at ``path`` (empty if it is valid)."""
        try:
            document, source = read_yaml_file(path)
        except GraphError as exc:
            return [str(exc)]
        return self.validate_dict(document, source=source, base_dir=Path(path).resolve().parent)

    def validate_dict(self, document: Mapping[str, Any], *, source: str | None = None,
                      base_dir: str | Path | None = None) -> list[str]:
        """Every problem in a parsed workflow (empty if it is valid)."""
        try:
            graph = self.load_from_dict(document, source=source, base_dir=base_dir)
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
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise GraphError(f"{source}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise GraphError(f"{source}: not UTF-8 text: {exc}") from exc
    try:
        return yaml.safe_load(text), source
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


def contained_file(base_dir: Path, reference: str) -> Path:
    """``reference`` resolved inside ``base_dir``; ``ValueError`` if it could leave it.

    Refused: absolute paths, ``..`` components, and paths whose symlinks
    resolve outside ``base_dir``.
    """
    path = Path(reference)
    if path.is_absolute():
        raise ValueError("must be a path relative to the workflow's directory")
    if ".." in path.parts:
        raise ValueError("must not contain '..'")
    root = base_dir.resolve()
    try:
        resolved = (root / path).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a NUL byte; a symlink loop (3.11)
        raise ValueError(f"is not a usable path ({exc})") from exc
    if not resolved.is_relative_to(root):
        raise ValueError("resolves (through a symlink) outside the workflow's directory")
    if resolved.exists() and not resolved.is_file():
        raise ValueError("is not a regular file")
    return resolved


class _Builder:
    """Turns one document into a StateGraph, collecting every problem on the way."""

    def __init__(self, engine: YAMLEngine, document: Any, source: str | None,
                 base_dir: Path | None) -> None:
        self.engine = engine
        self.document = document
        self.source = source
        self.base_dir = base_dir
        self.problems: list[str] = []
        self.lua = LuaSyntaxChecker()

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def fail(self) -> GraphError:
        return GraphError(problems=self.problems, source=self.source)

    def python_allowed(self, where: str, what: str, hint: str) -> bool:
        """The one door through which any part of the document becomes Python code.

        Every place that would build a Python callable from the document
        (node bodies, fan-in nodes, conditions, and any future expression)
        must ask here first; with ``allow_python=False`` the answer is no
        and the refusal is recorded as a problem.
        """
        if self.engine._allow_python:
            return True
        self.problem(f"{where}: {what} is Python, which this engine refuses "
                     f"(allow_python=False runs only sandboxed Lua); {hint}")
        return False

    def build(self) -> CompiledGraph:
        doc = self.document
        if not isinstance(doc, Mapping):
            self.problem(f"the document must be a mapping with 'nodes', got {type(doc).__name__}")
            raise self.fail()
        for key in sorted(set(doc) - TOP_LEVEL_KEYS, key=str):
            self.problem(unknown(f"unknown top-level key {key!r}", key, TOP_LEVEL_KEYS))
        variables = doc.get("variables") or {}
        if not isinstance(variables, Mapping):
            self.problem("variables: must be a mapping")
            variables = {}
        compile_options = self.settings(doc.get("settings") or {})
        graph = StateGraph(StateSchema.from_yaml(doc.get("state_schema"), self.problems))
        names = self.nodes(graph, doc.get("nodes"))
        fan_in_names = self.edges(graph, doc.get("edges"), names)
        if self.problems:
            raise self.fail()
        for name in fan_in_names:
            graph.mark_fan_in(name)  # YAML marks fan-in nodes by use as well as by flag
        for problem in graph.validate():
            self.problem(problem)
        if self.problems:
            raise self.fail()
        try:
            compiled = graph.compile(variables=dict(variables), name=doc.get("name"),
                                     **compile_options)
        except GraphError as exc:
            raise GraphError(problems=exc.problems, source=self.source) from None
        compiled.owns_checkpointer = compiled.checkpointer is not self.engine._checkpointer
        if not self.engine._allow_python:
            _assert_lua_only(compiled)
        return compiled

    # -- settings -------------------------------------------------------------

    def mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.problem(f"{path}: must be a mapping, got {type(value).__name__}")
            return {}
        return value

    def check_keys(self, mapping: Mapping[str, Any], allowed: frozenset[str], path: str) -> None:
        for key in sorted(set(mapping) - allowed, key=str):
            self.problem(unknown(f"{path}.{key}: unknown key", key, allowed))

    def settings(self, settings: Any) -> dict[str, Any]:
        settings = self.mapping(settings, "settings")
        self.check_keys(settings, SETTINGS_KEYS, "settings")
        lua = self.mapping(settings.get("lua"), "settings.lua")
        self.check_keys(lua, LUA_SETTINGS_KEYS, "settings.lua")
        lua_timeout, max_memory = self.lua_limits(lua)
        checkpointer = self.checkpointer(settings.get("checkpoint"))
        document = dict(self.mapping(settings.get("parallel"), "settings.parallel"))
        if "strategy" in document:
            if "isolation" in document and document["isolation"] != document["strategy"]:
                self.problem("settings.parallel: 'isolation' and its alias 'strategy' disagree")
            document.setdefault("isolation", document["strategy"])
            del document["strategy"]
        engine = self.engine
        # The engine's options override the document's; a message names where a value came from.
        parallel = {**document, **engine._options}
        origin = {key: f"settings.parallel.{key}" for key in document}
        origin.update({key: f"YAMLEngine({key}=...)" for key in engine._options})
        isolation = engine._isolation or parallel.get("isolation") or DEFAULT_ISOLATION
        if not isinstance(isolation, str) or isolation not in available_backends():
            self.problem(unknown(f"settings.parallel.isolation: unknown isolation backend "
                                 f"{isolation!r}", isolation, available_backends()))
            isolation = None
        fail_fast = parallel.get("fail_fast", DEFAULT_FAIL_FAST)
        if not isinstance(fail_fast, bool):
            self.problem(f"{origin['fail_fast']}: must be true or false, got {fail_fast!r}")
        max_steps = parallel.get("max_steps", DEFAULT_MAX_STEPS)
        if (not engine._allow_python and "max_steps" not in engine._options
                and isinstance(max_steps, (int, float)) and max_steps > DEFAULT_MAX_STEPS):
            self.problem(f"settings.parallel.max_steps: a Lua-only document may lower the "
                         f"limit of {DEFAULT_MAX_STEPS} steps, not raise it; got {max_steps!r}")
            max_steps = DEFAULT_MAX_STEPS
        options: dict[str, Any] = {
            "isolation": isolation or DEFAULT_ISOLATION,
            "max_workers": engine._max_workers or parallel.get("max_workers"),
            "branch_timeout": parallel.get("branch_timeout"), "fail_fast": fail_fast,
            "max_steps": max_steps, "lua_timeout": lua_timeout, "lua_max_memory": max_memory,
            "checkpointer": checkpointer,
        }
        if "branch_max_memory" in parallel:
            try:
                options["branch_max_memory"] = parse_size(parallel["branch_max_memory"])
            except ValueError as exc:
                self.problem(f"{origin['branch_max_memory']}: {exc}")
        if "retry" in parallel:
            options["branch_retry"], problems = parse_policy(parallel["retry"], origin["retry"])
            self.problems.extend(problems)
        # Settings interpreted further on (compile keywords of their own).
        handled = {"isolation", "strategy", "branch_max_memory", "retry", *options}
        for key in sorted(PARALLEL_KEYS & set(parallel) - handled):
            options[key] = parallel[key]
        # Flat backend options in the document belong to the backend the
        # document chose; when the engine chose another, they do not apply.
        chosen_by_document = document.get("isolation") or DEFAULT_ISOLATION
        if not isinstance(chosen_by_document, str) or chosen_by_document not in available_backends():
            chosen_by_document = isolation
        from_document = self.backend_options(
            isolation, chosen_by_document,
            {k: v for k, v in document.items() if k not in PARALLEL_KEYS}, "settings.parallel")
        from_engine = self.backend_options(
            isolation, isolation,
            {k: v for k, v in engine._options.items() if k not in PARALLEL_KEYS}, "YAMLEngine()")
        if not engine._allow_python:
            for key, (_, where) in sorted(from_document.items()):
                if key not in UNTRUSTED_BACKEND_OPTIONS and key not in from_engine:
                    self.problem(f"{where}: a Lua-only document cannot set this backend "
                                 f"option (it may decide where this process connects or what "
                                 f"it loads); pass it to YAMLEngine(...) instead")
        merged = {key: value for key, (value, _) in from_document.items()}
        merged.update({key: value for key, (value, _) in from_engine.items()})
        options["backend_options"] = merged
        return options

    def checkpointer(self, value: Any) -> SqliteCheckpointer | None:
        """The engine's checkpointer, else the one ``settings.checkpoint`` describes.

        Its ``path`` is relative to the workflow's directory; a Lua-only
        document may name a database only inside that directory, and may
        not turn on ``pickle`` (a pickle in the database runs code when it
        is read).
        """
        where = "settings.checkpoint"
        settings = self.mapping(value, where)
        self.check_keys(settings, CHECKPOINT_SETTINGS_KEYS, where)
        if value is not None and "path" not in settings:
            self.problem(f"{where}: needs 'path' (the database file, relative to the workflow)")
        path, pickle = settings.get("path"), settings.get("pickle", False)
        if not isinstance(pickle, bool):
            self.problem(f"{where}.pickle: must be true or false, got {pickle!r}")
        elif pickle and not self.engine._allow_python:
            self.problem(f"{where}.pickle: a Lua-only document cannot turn on pickle (reading "
                         f"a pickled state runs code); pass YAMLEngine(checkpointer=...) instead")
        if "path" in settings and (not isinstance(path, str) or not path):
            self.problem(f"{where}.path: must be a file path, got {path!r}")
            return None
        if path is None or self.engine._checkpointer is not None:
            return self.engine._checkpointer
        if not Path(path).is_absolute() or not self.engine._allow_python:
            if self.base_dir is None:
                self.problem(f"{where}.path: relative path {path!r} needs load_from_file or "
                             f"base_dir")
                return None
            if not self.engine._allow_python:
                try:
                    return SqliteCheckpointer(contained_file(self.base_dir, path),
                                              pickle=False)
                except ValueError as exc:
                    self.problem(f"{where}.path: {path!r} {exc} (allow_python=False)")
                    return None
            path = self.base_dir / path
        return SqliteCheckpointer(path, pickle=pickle is True)

    def lua_limits(self, lua: Mapping[str, Any]) -> tuple[float | None, int | None]:
        engine = self.engine
        lua_timeout = engine._lua_timeout
        if not engine._lua_timeout_explicit and "timeout" in lua:
            lua_timeout = lua["timeout"]
            if not engine._allow_python and (lua_timeout is None or (
                    isinstance(lua_timeout, (int, float)) and lua_timeout > engine._lua_timeout)):
                self.problem(f"settings.lua.timeout: a Lua-only document may lower the engine's "
                             f"limit of {engine._lua_timeout}s, not raise or remove it; "
                             f"got {lua_timeout!r}")
                lua_timeout = engine._lua_timeout
        if lua_timeout is not None and (isinstance(lua_timeout, bool) or not isinstance(
                lua_timeout, (int, float)) or lua_timeout <= 0):
            self.problem(f"settings.lua.timeout: must be a positive number, got {lua_timeout!r}")
            lua_timeout = DEFAULT_LUA_TIMEOUT
        max_memory: int | None = DEFAULT_MAX_MEMORY
        if "max_memory" in lua:
            try:
                max_memory = parse_size(lua["max_memory"])
            except ValueError as exc:
                self.problem(f"settings.lua.max_memory: {exc}")
            if not engine._allow_python and (max_memory is None or max_memory > DEFAULT_MAX_MEMORY):
                self.problem(f"settings.lua.max_memory: a Lua-only document may lower the limit "
                             f"of {DEFAULT_MAX_MEMORY} bytes, not raise or remove it")
                max_memory = DEFAULT_MAX_MEMORY
        return lua_timeout, max_memory

    def backend_options(self, isolation: str | None, flat_for: str | None,
                        rest: Mapping[str, Any], prefix: str) -> dict[str, tuple[Any, str]]:
        """The options ``rest`` gives backend ``isolation``: ``{option: (value, where)}``.

        ``rest`` is what is left of ``settings.parallel`` (or of the engine's
        options) after the engine's own keys: a mapping per backend name,
        and flat options of backend ``flat_for``, which win over its mapping
        and apply only if it is ``isolation``. Every key is checked, whether
        it applies or not.
        """
        backends = available_backends()
        accepted = backend_options(flat_for) if flat_for else frozenset()
        section: dict[str, tuple[Any, str]] = {}
        flat: dict[str, tuple[Any, str]] = {}
        for key, value in rest.items():
            where = f"{prefix}.{key}" if prefix.startswith("settings") else f"YAMLEngine({key}=...)"
            if key in backends:
                options = self.mapping(value, where)
                declared = backend_options(key)
                if declared is not None:
                    self.check_keys(options, declared, where)
                if key == isolation:
                    section.update({option: (option_value, f"{where}.{option}")
                                    for option, option_value in options.items()})
            elif accepted is None or key in accepted:
                if flat_for == isolation:
                    flat[key] = (value, where)
            elif elsewhere := backends_accepting(key):
                self.problem(f"{where}: not an option of isolation backend {flat_for!r} but of "
                             f"{', '.join(map(repr, elsewhere))}; choose that backend or put it "
                             f"under settings.parallel.{elsewhere[0]}")
            else:
                allowed = PARALLEL_KEYS | (accepted or frozenset()) | set(backends)
                self.problem(unknown(f"{where}: unknown key", key, allowed))
        return {**section, **flat}

    # -- nodes ----------------------------------------------------------------

    def nodes(self, graph: StateGraph, nodes: Any) -> list[str]:
        if not isinstance(nodes, list) or not nodes:
            self.problem("nodes: must be a non-empty list")
            return []
        names: list[str] = []
        for index, spec in enumerate(nodes):
            where = f"nodes[{index}]"
            if not isinstance(spec, Mapping):
                self.problem(f"{where}: must be a mapping with 'name' and 'run'")
                continue
            name = spec.get("name")
            if name is None or name == "":
                self.problem(f"{where}: missing 'name'")
                continue
            if not isinstance(name, str):
                self.problem(f"{where}: 'name' must be a string, got {type(name).__name__} "
                             f"{name!r} (quote it in YAML)")
                continue
            where = f"node {name!r}"
            for key in sorted(set(spec) - NODE_KEYS, key=str):
                self.problem(unknown(f"{where}: unknown key {key!r}", key, NODE_KEYS))
            if name in names:
                self.problem(f"{where}: defined twice")
                continue
            if name in (START, END):
                self.problem(f"{where}: the name is reserved")
                continue
            names.append(name)
            node = self.node(name, spec, where)
            retry, problems = parse_policy(spec.get("retry"), f"{where}: retry")
            self.problems.extend(problems)
            if node is None or problems:
                continue
            if spec.get("fan_in"):
                graph.add_fan_in_node(name, node, retry=retry)
            else:
                graph.add_node(name, node, retry=retry)
        return names

    def node(self, name: str, spec: Mapping[str, Any], where: str) -> Node | None:
        code = spec.get("run")
        language = spec.get("language")
        if "file" in spec:
            if code is not None:
                self.problem(f"{where}: give either 'run' or 'file', not both")
                return None
            reference = spec["file"]
            code = self.read_node_file(reference, where)
            if code is None:
                return None
            where = f"{where} (file {reference!r})"
            if language is None and isinstance(reference, str):
                language = _language_of_file(reference)
        if not isinstance(code, str):
            if code is None:
                self.problem(f"{where}: missing 'run' (the node's Python or Lua code)")
            else:
                self.problem(f"{where}: 'run' must be code (a string), got a "
                             f"{type(code).__name__}: YAML read the value as its own syntax; "
                             f"write 'run: |' and put the code on the following lines, indented")
            return None
        first_line = next((line.strip() for line in code.splitlines() if line.strip()), "")
        if language is None:
            language = Language.LUA if first_line.lower().startswith("-- lua") else Language.PYTHON
        if language not in tuple(Language):
            self.problem(f"{where}: language must be 'python' or 'lua', got {language!r}")
            return None
        if language == Language.LUA:
            if not self.engine._lua_enabled:
                self.problem(f"{where}: is a Lua node but this engine has lua_enabled=False")
                return None
            error = self.lua.check_node(code)
            if error is not None:
                self.problem(f"{where}, {error}")
                return None
            return LuaNode(name, code)
        if not self.python_allowed(where, "the node body" if "file" not in spec else "the file",
                                   "write it in Lua and mark it 'language: lua' or start it "
                                   "with a '-- lua' line"):
            return None
        try:
            return PythonNode(name, code, origin=f"<node {name}>")
        except SyntaxError as exc:
            self.problem(f"{where}: invalid Python: {exc.msg}")
            return None

    def read_node_file(self, reference: Any, where: str) -> str | None:
        if not isinstance(reference, str) or not reference:
            self.problem(f"{where}: 'file' must be a path")
            return None
        path = Path(reference)
        if self.base_dir is None and not path.is_absolute():
            self.problem(f"{where}: relative file {reference!r} needs load_from_file or base_dir")
            return None
        if not self.engine._allow_python:
            # An untrusted document must not read (and echo, in a syntax error)
            # files of this machine outside its own directory.
            if self.base_dir is None:
                self.problem(f"{where}: file {reference!r}: a Lua-only document needs "
                             f"load_from_file or base_dir to confine its files")
                return None
            try:
                path = contained_file(self.base_dir, reference)
            except ValueError as exc:
                self.problem(f"{where}: file {reference!r} {exc} (allow_python=False)")
                return None
        elif not path.is_absolute():
            assert self.base_dir is not None
            path = self.base_dir / path
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, ValueError) as exc:  # ValueError: undecodable, or a NUL in the path
            self.problem(f"{where}: cannot read file {str(path)!r}: {exc}")
            return None

    # -- edges ----------------------------------------------------------------

    def edges(self, graph: StateGraph, edges: Any, names: list[str]) -> set[str]:
        fan_ins: set[str] = set()
        if edges is None:
            # Without edges, nodes chain in list order.
            if names:
                graph.set_entry_point(names[0])
                for source, target in pairwise(names):
                    graph.add_edge(source, target)
                graph.set_finish_point(names[-1])
            return fan_ins
        if not isinstance(edges, list):
            self.problem("edges: must be a list")
            return fan_ins
        known = set(names)
        has_start = False
        for index, spec in enumerate(edges):
            if not isinstance(spec, Mapping):
                self.problem(f"edges[{index}]: must be a mapping with 'from' and 'to'")
                continue
            source, target = spec.get("from"), spec.get("to")
            where = f"edges[{index}] ({source} -> {target})"
            for key in sorted(set(spec) - EDGE_KEYS, key=str):
                self.problem(unknown(f"{where}: unknown key {key!r}", key, EDGE_KEYS))
            bad = False
            for role, name, allowed in (("from", source, {START}), ("to", target, {END})):
                if not isinstance(name, str):
                    self.problem(f"{where}: missing '{role}'")
                    bad = True
                elif name not in known and name not in allowed:
                    self.problem(f"{where}: unknown node {name!r} in '{role}'")
                    bad = True
            if bad:
                continue
            kind = spec.get("type", EdgeType.NORMAL)
            if kind != EdgeType.MAP:
                for key in sorted(MAP_EDGE_KEYS & set(spec)):
                    self.problem(f"{where}: {key!r} belongs to map edges (type: map)")
            if kind not in (EdgeType.MAP, EdgeType.PARALLEL):
                for key in sorted(FAN_OUT_EDGE_KEYS & set(spec)):
                    self.problem(f"{where}: {key!r} belongs to parallel and map edges "
                                 f"(type: parallel / type: map)")
            retry, problems = parse_policy(spec.get("retry"), f"{where}: retry")
            self.problems.extend(problems)
            if kind == EdgeType.MAP:
                if not problems:
                    self.map_edge(graph, spec, where, known, fan_ins, retry)
                continue
            if kind == EdgeType.PARALLEL:
                fan_in = spec.get("fan_in")
                if not isinstance(fan_in, str):
                    self.problem(f"{where}: a parallel edge needs 'fan_in' (the node where branches meet)")
                elif fan_in not in known:
                    self.problem(f"{where}: fan-in node {fan_in!r} does not exist")
                elif source == START or target == END:
                    self.problem(f"{where}: parallel edges run between nodes")
                elif not problems:
                    fan_ins.add(fan_in)
                    graph.add_parallel_edge(source, target, fan_in, retry=retry)
                continue
            if kind not in (EdgeType.NORMAL, EdgeType.SIMPLE, EdgeType.CONDITIONAL):
                self.problem(unknown(f"{where}: unknown edge type {kind!r}", kind,
                                     [EdgeType.NORMAL, EdgeType.PARALLEL, EdgeType.MAP]))
                continue
            condition = self.condition(spec.get("when"), where, f"when {source}->{target}")
            if "when" in spec and condition is None:
                continue
            if source == START:
                if condition is not None:
                    self.problem(f"{where}: the start edge cannot have a condition")
                elif has_start:
                    self.problem(f"{where}: a second edge from {START}")
                else:
                    has_start = True
                    graph.set_entry_point(target)
                continue
            graph.add_edge(source, target, when=condition)
        if not has_start and names:
            graph.set_entry_point(names[0])
        return fan_ins

    def map_edge(self, graph: StateGraph, spec: Mapping[str, Any], where: str, known: set[str],
                 fan_ins: set[str], retry: RetryPolicy | None) -> None:
        source, target, fan_in = spec["from"], spec["to"], spec.get("fan_in")
        problems_before = len(self.problems)
        if "when" in spec:
            self.problem(f"{where}: a map edge cannot have a 'when' condition")
        if not isinstance(fan_in, str):
            self.problem(f"{where}: a map edge needs 'fan_in' (the node where branches meet)")
        elif fan_in not in known:
            self.problem(f"{where}: fan-in node {fan_in!r} does not exist")
        if source == START or target == END:
            self.problem(f"{where}: map edges run between nodes")
        over: Any = spec.get("over")
        if "over" not in spec:
            self.problem(f"{where}: a map edge needs 'over' (a state key, or "
                         f"{{python: ...}} / {{lua: ...}})")
        elif isinstance(over, Mapping):
            over = self.condition(over, where, f"over {source}->{target}", role="over")
        elif not isinstance(over, str) or not over:
            self.problem(f"{where}: 'over' must be a state key or {{python: ...}} / {{lua: ...}}, "
                         f"got {over!r}")
        keys = {}
        for yaml_key, default in (("as", "item"), ("index_as", "index")):
            value = spec.get(yaml_key, default)
            if not isinstance(value, str) or not value:
                self.problem(f"{where}: '{yaml_key}' must be a non-empty state key, got {value!r}")
            keys[yaml_key] = value
        if len(self.problems) > problems_before or over is None:
            return
        try:
            graph.add_map_edge(source, target, over=over, fan_in=fan_in, item_key=keys["as"],
                               index_key=keys["index_as"],
                               max_concurrency=spec.get("max_concurrency"), retry=retry)
        except GraphError as exc:
            for problem in exc.problems:
                self.problem(problem.replace(f"map edge {source} -> {target}", where, 1))
            return
        fan_ins.add(fan_in)

    def condition(self, when: Any, where: str, origin: str, role: str = "when"
                  ) -> Condition | None:
        if when is None:
            return None
        language, expression = Language.PYTHON, when
        if isinstance(when, Mapping):
            if len(when) != 1 or next(iter(when)) not in tuple(Language):
                self.problem(f"{where}: '{role}' must be an expression or {{lua: ...}} / {{python: ...}}")
                return None
            language, expression = next(iter(when.items()))
        if not isinstance(expression, str) or not expression.strip():
            self.problem(f"{where}: '{role}' must be a non-empty expression")
            return None
        if language == Language.LUA:
            if not self.engine._lua_enabled:
                what = "condition" if role == "when" else f"expression in '{role}'"
                self.problem(f"{where}: Lua {what} but this engine has lua_enabled=False")
                return None
            error = self.lua.check_condition(expression)
            if error is not None:
                self.problem(f"{where}: invalid Lua condition, {error}")
                return None
            return LuaCondition(expression, origin=origin)
        if not self.python_allowed(where, f"the '{role}' expression" if role != "when"
                                   else "the 'when' condition",
                                   f"write it in Lua as {role}: {{lua: ...}}"):
            return None
        try:
            return PythonCondition(expression, origin=f"<{origin}>")
        except SyntaxError as exc:
            what = "condition" if role == "when" else f"expression in '{role}'"
            self.problem(f"{where}: invalid Python {what}: {exc.msg}")
            return None


def _language_of_file(reference: str) -> Language | None:
    """The language a node file's name implies (``.lua`` / ``.py``), if any."""
    suffix = os.path.splitext(reference)[1].lower()
    return {".lua": Language.LUA, ".py": Language.PYTHON}.get(suffix)


def _assert_lua_only(graph: CompiledGraph) -> None:
    """Last check of a Lua-only graph: nothing in it can run Python.

    The builder already refused every Python part; this catches a code path
    that forgot to ask ``_Builder.python_allowed``.
    """
    for name, node in graph.nodes.items():
        routes = graph.routes_of(name)
        conditions = [condition for condition, _ in routes.conditional]
        if (not isinstance(node, LuaNode) or routes.router is not None
                or not all(isinstance(c, LuaCondition) for c in conditions)):
            graph.close()
            raise GraphError(f"internal error: node {name!r} of a Lua-only graph has Python parts")
