"""Build a CompiledGraph from a YAML document (see DESIGN.md §2).

Every mistake becomes a ``GraphError`` that lists all problems found, each
naming the file and the node, edge or setting at fault.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from itertools import pairwise
from pathlib import Path
from typing import Any

import yaml

from .conditions import Condition, LuaCondition, PythonCondition
from .errors import GraphError
from .graph import DEFAULT_MAX_STEPS, CompiledGraph, StateGraph
from .isolation.base import available_backends
from .lua.runtime import DEFAULT_MAX_MEMORY
from .nodes import LuaNode, Node, PythonNode
from .runner import END, START

DEFAULT_LUA_TIMEOUT = 30.0
TOP_LEVEL_KEYS = {"name", "description", "variables", "settings", "nodes", "edges"}
NODE_KEYS = {"name", "run", "file", "language", "fan_in", "description"}
EDGE_KEYS = {"from", "to", "type", "fan_in", "when", "over", "as", "index_as",
             "max_concurrency", "retry"}
MAP_EDGE_KEYS = {"over", "as", "index_as", "max_concurrency", "retry"}
PARALLEL_KEYS = {"isolation", "strategy", "max_workers", "branch_timeout", "fail_fast",
                 "max_steps", "max_concurrency"}
LUA_KEYS = {"timeout", "max_memory"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
               "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
               "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}
_UNSET: Any = object()


class YAMLEngine:
    """Loads YAML workflows into compiled graphs.

    Isolation precedence: the ``isolation`` argument, then YAML
    ``settings.parallel.isolation`` (alias ``strategy``), then ``"thread"``.
    ``options`` override any ``settings.parallel`` key (``branch_timeout``,
    ``fail_fast``, ``max_steps`` or a backend's own option).
    """

    def __init__(self, lua_enabled: bool = True, lua_timeout: float = _UNSET,
                 isolation: str | None = None, max_workers: int | None = None,
                 **options: Any) -> None:
        self._lua_enabled = lua_enabled
        self._lua_timeout_explicit = lua_timeout is not _UNSET
        self._lua_timeout = DEFAULT_LUA_TIMEOUT if lua_timeout is _UNSET else lua_timeout
        self._isolation = isolation
        self._max_workers = max_workers
        self._options = options

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
        raise GraphError(f"{where}: invalid YAML: {problem}") from exc


def parse_size(value: Any) -> int | None:
    """``64MiB``, ``1GB``, ``1048576`` -> bytes; ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"size must be positive, got {value}")
        return value
    match = _SIZE.match(str(value))
    unit = (match.group(2) or "").lower() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(f"not a size: {value!r} (use bytes or e.g. 64MiB, 1GB)")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


