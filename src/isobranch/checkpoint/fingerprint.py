"""A compiled graph's fingerprint, and what changed between two of them.

The fingerprint maps each part of the graph — every node (kind and code),
every edge (normal, conditional, router, parallel, map with its
``over``/``as``/``index_as``), the entry point — to a digest of what it is.
Python callables are identified by module, qualified name and source text
(their bytecode when the source is not available), which are the same in
every process, unlike ``id()`` or ``hash()``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Mapping
from typing import Any, Protocol

from ..conditions import CallableCondition, Condition, Expression
from ..fanout import FanOut, MapFanOut
from ..nodes import CallableNode, LuaNode, Node, PythonNode
from ..subgraph import SubgraphNode


class GraphParts(Protocol):
    """What a fingerprint reads of a compiled graph (described here: compiled.py imports this)."""

    entry: str
    nodes: Mapping[str, Any]

    @property
    def fan_outs(self) -> Mapping[str, FanOut]:
        """Every fan-out by source node."""
        ...

    def routes_of(self, node: str) -> Any:
        """The outgoing routes of ``node`` (router, conditional edges, default edge)."""
        ...


def graph_fingerprint(graph: GraphParts, prefix: str = "") -> dict[str, str]:
    """``{part: digest}`` for every node and edge of ``graph`` (parts read like ``node 'x'``).

    A subgraph node's inner graph is part of it, its parts named by path
    (``node 'review/score'``, ``edge review/a->review/b``); ``prefix`` is
    that path for an inner graph. ``CompiledGraph.fingerprint()`` computes
    it once per graph (which never changes once compiled).
    """
    parts: dict[str, str] = {f"entry point of {prefix[:-1]!r}" if prefix else "entry point":
                             graph.entry}
    def inner(target: str) -> str:  # END is the same everywhere
        return prefix + target if target in graph.nodes else target

    for name, node in graph.nodes.items():
        path = prefix + name
        parts[f"node {path!r}"] = _digest(_node_identity(node))
        if isinstance(node, SubgraphNode):
            parts.update(graph_fingerprint(node.graph, f"{path}/"))
        routes = graph.routes_of(name)
        if routes.router is not None:
            mapping = None if routes.mapping is None else sorted(
                (repr(value), target) for value, target in routes.mapping.items())
            parts[f"router of {path!r}"] = _digest([_callable_identity(routes.router), mapping])
        for order, (condition, target) in enumerate(routes.conditional):
            key = f"edge {path}->{inner(target)}"
            if key in parts:  # a second condition to the same target
                key = f"{key} (condition {order + 1})"
            parts[key] = _digest(["when", order, _expression(condition)])
        if routes.default is not None:
            key = f"edge {path}->{inner(routes.default)}"
            parts[key if key not in parts else f"{key} (default)"] = _digest("default")
    for source, fan_out in graph.fan_outs.items():
        if isinstance(fan_out, MapFanOut):
            parts[f"map edge {prefix}{source}->{prefix}{fan_out.target}"] = _digest(
                [_expression(fan_out.over), fan_out.item_key, fan_out.index_key, fan_out.fan_in])
        else:
            for target in fan_out.targets:
                parts[f"parallel edge {prefix}{source}->{prefix}{target}"] = _digest(
                    fan_out.fan_in)
    return parts


def node_fingerprint(node: Any) -> str:
    """A digest of one node's code, the same in every process; a subgraph node's
    covers its whole inner graph (the node cache keys entries by it)."""
    identity: list[Any] = _node_identity(node)
    if isinstance(node, SubgraphNode):
        identity = [identity, graph_fingerprint(node.graph)]
    return _digest(identity)


def fingerprint_text(parts: dict[str, str]) -> str:
    """The fingerprint as stored."""
    return json.dumps(parts, sort_keys=True)


def describe_changes(stored: str, current: dict[str, str]) -> list[str]:
    """What differs from the stored fingerprint: ``["node 'score' changed", "edge a->b added"]``."""
    try:
        old = json.loads(stored)
        if not isinstance(old, dict):
            raise ValueError
    except ValueError:
        return ["the recorded fingerprint is unreadable"]
    changes = []
    for part in sorted(set(old) | set(current)):
        if part not in current:
            changes.append(f"{part} removed")
        elif part not in old:
            changes.append(f"{part} added")
        elif old[part] != current[part]:
            changes.append(f"{part} changed" if part != "entry point"
                           else f"entry point changed from {old[part]!r} to {current[part]!r}")
    return changes


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _node_identity(node: Any) -> list[Any]:
    if isinstance(node, LuaNode):
        return ["lua", node.source]
    if isinstance(node, PythonNode):
        return ["python", node.source]
    if isinstance(node, CallableNode):
        return ["callable", _callable_identity(node.fn)]
    if isinstance(node, SubgraphNode):  # its inner graph has parts of its own
        return ["subgraph", node.input, node.output]
    parts = node.identity_parts() if isinstance(node, Node) else None
    if parts is not None:  # a node whose code is in its parts (a loop's body, a template)
        return [_node_identity(part) if isinstance(part, Node)
                else _expression(part) if isinstance(part, Condition) else part
                for part in parts]
    return ["node", type(node).__module__, type(node).__qualname__,
            _callable_identity(type(node).run)]


def _expression(expression: Any) -> list[Any]:
    if isinstance(expression, str):
        return ["key", expression]
    if isinstance(expression, CallableCondition):
        return ["callable", _callable_identity(expression.fn)]
    if isinstance(expression, Expression):
        return [type(expression).__name__, expression.describe()]
    return ["callable", _callable_identity(expression)]


def _callable_identity(fn: Any) -> list[Any]:
    """Module, qualified name and code of ``fn``: the same in every process that loads it."""
    target = getattr(fn, "__func__", fn)
    if not inspect.isfunction(target) and not inspect.ismethod(target) and callable(target):
        inner = getattr(target, "func", None)  # functools.partial
        if inner is not None:
            return ["partial", _callable_identity(inner), repr(getattr(target, "args", ())),
                    sorted(repr(item) for item in getattr(target, "keywords", {}).items())]
        target = type(target).__call__
    identity = [getattr(target, "__module__", None), getattr(target, "__qualname__", None)]
    try:
        identity.append(inspect.getsource(target))
    except (OSError, TypeError):
        code = getattr(target, "__code__", None)
        if code is not None:
            identity.append(code.co_code.hex())
            identity.append(repr([c for c in code.co_consts if not inspect.iscode(c)]))
            identity.append(list(code.co_names))
    return identity
