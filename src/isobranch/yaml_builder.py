"""Turning one YAML document into a CompiledGraph: nodes, edges, conditions, then compile().

``DocumentBuilder`` reads ``settings:`` through its base class
(yaml_settings.py) and the graph itself here, collecting every problem
before raising one ``GraphError``; ``YAMLEngine`` (yaml_engine.py) is the
public door that reads files and calls it. A ``subgraph:`` node's file is
read by a builder of its own (``build_subgraph``), whose problems come
back named with the chain of files (yaml_subgraphs.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any

from .cache import as_cache_policy
from .code_location import CodeLocation
from .compiled import CompiledGraph
from .conditions import Condition, LuaCondition, PythonCondition
from .errors import GraphError
from .graph import StateGraph
from .keys import (
    EDGE_KEYS,
    FAN_OUT_EDGE_KEYS,
    MAP_EDGE_KEYS,
    NODE_KEYS,
    TOP_LEVEL_KEYS,
    EdgeType,
    Language,
    unknown,
)
from .lua.syntax import LuaSyntaxChecker
from .nodes import LuaNode, Node, PythonNode
from .peer_nodes import PeerPythonNode, ResultUnderKey, WhileLoopNode
from .peer_yaml import OUTPUT_KEY_SPEC, WHILE_LOOP_SPEC, PeerTranslator, is_peer_document
from .retry import RetryPolicy, parse_policy
from .routes import END, START
from .schema import StateSchema
from .subgraph import SubgraphNode, join_path
from .yaml_lines import CodeKey, CodeLines
from .yaml_reading import read_workflow
from .yaml_settings import EngineOptions, LuaCeiling, SettingsReader, contained_file
from .yaml_subgraphs import CHAIN_ARROW, IncludeChain, subgraph_path

# The keys that give a node its code; a subgraph node's code is its file's.
_CODE_KEYS = ("run", "file", "language", "lua", "python")
# The keys only a subgraph node takes.
_SUBGRAPH_ONLY_KEYS = ("input", "output")


class DocumentBuilder(SettingsReader):
    """Turns one document into a StateGraph, collecting every problem on the way.

    Reading ``settings:`` is the base class's job (yaml_settings.py); this
    class reads the nodes and edges and compiles the graph.
    """

    def __init__(self, engine_options: EngineOptions, document: Any, source: str | None,
                 base_dir: Path | None, code_lines: CodeLines | None = None, *,
                 includes: IncludeChain | None = None,
                 lua_ceiling: LuaCeiling | None = None) -> None:
        """``includes``: the files from the loaded document down to this one (for a file a
        ``subgraph:`` node names); ``lua_ceiling``: the Lua limits of the file naming it."""
        super().__init__(engine_options, source, base_dir)
        self.document = document
        # Where code values start in the file ``source`` (empty for a parsed dict).
        self.code_lines = code_lines or {}
        self.lua = LuaSyntaxChecker()
        self.includes = includes or IncludeChain.top(source, None)
        self.lua_ceiling = lua_ceiling
        # Problems of included files, each already naming its chain of files.
        self.subgraph_problems: list[str] = []
        # This document's Lua limits, once read: the ceiling of the files it includes.
        self.own_lua_limits: LuaCeiling | None = None
        # The node cache of this document's graph (and of the files it includes).
        self.own_cache = engine_options.cache
        # Python nodes of the_edge_agent's format get the globals that format gives them.
        self.python_node: type[PythonNode] = PythonNode

    def location(self, key: CodeKey) -> CodeLocation | None:
        """Where the code value at ``key`` starts in the file, if known."""
        line = self.code_lines.get(key)
        return CodeLocation(self.source, line) if line is not None and self.source else None

    def fail(self) -> GraphError:
        """One error for every problem found, in this document and in the files it includes."""
        if self.includes.is_top:
            return GraphError(problems=self.problems + self.subgraph_problems,
                              source=self.source)
        chain = self.includes.text()
        return GraphError(problems=[f"{chain}: {problem}" for problem in self.problems]
                          + self.subgraph_problems)

    def has_problems(self) -> bool:
        """Whether this document or a file it includes has a problem so far."""
        return bool(self.problems or self.subgraph_problems)

    def python_allowed(self, where: str, what: str, hint: str) -> bool:
        """The one door through which any part of the document becomes Python code.

        Every place that would build a Python callable from the document
        (node bodies, fan-in nodes, conditions, and any future expression)
        must ask here first; with ``allow_python=False`` the answer is no
        and the refusal is recorded as a problem.
        """
        if self.engine_options.allow_python:
            return True
        self.problem(f"{where}: {what} is Python, which this engine refuses "
                     f"(allow_python=False runs only sandboxed Lua); {hint}")
        return False

    def build(self) -> CompiledGraph:
        """The document as a compiled graph, run with its own settings."""
        doc = self.mapping_document()
        compile_options = self.settings(doc.get("settings") or {})
        self.own_cache = compile_options["cache"]
        graph = self.graph(doc, compile_options["lua_timeout"], compile_options["lua_max_memory"])
        try:
            compiled = graph.compile(variables=self.variables(doc), name=doc.get("name"),
                                     interrupt_before=doc.get("interrupt_before") or (),
                                     interrupt_after=doc.get("interrupt_after") or (),
                                     **compile_options)
        except GraphError as exc:
            raise GraphError(problems=exc.problems, source=self.source) from None
        compiled.owns_checkpointer = compiled.checkpointer is not self.engine_options.checkpointer
        compiled.other_backends_options = self.other_backends_options
        if not self.engine_options.allow_python:
            assert_lua_only(compiled)
        return compiled

    def build_subgraph(self) -> CompiledGraph:
        """The document as the graph of a ``subgraph:`` node of the file that names it.

        It keeps its nodes, edges, ``variables``, ``state_schema`` and
        ``settings.lua`` (below the including file's limits); its
        ``settings.parallel`` and ``settings.checkpoint`` are the including
        run's business, so they are not read.
        """
        assert self.lua_ceiling is not None, "an included file has the Lua limits of its includer"
        doc = self.mapping_document()
        for key in ("interrupt_before", "interrupt_after"):
            if key in doc:  # breakpoints pause the main path, which is the including file's
                self.problem(f"{key}: breakpoints belong to the top workflow file, not to a "
                             f"subgraph file")
        lua_timeout, max_memory = self.subgraph_settings(doc.get("settings"), self.lua_ceiling)
        graph = self.graph(doc, lua_timeout, max_memory)
        try:
            # Inline: the subgraph's own fan-outs run on the outer run's backend.
            return graph.compile(isolation="inline", variables=self.variables(doc),
                                 name=doc.get("name"), lua_timeout=lua_timeout,
                                 lua_max_memory=max_memory, cache=self.engine_options.cache)
        except GraphError as exc:
            self.problems.extend(exc.problems)
            raise self.fail() from None

    def mapping_document(self) -> Mapping[str, Any]:
        """The document, checked to be a mapping with known top-level keys."""
        doc = self.document
        if not isinstance(doc, Mapping):
            self.problem(f"the document must be a mapping with 'nodes', got {type(doc).__name__}")
            raise self.fail()
        if is_peer_document(doc):
            # the_edge_agent's format: translated into this one, its problems kept.
            translator = PeerTranslator(doc)
            doc = self.document = translator.translate()
            self.problems.extend(translator.problems)
            self.python_node = PeerPythonNode
            # Its edges are rebuilt, so only the nodes' code keeps its place in the file.
            self.code_lines = {key: line for key, line in self.code_lines.items()
                               if key[0] == "nodes"}
        for key in sorted(set(doc) - TOP_LEVEL_KEYS, key=str):
            self.problem(unknown(f"unknown top-level key {key!r}", key, TOP_LEVEL_KEYS))
        return doc

    def variables(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        """The document's ``variables``; empty if they are not a mapping (``graph`` says so)."""
        variables = doc.get("variables") or {}
        if not isinstance(variables, Mapping):
            return {}
        return dict(variables)

    def graph(self, doc: Mapping[str, Any], lua_timeout: float | None,
              lua_max_memory: int | None) -> StateGraph:
        """The document's nodes and edges as a valid StateGraph, or the error listing every problem."""
        if not isinstance(doc.get("variables") or {}, Mapping):
            self.problem("variables: must be a mapping")
        self.own_lua_limits = LuaCeiling(lua_timeout, lua_max_memory, self.includes.current.name)
        graph = StateGraph(StateSchema.from_yaml(doc.get("state_schema"), self.problems))
        names = self.nodes(graph, doc.get("nodes"))
        fan_in_names = self.edges(graph, doc.get("edges"), names)
        if self.has_problems():
            raise self.fail()
        for name in fan_in_names:
            graph.mark_fan_in(name)  # YAML marks fan-in nodes by use as well as by flag
        for problem in graph.validate():
            self.problem(problem)
        if self.has_problems():
            raise self.fail()
        return graph

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
            if WHILE_LOOP_SPEC in spec:  # made by PeerTranslator, never written in a file
                if name in names:
                    self.problem(f"{where}: defined twice")
                    continue
                names.append(name)
                loop = self.while_loop_node(name, spec[WHILE_LOOP_SPEC], where)
                if loop is not None:
                    graph.add_node(name, loop)
                continue
            is_subgraph = "subgraph" in spec
            # On a subgraph node, a code key is a conflict (said below), not a typo.
            known_keys = NODE_KEYS | set(_CODE_KEYS) if is_subgraph else NODE_KEYS
            for key in sorted(set(spec) - known_keys - {OUTPUT_KEY_SPEC}, key=str):
                self.problem(unknown(f"{where}: unknown key {key!r}", key, NODE_KEYS))
            if name in names:
                self.problem(f"{where}: defined twice")
                continue
            if name in (START, END):
                self.problem(f"{where}: the name is reserved")
                continue
            names.append(name)
            if is_subgraph:
                self.subgraph_node(graph, name, spec, where)
                continue
            for key in _SUBGRAPH_ONLY_KEYS:
                if key in spec:
                    self.problem(f"{where}: {key!r} belongs to subgraph nodes (the state keys "
                                 f"mapped into or out of a 'subgraph:' file)")
            node = self.node(name, spec, where, index)
            retry, problems = parse_policy(spec.get("retry"), f"{where}: retry")
            self.problems.extend(problems)
            memo = self.memo_options(spec, where)
            if node is None or problems or memo is None:
                continue
            if spec.get("fan_in"):
                graph.add_fan_in_node(name, node, retry=retry, **memo)
            else:
                graph.add_node(name, node, retry=retry, **memo)
        return names

    def subgraph_node(self, graph: StateGraph, name: str, spec: Mapping[str, Any],
                      where: str) -> None:
        """Add the node ``subgraph: file.yaml``: that file's graph run as one step of this one."""
        problems_before = len(self.problems)
        for key in _CODE_KEYS:
            if key in spec:
                self.problem(f"{where}: 'subgraph' and {key!r} on one node: a subgraph node runs "
                             f"the nodes of its file; give one of them")
        if spec.get("fan_in"):
            self.problem(f"{where}: a subgraph node cannot be a fan-in node "
                         f"(parallel_results does not cross into a subgraph); fan in at a "
                         f"node before it")
        retry, problems = parse_policy(spec.get("retry"), f"{where}: retry")
        self.problems.extend(problems)
        memo = self.memo_options(spec, where)
        inner = self.included_graph(spec["subgraph"], where)
        if inner is None or memo is None or len(self.problems) > problems_before:
            return
        try:
            # add_node checks the input: and output: mappings, naming the node.
            graph.add_node(name, inner, input=spec.get("input"), output=spec.get("output"),
                           retry=retry, **memo)
        except GraphError as exc:
            self.problems.extend(exc.problems)

    def memo_options(self, spec: Mapping[str, Any], where: str) -> dict[str, Any] | None:
        """A node's ``cache:`` and ``replay:`` as ``add_node`` keywords (None: a problem)."""
        try:
            cache = as_cache_policy(spec.get("cache"), f"{where}: cache")
        except ValueError as exc:
            self.problem(str(exc))
            return None
        replay = spec.get("replay", False)
        if not isinstance(replay, bool):
            self.problem(f"{where}: replay: must be true or false, got {replay!r}")
            return None
        return {"cache": cache, "replay": replay}

    def included_graph(self, reference: Any, where: str) -> CompiledGraph | None:
        """The compiled graph of the file ``reference`` names, or None (its problems recorded)."""
        try:
            path = subgraph_path(reference, self.base_dir,
                                 confined=not self.engine_options.allow_python)
        except ValueError as exc:
            self.problem(f"{where}: {exc}")
            return None
        cycle = self.includes.cycle_to(path)
        if cycle is not None:
            self.problem(f"{where}: subgraph {reference!r} includes itself: {cycle}")
            return None
        name = self.node_file_name(reference)
        includes = self.includes.entering(path, name)
        try:
            document, _, code_lines = read_workflow(path, name=name)
        except GraphError as exc:  # its message starts with the file's name
            self.subgraph_problems.append(f"{self.includes.text()}{CHAIN_ARROW}{exc}")
            return None
        assert self.own_lua_limits is not None  # read with the settings, before the nodes
        # The included file's cached nodes use the includer's cache (its own settings.cache
        # is not read, like its settings.checkpoint).
        options = replace(self.engine_options, cache=self.own_cache)
        builder = DocumentBuilder(options, document, name, path.parent, code_lines,
                                  includes=includes, lua_ceiling=self.own_lua_limits)
        try:
            return builder.build_subgraph()
        except GraphError as exc:
            self.subgraph_problems.extend(exc.problems)
            return None

    def while_loop_node(self, name: str, loop: Mapping[str, Any],
                        where: str) -> WhileLoopNode | None:
        """A while_loop of the_edge_agent's format (translated by PeerTranslator) as one node."""
        condition = self.condition(loop["condition"], where, f"while_loop {name}",
                                   role="condition")
        body = []
        for spec in loop["body"]:
            inner = spec["name"]
            node = self.node(inner, spec, f"{where}: body node {inner!r}", None)
            if node is not None:
                body.append(node)
        if condition is None or len(body) != len(loop["body"]):
            return None
        return WhileLoopNode(name, condition, loop["max_iterations"], body)

    def node(self, name: str, spec: Mapping[str, Any], where: str,
             index: int | None) -> Node | None:
        """The node ``spec`` gives, or None (its problems recorded); ``index`` locates its
        code in the file (None: a node the file does not list, whose lines are unknown)."""
        node = self.code_node(name, spec, where, index)
        key = spec.get(OUTPUT_KEY_SPEC)
        return node if node is None or key is None else ResultUnderKey(node, key)

    def code_node(self, name: str, spec: Mapping[str, Any], where: str,
                  index: int | None) -> Node | None:
        code = spec.get("run")
        language = spec.get("language")
        location = in_file = (self.location(("nodes", index, "run")) if index is not None
                              else None)
        if "file" in spec:
            if code is not None:
                self.problem(f"{where}: give either 'run' or 'file', not both")
                return None
            reference = spec["file"]
            code = self.read_node_file(reference, where)
            if code is None:
                return None
            where = f"{where} (file {reference!r})"
            # The file's lines are the code's: a syntax error's line needs no other.
            location = CodeLocation(self.node_file_name(reference), 1)
            in_file = None
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
            if not self.engine_options.lua_enabled:
                self.problem(f"{where}: is a Lua node but this engine has lua_enabled=False")
                return None
            error = self.lua.check_node(code)
            if error is not None:
                self.problem(f"{where}, {error}{_in_file(in_file, error.line)}")
                return None
            return LuaNode(name, code, location=location)
        if not self.python_allowed(where, "the node body" if "file" not in spec else "the file",
                                   "write it in Lua and mark it 'language: lua' or start it "
                                   "with a '-- lua' line"):
            return None
        try:
            return self.python_node(name, code, origin=f"<node {name}>", location=location)
        except SyntaxError as exc:
            message = exc.msg.removeprefix(f"node {name!r}: ")  # ``where`` names the node
            self.problem(f"{where}: invalid Python: {message}{_in_file(in_file, exc.lineno)}")
            return None

    def node_file_name(self, reference: str) -> str:
        """A node file's name as messages show it: beside the workflow file's name, as given."""
        if self.source and not os.path.isabs(reference):
            return os.path.normpath(os.path.join(os.path.dirname(self.source), reference))
        if self.base_dir is not None:
            return str(self.base_dir / reference)
        return reference

    def read_node_file(self, reference: Any, where: str) -> str | None:
        if not isinstance(reference, str) or not reference:
            self.problem(f"{where}: 'file' must be a path")
            return None
        path = Path(reference)
        if self.base_dir is None and not path.is_absolute():
            self.problem(f"{where}: relative file {reference!r} needs load_from_file or base_dir")
            return None
        if not self.engine_options.allow_python:
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
                    self.map_edge(graph, spec, where, known, fan_ins, retry, index)
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
            condition = self.condition(spec.get("when"), where, f"when {source}->{target}",
                                       location=self.location(("edges", index, "when")))
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
                 fan_ins: set[str], retry: RetryPolicy | None, index: int) -> None:
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
        elif isinstance(over, Mapping | Condition):
            over = self.condition(over, where, f"over {source}->{target}", role="over",
                                  location=self.location(("edges", index, "over")))
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

    def condition(self, when: Any, where: str, origin: str, role: str = "when", *,
                  location: CodeLocation | None = None) -> Condition | None:
        if when is None:
            return None
        if isinstance(when, Condition):  # a Jinja2 expression of the_edge_agent's format
            if not self.python_allowed(where, f"the Jinja2 '{role}' expression",
                                       f"write it in Lua as {role}: {{lua: ...}}"):
                return None
            return when
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
            if not self.engine_options.lua_enabled:
                what = "condition" if role == "when" else f"expression in '{role}'"
                self.problem(f"{where}: Lua {what} but this engine has lua_enabled=False")
                return None
            error = self.lua.check_condition(expression)
            if error is not None:
                self.problem(f"{where}: invalid Lua condition, {error}{_in_file(location, error.line)}")
                return None
            return LuaCondition(expression, origin=origin, location=location)
        if not self.python_allowed(where, f"the '{role}' expression" if role != "when"
                                   else "the 'when' condition",
                                   f"write it in Lua as {role}: {{lua: ...}}"):
            return None
        try:
            return PythonCondition(expression, origin=f"<{origin}>", location=location)
        except SyntaxError as exc:
            what = "condition" if role == "when" else f"expression in '{role}'"
            self.problem(f"{where}: invalid Python {what}: {exc.msg}"
                         f"{_in_file(location, exc.lineno)}")
            return None


