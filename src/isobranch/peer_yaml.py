"""the_edge_agent's YAML format, translated into isobranch's (docs/peer-yaml.md).

A document is in that format when it uses a key only that format has
(``goto``, ``initial_state``, ``config``, an edge's ``condition`` ...) or a
Jinja2 ``{{ }}`` expression; ``is_peer_document`` decides. ``PeerTranslator``
turns such a document into an isobranch document: ``goto`` rules and the
format's chaining of a node without outgoing edges become edges, Jinja2
expressions become ``JinjaCondition`` objects in the ``when:`` / ``over:``
slots, ``initial_state`` an entry node, ``interrupt:`` breakpoints, and
``type: dynamic_parallel`` a map fan-out. Every key of the format that
isobranch lacks is a problem naming the key, never dropped.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Mapping
from itertools import pairwise
from typing import Any

from .conditions import Condition
from .jinja_conditions import UNAVAILABLE_NAMES, JinjaCondition, is_jinja
from .keys import EdgeType
from .peer_nodes import MAX_ITERATIONS, MIN_ITERATIONS
from .routes import END, START

# Top-level keys only the_edge_agent's format has, and that isobranch takes.
PEER_TOP_LEVEL_KEYS = frozenset({"config", "version", "initial_state"})
# Top-level keys of that format that isobranch does not support, with what to write instead.
UNSUPPORTED_TOP_LEVEL = {
    "imports": "custom action modules are not supported; write the action as a run: node",
    "secrets": "secrets are not supported; pass them in the input state",
    "data": "the 'data' section is not supported; use 'variables'",
    "extraction_prompts": "LLM extraction prompts are not supported (no LLM actions)",
    "skills": "skills are not supported",
    "memory": "memory backends are not supported",
    "llm": "LLM settings are not supported (no LLM actions)",
}
# Keys of 'settings:' in that format that isobranch has no equivalent for.
UNSUPPORTED_SETTINGS = {
    "llm": "LLM settings are not supported (no LLM actions)",
    "ltm": "long-term memory settings are not supported",
    "memory": "memory settings are not supported",
    "auth": "auth settings are not supported",
    "ratelimit": "rate-limit settings are not supported",
    "rate_limit": "rate-limit settings are not supported",
    "opik": "Opik tracing is not supported; use isobranch's tracing (docs/observing.md)",
    "trace_context": "trace settings are not supported; use isobranch's tracing",
    "trace_exporter": "trace settings are not supported; use isobranch's tracing",
    "trace_file": "trace settings are not supported; use isobranch's tracing",
    "auto_trace": "trace settings are not supported; use isobranch's tracing",
    "model": "LLM settings are not supported (no LLM actions)",
    "temperature": "LLM settings are not supported (no LLM actions)",
    "secrets": "secrets are not supported; pass them in the input state",
    "prolog": "Prolog is not supported",
    "backend": "LLM backends are not supported",
}
CONFIG_KEYS = frozenset({"raise_exceptions", "interrupt_before", "interrupt_after",
                         "checkpoint_dir"})
# Node keys only that format has, that isobranch takes.
PEER_NODE_KEYS = frozenset({"goto", "interrupt", "script", "type"})
UNSUPPORTED_NODE_KEYS = {
    "uses": "built-in actions are not supported; write the step as 'run:' code (Python or Lua)",
    "with": "'with:' gives a built-in action's parameters; built-in actions are not supported",
    "steps": "multi-step nodes are not supported outside type: dynamic_parallel; split the "
             "steps into nodes",
    "retry_policy": "use isobranch's 'retry:' policy",
}
NODE_TYPES = ("dynamic_parallel", "while_loop")
WHILE_LOOP_KEYS = frozenset({"name", "type", "condition", "max_iterations", "body",
                             "description", "goto", "interrupt"})
# Keys of a node that make sense only for a node of the graph, not one of a loop's body.
GRAPH_ONLY_NODE_KEYS = ("goto", "interrupt", "fan_in", "type", "retry", "cache", "replay",
                        "subgraph")
# What the translated document hands the builder, under keys no document can use:
# a while_loop node's parts, and the state key a node's result is stored under.
WHILE_LOOP_SPEC = "__while_loop__"
OUTPUT_KEY_SPEC = "__output_key__"
# A dynamic_parallel node's fail_fast on the map edge it becomes: a failure cancels the
# branches not yet started, and the run goes on to the fan-in.
CANCEL_UNSTARTED_SPEC = "__cancel_unstarted_on_failure__"
DYNAMIC_PARALLEL_KEYS = frozenset({
    "name", "type", "items", "item_var", "index_var", "max_concurrency", "fail_fast",
    "action", "steps", "subgraph", "input", "fan_in", "output", "parallel_config",
    "description", "goto", "interrupt"})
PARALLEL_CONFIG_KEYS = frozenset({"max_concurrency", "fail_fast", "timeout_seconds",
                                  "retry_policy", "circuit_breaker"})
PEER_EDGE_KEYS = frozenset({"condition", "parallel"})
# Edge types only that format has: an edge from __start__, an edge to __end__.
PEER_EDGE_TYPES = frozenset({"entry", "finish"})
UNSUPPORTED_EDGE_KEYS = {
    "parallel_strategy": "a backend per edge is not supported; choose one for the whole "
                         "graph in settings.parallel.isolation",
}
# The node that puts initial_state under the input.
INITIAL_STATE_NODE = "__initial_state__"


def is_peer_document(document: Any) -> bool:
    """Whether ``document`` uses a key or expression only the_edge_agent's format has."""
    if not isinstance(document, Mapping):
        return False
    if set(document) & (PEER_TOP_LEVEL_KEYS | set(UNSUPPORTED_TOP_LEVEL)):
        return True
    settings = document.get("settings")
    if isinstance(settings, Mapping) and set(settings) & set(UNSUPPORTED_SETTINGS):
        return True
    for spec in document.get("nodes") or ():
        if not isinstance(spec, Mapping):
            continue
        if set(spec) & (PEER_NODE_KEYS | set(UNSUPPORTED_NODE_KEYS) - {"output"}):
            return True
        if ("output" in spec and "subgraph" not in spec) or spec.get("language") == "prolog":
            return True
    edges = document.get("edges")
    for spec in edges if isinstance(edges, list) else ():
        if not isinstance(spec, Mapping):
            continue
        if set(spec) & (PEER_EDGE_KEYS | set(UNSUPPORTED_EDGE_KEYS)) \
                or spec.get("type") in PEER_EDGE_TYPES:
            return True
        when = spec.get("when")
        if isinstance(when, bool) or is_jinja(when) or _is_peer_shorthand(when):
            return True
    return False


