"""Subgraph nodes: a compiled graph used as one node of another graph.

A ``SubgraphNode`` is data: the inner compiled graph and how state crosses
its boundary (``input``: inner key <- outer key; ``output``: outer key <-
inner key). Running it is the step loop's job (runner.py), which runs the
inner graph from its START to its END inside the outer execution context,
with the inner graph swapped in (``ExecutionContext.enter_subgraph``), so the
inner nodes are named by their
paths (``review/score``) and a checkpointed run records their steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .nodes import Node
from .statecopy import private_copy

# Separates the levels of a node's path: ``review/score`` is node ``score`` of subgraph node ``review``.
PATH_SEPARATOR = "/"


class SubgraphNode(Node):
    """A node that runs the compiled graph ``graph`` as one step.

    Without ``input`` the inner run starts from a private copy of the whole
    outer state; with it, from the mapped keys only, renamed (an outer key
    the state lacks is left out). The node's update is the inner final
    state; with ``output``, only the mapped keys, renamed, so unmapped
    inner keys never reach the outer state.
    """

    # Its inner nodes have languages of their own; nothing it returns comes from Lua.
    language = "subgraph"

    def __init__(self, name: str, graph: Any, *, input: Mapping[str, str] | None = None,
                 output: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.graph = graph
        self.input = dict(input) if input is not None else None
        self.output = dict(output) if output is not None else None

    def inner_state(self, state: dict) -> dict:
        """A private copy of what the inner run starts from (``StateCopyError`` if it cannot be)."""
        if self.input is None:
            return private_copy(state)
        return private_copy({inner: state[outer] for inner, outer in self.input.items()
                             if outer in state})

    def update(self, inner_state: dict) -> dict:
        """What the inner final state ``inner_state`` writes to the outer state."""
        if self.output is None:
            return inner_state
        return {outer: inner_state[inner] for outer, inner in self.output.items()
                if inner in inner_state}

    def run(self, state: dict, context: Any, parallel_results: Any = None) -> Any:
        """Not called: the step loop runs a subgraph node's inner graph itself."""
        raise NotImplementedError("a subgraph node is run by the step loop (runner.py)")


def mapping_problems(name: str, input: Any, output: Any, inner_keys: Any) -> list[str]:
    """Every problem of a subgraph node's ``input``/``output`` mappings, naming the node.

    ``inner_keys`` are the keys the inner graph's state_schema declares
    (empty when it has none: then any inner key may exist).
    """
    problems = []
    for role, mapping, arrow in (("input", input, "inner key <- outer key"),
                                 ("output", output, "outer key <- inner key")):
        if mapping is None:
            continue
        if not isinstance(mapping, Mapping):
            problems.append(f"node {name!r}: {role} must be a mapping {{{arrow}}}, "
                            f"got {type(mapping).__name__}")
            continue
        for key, value in mapping.items():
            if not isinstance(key, str) or not key or not isinstance(value, str) or not value:
                problems.append(f"node {name!r}: {role} {key!r}: {value!r}: both keys must be "
                                f"non-empty strings ({arrow})")
                continue
            inner = key if role == "input" else value
            if inner_keys and inner not in inner_keys:
                problems.append(f"node {name!r}: {role} maps inner key {inner!r}, which the "
                                f"inner graph's state_schema does not declare (it declares "
                                f"{', '.join(map(repr, inner_keys))})")
    return problems


def join_path(prefix: str | None, name: str) -> str:
    """``name`` under ``prefix``: ``review/score``; just ``name`` without one."""
    return f"{prefix}{PATH_SEPARATOR}{name}" if prefix else name


def node_paths(graph: Any, prefix: str = "") -> list[str]:
    """The path of every node of ``graph`` and of its subgraphs: ``review``, ``review/score``."""
    paths = []
    for name, node in graph.nodes.items():
        paths.append(prefix + name)
        if isinstance(node, SubgraphNode):
            paths.extend(node_paths(node.graph, f"{prefix}{name}{PATH_SEPARATOR}"))
    return paths