def _in_file(location: CodeLocation | None, line: int | None) -> str:
    """`` (agent.yaml:13)``: where ``line`` of code at ``location`` is in its file, if known."""
    if location is None or line is None:
        return ""
    return f" ({location.file}:{location.line + line - 1})"


def _language_of_file(reference: str) -> Language | None:
    """The language a node file's name implies (``.lua`` / ``.py``), if any."""
    suffix = os.path.splitext(reference)[1].lower()
    return {".lua": Language.LUA, ".py": Language.PYTHON}.get(suffix)


def assert_lua_only(graph: CompiledGraph) -> None:
    """Last check of a Lua-only graph: nothing in it, or in its subgraphs, can run Python.

    The builder already refused every Python part; this catches a code path
    that forgot to ask ``DocumentBuilder.python_allowed``.
    """
    python = _python_part(graph)
    if python is not None:
        graph.close()
        raise GraphError(f"internal error: node {python!r} of a Lua-only graph has Python parts")


def _python_part(graph: CompiledGraph, prefix: str = "") -> str | None:
    """The path of the first node of ``graph`` (or of a subgraph) with Python parts, if any."""
    for name, node in graph.nodes.items():
        routes = graph.routes_of(name)
        conditions = [condition for condition, _ in routes.conditional]
        if routes.router is not None or not all(isinstance(c, LuaCondition) for c in conditions):
            return join_path(prefix, name)
        if isinstance(node, SubgraphNode):
            inner = _python_part(node.graph, join_path(prefix, name))
            if inner is not None:
                return inner
        elif not isinstance(node, LuaNode):
            return join_path(prefix, name)
    return None