# The keys both formats have, with the same meaning. A document that uses only these and no
# mark of either format reads the same in both, except for code that only the_edge_agent's
# format reads as Lua (see is_unmarked_peer_document).
SHARED_TOP_LEVEL_KEYS = frozenset({"name", "description", "variables", "state_schema",
                                   "settings", "nodes", "edges"})
SHARED_SETTINGS_KEYS = frozenset({"parallel"})
SHARED_NODE_KEYS = frozenset({"name", "description", "run", "language", "fan_in"})
SHARED_EDGE_KEYS = frozenset({"from", "to", "when", "type", "fan_in"})
SHARED_EDGE_TYPES = frozenset({EdgeType.NORMAL.value, EdgeType.PARALLEL.value})


def is_unmarked_peer_document(document: Any, compiles_as_lua: Callable[[str], bool]) -> bool:
    """Whether ``document``, with no mark of either format, is the_edge_agent's by its code.

    True when it uses only keys both formats share (so isobranch's format
    has nothing of its own to say) and some node without ``language`` has
    code that the_edge_agent's format reads as Lua: it shows Lua's words
    (``local``, ``then``, ``end``, ``elseif``, ``..``), is not Python, and
    ``compiles_as_lua``. In isobranch's format that code could only be a
    Python syntax error, so no document that loads changes meaning.
    """
    if not isinstance(document, Mapping) or not set(document) <= SHARED_TOP_LEVEL_KEYS:
        return False
    settings = document.get("settings")
    if settings is not None and not (isinstance(settings, Mapping)
                                     and set(settings) <= SHARED_SETTINGS_KEYS):
        return False
    nodes, edges = document.get("nodes"), document.get("edges") or []
    if not isinstance(nodes, list) or not isinstance(edges, list):
        return False
    for edge in edges:
        if not isinstance(edge, Mapping) or not set(edge) <= SHARED_EDGE_KEYS \
                or edge.get("type", EdgeType.NORMAL.value) not in SHARED_EDGE_TYPES \
                or not isinstance(edge.get("when", ""), str):
            return False
    if not all(isinstance(node, Mapping) and set(node) <= SHARED_NODE_KEYS for node in nodes):
        return False
    return any("language" not in node and _is_unmarked_lua(node.get("run"))
               and compiles_as_lua(node["run"]) for node in nodes)


# What marks code as Lua in the format besides a '-- lua' first line: a Lua keyword or
# operator Python has not.
_LUA_SIGNS = re.compile(r"\blocal\b|\bthen\b|\bend\b|\belseif\b|\.\.")