class _Builder:
    """Turns one document into a StateGraph, collecting every problem on the way."""

    def __init__(self, engine: YAMLEngine, document: Any, source: str | None,
                 base_dir: Path | None) -> None:
        self.engine = engine
        self.document = document
        self.source = source
        self.base_dir = base_dir
        self.problems: list[str] = []

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def fail(self) -> GraphError:
        return GraphError(problems=self.problems, source=self.source)

    def build(self) -> CompiledGraph:
        doc = self.document
        if not isinstance(doc, Mapping):
            self.problem(f"the document must be a mapping with 'nodes', got {type(doc).__name__}")
            raise self.fail()
        for key in sorted(set(doc) - TOP_LEVEL_KEYS, key=str):
            self.problem(f"unknown top-level key {key!r} (allowed: {', '.join(sorted(TOP_LEVEL_KEYS))})")
        variables = doc.get("variables") or {}
        if not isinstance(variables, Mapping):
            self.problem("variables: must be a mapping")
            variables = {}
        compile_options = self.settings(doc.get("settings") or {})
        graph = StateGraph()
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
            return graph.compile(variables=dict(variables), name=doc.get("name"),
                                 **compile_options)
        except GraphError as exc:
            raise GraphError(problems=exc.problems, source=self.source) from None

    def settings(self, settings: Any) -> dict[str, Any]:
        engine = self.engine
        if not isinstance(settings, Mapping):
            self.problem("settings: must be a mapping")
            settings = {}
        lua = settings.get("lua") or {}
        parallel = dict(settings.get("parallel") or {})
        if not isinstance(lua, Mapping):
            self.problem("settings.lua: must be a mapping")
            lua = {}
        for key in sorted(set(lua) - LUA_KEYS, key=str):
            self.problem(f"settings.lua: unknown key {key!r} (allowed: timeout, max_memory)")
        lua_timeout = engine._lua_timeout
        if not engine._lua_timeout_explicit and "timeout" in lua:
            lua_timeout = lua["timeout"]
        if lua_timeout is not None and (isinstance(lua_timeout, bool) or not isinstance(
                lua_timeout, (int, float)) or lua_timeout <= 0):
            self.problem(f"settings.lua.timeout: must be a positive number, got {lua_timeout!r}")
            lua_timeout = DEFAULT_LUA_TIMEOUT
        try:
            max_memory = parse_size(lua["max_memory"]) if "max_memory" in lua else DEFAULT_MAX_MEMORY
        except ValueError as exc:
            self.problem(f"settings.lua.max_memory: {exc}")
            max_memory = DEFAULT_MAX_MEMORY
        if "strategy" in parallel:
            if "isolation" in parallel and parallel["isolation"] != parallel["strategy"]:
                self.problem("settings.parallel: 'isolation' and its alias 'strategy' disagree")
            parallel.setdefault("isolation", parallel.pop("strategy"))
            parallel.pop("strategy", None)
        parallel.update(engine._options)
        isolation = engine._isolation or parallel.pop("isolation", None) or "thread"
        parallel.pop("isolation", None)
        if not isinstance(isolation, str) or isolation not in available_backends():
            self.problem(f"settings.parallel.isolation: unknown isolation backend {isolation!r}; "
                         f"available: {', '.join(available_backends())}")
        max_workers = engine._max_workers or parallel.pop("max_workers", None)
        parallel.pop("max_workers", None)
        fail_fast = parallel.pop("fail_fast", False)
        if not isinstance(fail_fast, bool):
            self.problem(f"settings.parallel.fail_fast: must be true or false, got {fail_fast!r}")
        options: dict[str, Any] = {
            "isolation": isolation, "max_workers": max_workers,
            "branch_timeout": parallel.pop("branch_timeout", None), "fail_fast": fail_fast,
            "max_steps": parallel.pop("max_steps", DEFAULT_MAX_STEPS),
            "max_concurrency": parallel.pop("max_concurrency", None),
            "lua_timeout": lua_timeout, "lua_max_memory": max_memory,
        }
        # What is left belongs to backends: a mapping under a backend's name, or
        # flat keys for the chosen backend.
        backend_options = dict(parallel.pop(isolation, None) or {}) if isinstance(
            isolation, str) else {}
        for key in list(parallel):
            if isinstance(parallel[key], Mapping) and key in available_backends():
                parallel.pop(key)
        backend_options.update(parallel)
        options["backend_options"] = backend_options
        return options

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
                self.problem(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(NODE_KEYS))})")
            if name in names:
                self.problem(f"{where}: defined twice")
                continue
            if name in (START, END):
                self.problem(f"{where}: the name is reserved")
                continue
            names.append(name)
            node = self.node(name, spec, where)
            if node is None:
                continue
            if spec.get("fan_in"):
                graph.add_fan_in_node(name, node)
            else:
                graph.add_node(name, node)
        return names

    def node(self, name: str, spec: Mapping[str, Any], where: str) -> Node | None:
        code = spec.get("run")
        if "file" in spec:
            if code is not None:
                self.problem(f"{where}: give either 'run' or 'file', not both")
                return None
            code = self.read_node_file(spec["file"], where)
            if code is None:
                return None
        if not isinstance(code, str):
            self.problem(f"{where}: missing 'run' (the node's Python or Lua code)")
            return None
        language = spec.get("language")
        first_line = next((line.strip() for line in code.splitlines() if line.strip()), "")
        if language is None:
            language = "lua" if first_line.lower().startswith("-- lua") else "python"
        if language not in ("python", "lua"):
            self.problem(f"{where}: language must be 'python' or 'lua', got {language!r}")
            return None
        if language == "lua":
            if not self.engine._lua_enabled:
                self.problem(f"{where}: is a Lua node but this engine has lua_enabled=False")
                return None
            return LuaNode(name, code)
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
        if not path.is_absolute():
            if self.base_dir is None:
                self.problem(f"{where}: relative file {reference!r} needs load_from_file or base_dir")
                return None
            path = self.base_dir / path
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self.problem(f"{where}: cannot read file {str(path)!r}: {exc}")
            return None

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
                self.problem(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(EDGE_KEYS))})")
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
            kind = spec.get("type", "normal")
            if kind != "map":
                for key in sorted(MAP_EDGE_KEYS & set(spec)):
                    self.problem(f"{where}: {key!r} belongs to map edges (type: map)")
            if kind == "map":
                self.map_edge(graph, spec, where, known, fan_ins)
                continue
            if kind == "parallel":
                fan_in = spec.get("fan_in")
                if not isinstance(fan_in, str):
                    self.problem(f"{where}: a parallel edge needs 'fan_in' (the node where branches meet)")
                elif fan_in not in known:
                    self.problem(f"{where}: fan-in node {fan_in!r} does not exist")
                elif source == START or target == END:
                    self.problem(f"{where}: parallel edges run between nodes")
                else:
                    fan_ins.add(fan_in)
                    graph.add_parallel_edge(source, target, fan_in)
                continue
            if kind not in ("normal", "simple", "conditional"):
                self.problem(f"{where}: unknown edge type {kind!r} (normal, parallel or map)")
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
                 fan_ins: set[str]) -> None:
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
                               max_concurrency=spec.get("max_concurrency"),
                               retry=spec.get("retry"))
        except GraphError as exc:
            for problem in exc.problems:
                self.problem(problem.replace(f"map edge {source} -> {target}", where, 1))
            return
        fan_ins.add(fan_in)

    def condition(self, when: Any, where: str, origin: str, role: str = "when"
                  ) -> Condition | None:
        if when is None:
            return None
        language, expression = "python", when
        if isinstance(when, Mapping):
            if len(when) != 1 or next(iter(when)) not in ("lua", "python"):
                self.problem(f"{where}: '{role}' must be an expression or {{lua: ...}} / {{python: ...}}")
                return None
            language, expression = next(iter(when.items()))
        if not isinstance(expression, str) or not expression.strip():
            self.problem(f"{where}: '{role}' must be a non-empty expression")
            return None
        if language == "lua":
            if not self.engine._lua_enabled:
                what = "condition" if role == "when" else f"expression in '{role}'"
                self.problem(f"{where}: Lua {what} but this engine has lua_enabled=False")
                return None
            return LuaCondition(expression, origin=origin)
        try:
            return PythonCondition(expression, origin=f"<{origin}>")
        except SyntaxError as exc:
            what = "condition" if role == "when" else f"expression in '{role}'"
            self.problem(f"{where}: invalid Python {what}: {exc.msg}")
            return None