def _is_unmarked_lua(code: Any) -> bool:
    """Whether ``code`` is Lua the format recognises without a ``-- lua`` line.

    The format also takes ``--lua`` as the first line, and code with Lua's
    ``local``, ``then``, ``end``, ``elseif`` or ``..``; here only when the code
    is not Python, so no Python node is ever read as Lua.
    """
    if not isinstance(code, str):
        return False
    first = code.strip().lower()
    if first.startswith("--lua"):
        return True
    if first.startswith("-- lua") or not _LUA_SIGNS.search(code):
        return False  # the builder reads a '-- lua' line itself
    try:
        ast.parse(_without_template_tags(code))
    except SyntaxError:
        return True
    return False


# Jinja2's parts of Python code that is a template (rendered before it runs, Python after).
_TEMPLATE_EXPRESSION = re.compile(r"\{\{.*?\}\}", re.DOTALL)
_TEMPLATE_STATEMENT = re.compile(r"\{%.*?%\}", re.DOTALL)


def _without_template_tags(code: str) -> str:
    """``code`` with each ``{{ }}`` as a value and each ``{% %}`` gone: Python code that is a
    template parses as Python then, so its tags do not make it look like Lua."""
    return _TEMPLATE_STATEMENT.sub("", _TEMPLATE_EXPRESSION.sub("None", code))


def _is_peer_shorthand(when: Any) -> bool:
    """``true`` / ``false`` as text, ``!flag``, or a bare ``flag``: the format's shorthands."""
    if not isinstance(when, str):
        return False
    text = when.strip()
    return (text in ("true", "false") or
            (text.startswith("!") and text[1:].strip().isidentifier()))


class PeerTranslator:
    """Turns one document of the_edge_agent's format into an isobranch document.

    ``translate`` returns the new document; ``problems`` lists what could not
    be translated, each naming the node, edge or key, in the builder's words.
    """

    def __init__(self, document: Mapping[str, Any]) -> None:
        self.source = document
        self.problems: list[str] = []
        self.interrupt_before: list[str] = []
        self.interrupt_after: list[str] = []
        # One per node of the document, in its order (so a node's index, which locates
        # its code in the file, does not change), then the nodes made here.
        self.nodes: list[Any] = []
        self.extra_nodes: list[dict[str, Any]] = []
        self.edges: list[dict[str, Any]] = []
        # Fan-ins made for dynamic_parallel nodes: the run continues from them.
        self.continues_from: dict[str, str] = {}
        self.known_keys: set[str] | None = None
        # config.checkpoint_dir, if given (checked by the builder, which makes the checkpointer).
        self.checkpoint_dir: Any = None

    def translate(self) -> dict[str, Any]:
        """The isobranch document (problems in ``self.problems``)."""
        doc = self.source
        # isobranch's own keys pass on; so do unknown ones, for the builder to name.
        out: dict[str, Any] = {key: doc[key] for key in doc if key not in (
            PEER_TOP_LEVEL_KEYS | set(UNSUPPORTED_TOP_LEVEL) | {"nodes", "edges"})}
        for key, advice in UNSUPPORTED_TOP_LEVEL.items():
            if key in doc:
                self.problems.append(f"{key}: not supported: {advice}")
        self.config(doc.get("config"))
        self.settings(doc.get("settings"))
        if isinstance(doc.get("settings"), Mapping):  # named above, not again by the builder
            out["settings"] = {key: value for key, value in doc["settings"].items()
                               if key not in UNSUPPORTED_SETTINGS}
        version = doc.get("version")
        if version is not None and not isinstance(version, (str, int, float)):
            self.problems.append(f"version: must be a string or a number, got {version!r}")
        schema = doc.get("state_schema")
        if isinstance(schema, Mapping) and schema:
            self.known_keys = {str(key) for key in schema}
        initial = doc.get("initial_state")
        if initial is not None and not isinstance(initial, Mapping):
            self.problems.append(f"initial_state: must be a mapping, got {type(initial).__name__}")
            initial = None
        if initial and self.known_keys is not None:
            self.known_keys |= {str(key) for key in initial}
        nodes = doc.get("nodes")
        if not isinstance(nodes, list) or not nodes:
            out["nodes"] = nodes  # the builder says what is wrong
            return out
        raw_edges = doc.get("edges") or []
        if not isinstance(raw_edges, list):
            out["nodes"], out["edges"] = nodes, raw_edges
            return out
        specs = [spec for spec in nodes if isinstance(spec, Mapping)]
        names = [spec.get("name") for spec in specs]
        self.collect_known_keys(specs)
        goto_nodes = {spec.get("name") for spec in specs if "goto" in spec}
        for spec in nodes:
            self.nodes.append(self.node(spec))
        for index, spec in enumerate(raw_edges):
            self.edge(spec, index, goto_nodes)
        self.navigation(specs, names, raw_edges)
        if initial:
            self.initial_state_node(dict(initial))
        out["nodes"] = self.nodes + self.extra_nodes
        out["edges"] = self.edges
        before = list(out.get("interrupt_before") or []) + self.interrupt_before
        after = list(out.get("interrupt_after") or []) + self.interrupt_after
        if before:
            out["interrupt_before"] = before
        if after:
            out["interrupt_after"] = after
        return out

    # -- top level --------------------------------------------------------------

    def config(self, config: Any) -> None:
        if config is None:
            return
        if not isinstance(config, Mapping):
            self.problems.append(f"config: must be a mapping, got {type(config).__name__}")
            return
        for key in sorted(set(config) - CONFIG_KEYS, key=str):
            self.problems.append(f"config.{key}: unknown key (allowed: "
                                 f"{', '.join(sorted(CONFIG_KEYS))})")
        # Either value is accepted: the format's false (report a failure instead of raising)
        # has no counterpart, and refusing it would refuse agents that never fail.
        if not isinstance(config.get("raise_exceptions", True), bool):
            self.problems.append(f"config.raise_exceptions: must be true or false, got "
                                 f"{config['raise_exceptions']!r}")
        # A directory for the run's checkpoints: the builder records runs in a database there.
        self.checkpoint_dir = config.get("checkpoint_dir")
        for key, into in (("interrupt_before", self.interrupt_before),
                          ("interrupt_after", self.interrupt_after)):
            names = config.get(key) or []
            if not isinstance(names, list):
                self.problems.append(f"config.{key}: must be a list of node names")
                continue
            into.extend(names)

    def settings(self, settings: Any) -> None:
        if not isinstance(settings, Mapping):
            return
        for key, advice in UNSUPPORTED_SETTINGS.items():
            if key == "auto_trace" and settings.get(key) is False:
                continue  # tracing off is what a run does with no tracer provider
            if key in settings:
                self.problems.append(f"settings.{key}: not supported: {advice}")

    def collect_known_keys(self, specs: list[Mapping[str, Any]]) -> None:
        """Keys a declared state may also hold: the items and results of dynamic_parallel
        nodes, and the keys nodes store their results under (``output:``)."""
        if self.known_keys is None:
            return
        for spec in specs:
            for node in (spec, *(spec.get("body") if isinstance(spec.get("body"), list) else ())):
                output = node.get("output") if isinstance(node, Mapping) else None
                if isinstance(output, str) and spec.get("type") != "dynamic_parallel":
                    self.known_keys.add(output)
            if spec.get("type") == "dynamic_parallel":
                self.known_keys |= {str(spec.get("item_var", "item")),
                                    str(spec.get("index_var", "index")),
                                    str(spec.get("output", "parallel_results"))}

    # -- nodes ------------------------------------------------------------------

    def node(self, spec: Any) -> Any:
        """The node as isobranch takes it (a placeholder if it cannot be translated)."""
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            return spec  # the builder names what is wrong
        name = spec["name"]
        placeholder = {"name": name, "run": "return None"}
        where = f"node {name!r}"
        kind = spec.get("type")
        if kind is not None and kind not in NODE_TYPES:
            self.problems.append(f"{where}: unknown node type {kind!r} (allowed: "
                                 f"{', '.join(NODE_TYPES)})")
            return placeholder
        if kind == "while_loop":
            loop = self.while_loop(spec, where)
            self.interrupt(spec, name, where)
            return placeholder if loop is None else {"name": name, WHILE_LOOP_SPEC: loop}
        if kind == "dynamic_parallel":
            self.dynamic_parallel(spec, where)
            return placeholder  # the node itself runs nothing
        self.interrupt(spec, name, where)
        before = len(self.problems)
        out: dict[str, Any] = {}
        for key, value in spec.items():
            if key in UNSUPPORTED_NODE_KEYS:
                self.problems.append(f"{where}: {key}: not supported: {UNSUPPORTED_NODE_KEYS[key]}")
            elif key == "output" and "subgraph" not in spec:
                if not isinstance(value, str) or not value.isidentifier():
                    self.problems.append(f"{where}: output: must be the state key the node's "
                                         f"result is stored under, got {value!r}")
                else:
                    out[OUTPUT_KEY_SPEC] = value
            elif key == "script":
                if "run" in spec:
                    self.problems.append(f"{where}: give either 'run' or 'script' (its alias), "
                                         f"not both")
                out["run"] = value
            elif key == "language" and value == "prolog":
                self.problems.append(f"{where}: language: prolog: not supported: Prolog nodes "
                                     f"have no runtime in isobranch; write the node in Python "
                                     f"or Lua")
            elif key == "run" and isinstance(value, Mapping):
                self.problems.append(f"{where}: run: a mapping ('type: expression') is not "
                                     f"supported; write 'run: return {{key: expression}}'")
            elif key not in PEER_NODE_KEYS:
                out[key] = value
        if len(self.problems) > before:
            # Its code is not read: a Prolog body, or none beside 'uses:', would only add
            # a second, misleading problem (invalid Python, missing 'run').
            return placeholder
        if "language" not in out and _is_unmarked_lua(out.get("run")):
            out["language"] = "lua"
        return out

    def while_loop(self, spec: Mapping[str, Any], where: str) -> dict[str, Any] | None:
        """``type: while_loop``: its condition, bound and translated body, for the builder.

        None when it cannot be translated (each reason is a problem).
        """
        name = spec["name"]
        before = len(self.problems)
        for key in sorted(set(spec) - WHILE_LOOP_KEYS, key=str):
            self.problems.append(f"{where}: {key}: not a key of a while_loop node (allowed: "
                                 f"{', '.join(sorted(WHILE_LOOP_KEYS))})")
        bound = spec.get("max_iterations")
        if bound is None:
            self.problems.append(f"{where}: a while_loop node needs 'max_iterations' (an "
                                 f"integer from {MIN_ITERATIONS} to {MAX_ITERATIONS})")
        elif isinstance(bound, bool) or not isinstance(bound, int) \
                or not MIN_ITERATIONS <= bound <= MAX_ITERATIONS:
            self.problems.append(f"{where}: max_iterations: must be an integer from "
                                 f"{MIN_ITERATIONS} to {MAX_ITERATIONS}, got {bound!r}")
        condition = None
        if "condition" not in spec:
            self.problems.append(f"{where}: a while_loop node needs 'condition' (evaluated "
                                 f"before each iteration)")
        else:
            condition = self.expression(spec["condition"], where, "condition")
        body = spec.get("body")
        nodes: list[Any] = []
        if not isinstance(body, list) or not body:
            self.problems.append(f"{where}: body: must be a non-empty list of nodes")
        else:
            seen: set[str] = set()
            for position, step in enumerate(body):
                node = self.loop_body_node(step, position, name, where, seen)
                if node is not None:
                    nodes.append(node)
        if len(self.problems) > before or condition is None:
            return None
        return {"condition": condition, "max_iterations": bound, "body": nodes,
                "name": name}

    def loop_body_node(self, step: Any, position: int, loop: str, where: str,
                       seen: set[str]) -> dict[str, Any] | None:
        """One node of a while_loop's body, named ``loop.node``, translated like any node."""
        at = f"{where}: body[{position}]"
        if not isinstance(step, Mapping):
            self.problems.append(f"{at}: must be a mapping with 'name' and 'run'")
            return None
        if step.get("type") == "while_loop":
            self.problems.append(f"{at}: nested while_loop {step.get('name', '')!r}: a "
                                 f"while_loop's body cannot hold another while_loop")
            return None
        inner = step.get("name", f"body_{position}")
        if not isinstance(inner, str) or not inner:
            self.problems.append(f"{at}: 'name' must be a string, got {inner!r}")
            return None
        if inner in seen:
            self.problems.append(f"{at}: body node {inner!r} is defined twice")
            return None
        seen.add(inner)
        graph_only = [key for key in GRAPH_ONLY_NODE_KEYS if key in step]
        for key in graph_only:
            self.problems.append(f"{at} ({inner!r}): {key}: a while_loop's body nodes run "
                                 f"in order within the loop node; {key!r} is for nodes "
                                 f"of the graph")
        if graph_only:
            return None
        return self.node({**step, "name": f"{loop}.{inner}"})

    def interrupt(self, spec: Mapping[str, Any], name: str, where: str) -> None:
        when = spec.get("interrupt")
        if when is None:
            return
        if when == "before":
            self.interrupt_before.append(name)
        elif when == "after":
            self.interrupt_after.append(name)
        else:
            self.problems.append(f"{where}: interrupt: must be 'before' or 'after', got {when!r}")

    def dynamic_parallel(self, spec: Mapping[str, Any], where: str) -> None:
        """``type: dynamic_parallel``: the node, a map edge to its body, and its fan-in.

        The node itself runs nothing; a ``subgraph:`` or the ``steps:`` (chained)
        run once per item; the fan-in, ``fan_in:`` if named, else one made here,
        stores the results under ``output`` and the run continues from it.
        """
        name = spec["name"]
        for key in sorted(set(spec) - DYNAMIC_PARALLEL_KEYS, key=str):
            self.problems.append(f"{where}: {key}: not a key of a dynamic_parallel node "
                                 f"(allowed: {', '.join(sorted(DYNAMIC_PARALLEL_KEYS))})")
        self.interrupt(spec, name, where)
        bodies = [key for key in ("action", "steps", "subgraph") if key in spec]
        if len(bodies) != 1:
            self.problems.append(f"{where}: a dynamic_parallel node needs exactly one of "
                                 f"'action', 'steps', 'subgraph', got {bodies or 'none'}")
            return
        items = spec.get("items")
        over = self.expression(items, where, "items", value=True)
        if over is None:
            if "items" not in spec:
                self.problems.append(f"{where}: a dynamic_parallel node needs 'items'")
            return
        config = spec.get("parallel_config") or {}
        if not isinstance(config, Mapping):
            self.problems.append(f"{where}: parallel_config: must be a mapping")
            config = {}
        for key in sorted(set(config) - {"max_concurrency", "fail_fast"}, key=str):
            self.problems.append(f"{where}: parallel_config.{key}: not supported (isobranch "
                                 f"takes max_concurrency and fail_fast here; branch_timeout "
                                 f"and retry in settings.parallel)")
        fail_fast = spec.get("fail_fast", config.get("fail_fast", False))
        if not isinstance(fail_fast, bool):
            self.problems.append(f"{where}: fail_fast: must be true or false, got "
                                 f"{fail_fast!r}")
        body = self.dynamic_body(spec, where, bodies[0])
        if body is None:
            return
        fan_in = spec.get("fan_in")
        output = spec.get("output", "parallel_results")
        if not isinstance(output, str) or not output:
            self.problems.append(f"{where}: output: must be a state key, got {output!r}")
            return
        if fan_in is None:
            fan_in = f"{name}.collect"
            self.extra_nodes.append({"name": fan_in, "fan_in": True,
                               "run": f"return {{{output!r}: list(parallel_results)}}"})
        elif not isinstance(fan_in, str):
            self.problems.append(f"{where}: fan_in: must be a node name, got {fan_in!r}")
            return
        first, last = body
        edge: dict[str, Any] = {"from": name, "to": first, "type": EdgeType.MAP.value,
                                "over": over, "fan_in": fan_in,
                                "as": spec.get("item_var", "item"),
                                "index_as": spec.get("index_var", "index")}
        if fail_fast is True:
            edge[CANCEL_UNSTARTED_SPEC] = True
        concurrency = spec.get("max_concurrency", config.get("max_concurrency"))
        if concurrency is not None:
            edge["max_concurrency"] = concurrency
        self.edges.append(edge)
        self.edges.append({"from": last, "to": fan_in})
        self.continues_from[name] = fan_in

    def dynamic_body(self, spec: Mapping[str, Any], where: str,
                     kind: str) -> tuple[str, str] | None:
        """The first and last node of what runs per item, added to ``self.nodes``."""
        name = spec["name"]
        if kind == "subgraph":
            body = {"name": f"{name}.item", "subgraph": spec["subgraph"]}
            inputs = spec.get("input")
            if inputs is not None:
                mapping = self.subgraph_input(inputs, where)
                if mapping is None:
                    return None
                body["input"] = mapping
            self.extra_nodes.append(body)
            return body["name"], body["name"]
        steps = [spec["action"]] if kind == "action" else spec["steps"]
        if not isinstance(steps, list) or not steps:
            self.problems.append(f"{where}: {kind}: must be a non-empty list of steps")
            return None
        names = []
        for position, step in enumerate(steps):
            if not isinstance(step, Mapping):
                self.problems.append(f"{where}: {kind}[{position}]: must be a mapping")
                return None
            step_name = f"{name}.{step.get('name', kind if kind == 'action' else position)}"
            before = len(self.problems)
            self.extra_nodes.append(self.node({**step, "name": step_name}))
            if len(self.problems) > before:
                return None
            names.append(step_name)
        for source, target in pairwise(names):
            self.edges.append({"from": source, "to": target})
        return names[0], names[-1]

    def subgraph_input(self, inputs: Any, where: str) -> dict[str, str] | None:
        """``input: {inner: "{{ outer }}"}`` as isobranch's ``{inner: outer key}``."""
        if not isinstance(inputs, Mapping):
            self.problems.append(f"{where}: input: must be a mapping")
            return None
        mapping = {}
        for inner, value in inputs.items():
            text = value.strip() if isinstance(value, str) else ""
            body = text[2:-2].strip() if text.startswith("{{") and text.endswith("}}") else text
            key = body.removeprefix("state.")
            if not key.isidentifier():
                self.problems.append(f"{where}: input.{inner}: {value!r}: only a state key or "
                                     f"'{{{{ key }}}}' / '{{{{ state.key }}}}' can be mapped "
                                     f"into a subgraph")
                return None
            mapping[inner] = key
        return mapping

    def initial_state_node(self, initial: dict[str, Any]) -> None:
        """An entry node that adds each ``initial_state`` key the input does not have."""
        self.extra_nodes.append({
            "name": INITIAL_STATE_NODE,
            "run": f"initial = {initial!r}\n"
                   f"return {{k: v for k, v in initial.items() if k not in state}}"})
        for edge in self.edges:
            if isinstance(edge, Mapping) and edge.get("from") == START and "when" not in edge:
                self.edges.append({"from": INITIAL_STATE_NODE, "to": edge.get("to")})
                edge["to"] = INITIAL_STATE_NODE
                return

    # -- edges and navigation ----------------------------------------------------

    def edge(self, spec: Any, index: int, goto_nodes: set[Any]) -> None:
        if not isinstance(spec, Mapping):
            self.edges.append(spec)
            return
        source, target = spec.get("from"), spec.get("to")
        where = f"edges[{index}] ({source} -> {target})"
        if source in goto_nodes:
            return  # the format's rule: a node's goto wins over edges from it
        out = {key: value for key, value in spec.items()
               if key not in PEER_EDGE_KEYS and key not in UNSUPPORTED_EDGE_KEYS}
        for key, advice in UNSUPPORTED_EDGE_KEYS.items():
            if key in spec:
                self.problems.append(f"{where}: {key}: not supported: {advice}")
        if spec.get("parallel") is True:
            out["type"] = EdgeType.PARALLEL.value
        kind = spec.get("type")
        if kind == "entry":
            out["from"], source = START, START
            del out["type"]
        elif kind == "finish":
            out["to"] = END
            del out["type"]
        if source in self.continues_from:
            out["from"] = self.continues_from[source]
        if "condition" in spec:
            condition = spec["condition"]
            if isinstance(condition, Mapping):
                if condition.get("type") != "expression" or "value" not in condition:
                    self.problems.append(f"{where}: condition: must be an expression or "
                                         f"{{type: expression, value: ...}}")
                    return
                condition = condition["value"]
            wanted = spec.get("when", True)
            if not isinstance(wanted, bool):
                self.problems.append(f"{where}: with 'condition', 'when' must be true or false, "
                                     f"got {wanted!r}")
                return
            translated = self.expression(condition, where, "condition", negate=not wanted)
            if translated is None:
                return
            out["when"] = translated
        elif "when" in spec:
            when = spec["when"]
            if isinstance(when, str) and when.strip().lower() in ("true", "false"):
                when = when.strip().lower() == "true"
            if when is True:
                del out["when"]
            elif when is False:
                return  # never taken
            elif not isinstance(when, Mapping):  # {lua: ...} / {python: ...} stay as they are
                translated = self.expression(when, where, "when")
                if translated is None:
                    return
                out["when"] = translated
        self.edges.append(out)

    def navigation(self, specs: list[Mapping[str, Any]], names: list[Any],
                   raw_edges: list[Any]) -> None:
        """``goto`` edges, then the format's chaining of nodes with no outgoing edge."""
        with_edges = {edge.get("from") for edge in raw_edges if isinstance(edge, Mapping)}
        has_start = START in with_edges or any(
            isinstance(edge, Mapping) and edge.get("type") == "entry" for edge in raw_edges)
        if not has_start and names and isinstance(names[0], str):
            self.edges.append({"from": START, "to": names[0]})
        known = {name for name in names if isinstance(name, str)}
        for position, spec in enumerate(specs):
            name = spec.get("name")
            if not isinstance(name, str):
                continue
            source = self.continues_from.get(name, name)
            where = f"node {name!r}"
            if "goto" in spec:
                self.goto(spec["goto"], source, where, known)
            elif name not in with_edges and position + 1 < len(specs):
                following = specs[position + 1].get("name")
                # A dynamic_parallel node whose fan-in is the next node: that one chains on.
                if isinstance(following, str) and following != source:
                    self.edges.append({"from": source, "to": following})

    def goto(self, goto: Any, source: str, where: str, known: set[str]) -> None:
        if isinstance(goto, str):
            rules: list[Any] = [{"to": goto}]
        elif isinstance(goto, list):
            rules = goto
        else:
            self.problems.append(f"{where}: goto: must be a node name or a list of "
                                 f"{{if: expression, to: node}}, got {goto!r}")
            return
        fallback = False
        for position, rule in enumerate(rules):
            at = f"{where}: goto[{position}]" if isinstance(goto, list) else f"{where}: goto"
            if not isinstance(rule, Mapping) or "to" not in rule:
                self.problems.append(f"{at}: a rule needs 'to' (and may have 'if')")
                continue
            for key in sorted(set(rule) - {"if", "to"}, key=str):
                self.problems.append(f"{at}: unknown key {key!r} (allowed: if, to)")
            target = rule["to"]
            if target != END and target not in known:
                self.problems.append(f"{at}: goto to unknown node {target!r} (nodes: "
                                     f"{', '.join(sorted(known))})")
                continue
            if "if" not in rule:
                if fallback:
                    self.problems.append(f"{at}: a second rule without 'if'; only one can be "
                                         f"the fallback")
                fallback = True
                self.edges.append({"from": source, "to": target})
                continue
            condition = self.expression(rule["if"], at, "if")
            if condition is not None:
                self.edges.append({"from": source, "to": target, "when": condition})

    # -- expressions -------------------------------------------------------------

    def expression(self, text: Any, where: str, role: str, *, negate: bool = False,
                   value: bool = False) -> Any:
        """``text`` as isobranch takes it in ``when:`` / ``over:``: a Python string or a Condition.

        Jinja2 (``{{ }}``) becomes a ``JinjaCondition``; the format's
        shorthands (``!flag``, a bare ``flag``) Python over ``state``; any
        other text stays Python if it parses as Python, else is read as
        Jinja2 without braces. None when it is none of these (a problem).
        """
        if isinstance(text, bool) and not value:
            text = "True" if text else "False"
        if not isinstance(text, str) or not text.strip():
            self.problems.append(f"{where}: '{role}' must be a non-empty expression, got {text!r}")
            return None
        stripped = text.strip()
        if is_jinja(stripped):
            if negate:
                inner = stripped[2:-2] if stripped.startswith("{{") and stripped.endswith("}}") \
                    else None
                if inner is None:
                    self.problems.append(f"{where}: '{role}' with when: false must be one "
                                         f"{{{{ expression }}}}")
                    return None
                stripped = "{{ not (" + inner + ") }}"
            return self.jinja(stripped, where, role, bare=False)
        if not value and stripped.startswith("!") and stripped[1:].strip().isidentifier():
            stripped = f"not state.get({stripped[1:].strip()!r}, False)"
        elif not value and stripped.isidentifier() and stripped not in ("True", "False"):
            stripped = f"state.get({stripped!r}, False)"
        if negate:
            stripped = f"not ({stripped})"
        try:
            tree = ast.parse(stripped, mode="eval")
        except SyntaxError:
            return self.jinja(stripped, where, role, bare=True)
        self.check_python_keys(tree, stripped, where, role)
        if value:
            return {"python": stripped}
        return stripped

    def jinja(self, text: str, where: str, role: str, *, bare: bool) -> Condition | None:
        from jinja2 import TemplateSyntaxError
        try:
            condition = JinjaCondition(text, where=where, bare=bare)
        except TemplateSyntaxError as exc:
            what = "neither Python nor Jinja2" if bare else "invalid Jinja2"
            self.problems.append(f"{where}: '{role}' {text!r} is {what}: {exc.message} "
                                 f"(line {exc.lineno})")
            return None
        references = condition.references()
        for name in sorted(references.unknown_names):
            advice = UNAVAILABLE_NAMES.get(name, "expressions see only 'state' and 'variables'")
            self.problems.append(f"{where}: '{role}' {text!r} reads {name!r}: {advice}")
        self.check_known(references.state_keys, text, where, role)
        return condition

    def check_python_keys(self, tree: ast.Expression, text: str, where: str, role: str) -> None:
        keys = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_state(node.value) \
                    and node.attr not in _MAPPING_METHODS:
                keys.add(node.attr)
            elif isinstance(node, ast.Subscript) and _is_state(node.value) \
                    and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                keys.add(node.slice.value)
        self.check_known(keys, text, where, role)

    def check_known(self, keys: set[str] | frozenset[str], text: str, where: str,
                    role: str) -> None:
        if self.known_keys is None:
            return
        for key in sorted(keys - self.known_keys):
            self.problems.append(f"{where}: '{role}' {text!r} reads state key {key!r}, which "
                                 f"state_schema does not declare (declared: "
                                 f"{', '.join(sorted(self.known_keys))})")


# Attributes of the state view that are methods, not keys (when no key has the name).
_MAPPING_METHODS = frozenset({"get", "keys", "items", "values", "copy"})


def _is_state(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "state"

