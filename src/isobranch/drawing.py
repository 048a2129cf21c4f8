"""Pictures of a compiled graph as text: Mermaid flowcharts and Graphviz DOT.

Both formats are drawn from one description of the graph (``describe``):
what is drawn is what runs — the entry, every route in the order it is
tried, fan-outs, the implied edge to ``END`` of a node without edges —
whatever the YAML spelt out. Each node gets an identifier of ASCII
letters, digits and ``_`` (unique even when names differ only in
punctuation) and shows its name as a quoted, escaped label, so any name
draws safely.

A node's kind (``NodeKind``) alone decides how the renderers draw it.
A subgraph node (``NodeKind.SUBGRAPH``) carries the ``Drawing`` of its
inner graph, which the renderers draw as a cluster (a Mermaid
``subgraph``, a DOT ``subgraph cluster_*``) labelled with the node's name,
with its own ``__start__`` and ``__end__``: the edges into the node go to
the inner ``__start__``, the edges out of it leave from the inner
``__end__``. Inner identifiers are prefixed by the node's.

The module is pure: it reads a graph and returns text. Rendering DOT to
SVG or PNG is ``pictures.py``'s job.
"""

from __future__ import annotations

import enum
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .fanout import MapFanOut, StaticFanOut
from .routes import END, START
from .subgraph import SubgraphNode


class NodeKind(enum.Enum):
    """What a drawn node stands for; it decides the node's shape."""

    START = "start"
    END = "end"
    STEP = "step"
    FAN_IN = "fan_in"
    # Where a router without a mapping goes: any node it names at run time.
    ROUTER_CHOICE = "router_choice"
    # A node that runs a graph of its own, drawn as a cluster of that graph.
    SUBGRAPH = "subgraph"


class EdgeKind(enum.Enum):
    """What a drawn edge stands for; it decides the edge's line."""

    PLAIN = "plain"
    CONDITIONAL = "conditional"
    PARALLEL = "parallel"
    MAP = "map"


@dataclass(frozen=True)
class DrawnNode:
    """A node of a drawing: its identifier in the output, its label, its kind.

    A ``SUBGRAPH`` node has the drawing of its inner graph, ``inner``.
    """

    id: str
    label: str
    kind: NodeKind
    inner: Drawing | None = None


@dataclass(frozen=True)
class DrawnEdge:
    """An edge of a drawing between two node identifiers, with its label (maybe empty)."""

    source: str
    target: str
    kind: EdgeKind
    label: str = ""


@dataclass(frozen=True)
class Drawing:
    """A graph as drawn: nodes in drawing order, edges in the order they are tried."""

    title: str | None
    nodes: tuple[DrawnNode, ...]
    edges: tuple[DrawnEdge, ...]


class DrawableRoutes(Protocol):
    """The outgoing routes of a node, as ``compiled.Routes`` holds them."""

    router: Any
    mapping: dict[Any, str] | None
    conditional: list[tuple[Any, str]]
    default: str | None


class DrawableGraph(Protocol):
    """What drawing needs of a compiled graph (``compiled.CompiledGraph`` has it)."""

    name: str | None
    entry: str
    nodes: Mapping[str, Any]

    def routes_of(self, node: str) -> DrawableRoutes: ...

    def fan_out_of(self, node: str) -> StaticFanOut | MapFanOut | None: ...


def draw_mermaid(graph: DrawableGraph) -> str:
    """``graph`` as a Mermaid flowchart (top to bottom), without a trailing newline."""
    return mermaid_text(describe(graph))


def draw_dot(graph: DrawableGraph) -> str:
    """``graph`` as a Graphviz DOT digraph, without a trailing newline."""
    return dot_text(describe(graph))


def describe(graph: DrawableGraph) -> Drawing:
    """The nodes and edges to draw for ``graph`` (a subgraph node's graph inside it)."""
    return _describe(graph, _Identifiers(), ())


def _describe(graph: DrawableGraph, identifiers: _Identifiers, scope: tuple[str, ...]) -> Drawing:
    """``graph`` drawn as the graph of the subgraph nodes ``scope`` (empty: the outermost)."""
    fan_ins = {fan_out.fan_in for name in graph.nodes
               if (fan_out := graph.fan_out_of(name)) is not None}
    ids = _Scope(identifiers, scope, graph)
    nodes = [DrawnNode(ids.of(START), START, NodeKind.START)]
    for name, node in graph.nodes.items():
        if isinstance(node, SubgraphNode):
            inner = _describe(node.graph, identifiers, (*scope, name))
            nodes.append(DrawnNode(ids.cluster(name), name, NodeKind.SUBGRAPH, inner))
        else:
            nodes.append(DrawnNode(ids.of(name), name,
                                   NodeKind.FAN_IN if name in fan_ins else NodeKind.STEP))
    nodes.append(DrawnNode(ids.of(END), END, NodeKind.END))
    edges = [DrawnEdge(ids.of(START), ids.into(graph.entry), EdgeKind.PLAIN)]
    for name in graph.nodes:
        routes = graph.routes_of(name)
        if routes.router is not None and routes.mapping is None:
            nodes.append(DrawnNode(ids.of_choice(name), "any node", NodeKind.ROUTER_CHOICE))
        edges.extend(_edges_from(graph, name, ids))
    used = {edge.source for edge in edges} | {edge.target for edge in edges}
    # END is drawn only when something reaches it, or inside a cluster, whose
    # END the edges out of the subgraph node leave from; every other node always is.
    drawn = tuple(node for node in nodes
                  if node.kind is not NodeKind.END or node.id in used or scope)
    return Drawing(graph.name, drawn, tuple(edges))


def _edges_from(graph: DrawableGraph, name: str, ids: _Scope) -> list[DrawnEdge]:
    """The edges out of ``name``: its fan-out, then its routes in the order they are tried."""
    source = ids.out_of(name)
    edges = []
    fan_out = graph.fan_out_of(name)
    if isinstance(fan_out, MapFanOut):
        over = fan_out.over if isinstance(fan_out.over, str) else fan_out.describe_over()
        label = f"map over {over} as {fan_out.item_key}, fan-in {fan_out.fan_in}"
        edges.append(DrawnEdge(source, ids.into(fan_out.target), EdgeKind.MAP, label))
    elif fan_out is not None:
        edges.extend(DrawnEdge(source, ids.into(target), EdgeKind.PARALLEL,
                               f"parallel, fan-in {fan_out.fan_in}")
                     for target in fan_out.targets)
    routes = graph.routes_of(name)
    if routes.router is not None and routes.mapping is None:
        edges.append(DrawnEdge(source, ids.of_choice(name), EdgeKind.CONDITIONAL,
                               f"router {_callable_name(routes.router)}"))
    edges.extend(DrawnEdge(source, ids.into(target), EdgeKind.CONDITIONAL, repr(value))
                 for value, target in (routes.mapping or {}).items())
    edges.extend(DrawnEdge(source, ids.into(target), EdgeKind.CONDITIONAL,
                           condition.describe())
                 for condition, target in routes.conditional)
    if routes.default is not None:
        edges.append(DrawnEdge(source, ids.into(routes.default), EdgeKind.PLAIN))
    elif fan_out is None and routes.router is None and not routes.conditional:
        # The runner ends a path at a node with nowhere to go: draw that END.
        edges.append(DrawnEdge(source, ids.of(END), EdgeKind.PLAIN))
    return edges


def _callable_name(fn: Any) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


class _Drawn(enum.Enum):
    """What an identifier is for; the value is what its text adds to the path."""

    NODE = ""
    CHOICE = "__choice"  # a router's run-time choice
    CLUSTER = "__cluster"  # the cluster of a subgraph node


class _Scope:
    """The identifiers of one graph's nodes in a drawing, that graph being the one of the
    subgraph nodes ``scope`` (empty for the outermost graph)."""

    def __init__(self, identifiers: _Identifiers, scope: tuple[str, ...],
                 graph: DrawableGraph) -> None:
        self._identifiers = identifiers
        self._scope = scope
        self._subgraphs = {name for name, node in graph.nodes.items()
                           if isinstance(node, SubgraphNode)}

    def of(self, name: str) -> str:
        """The identifier of the node ``name`` (or START, END) of this graph."""
        return self._identifiers.claim((_Drawn.NODE, (*self._scope, name)))

    def of_choice(self, router_node: str) -> str:
        """The identifier of the run-time choice of ``router_node``'s router."""
        return self._identifiers.claim((_Drawn.CHOICE, (*self._scope, router_node)))

    def cluster(self, name: str) -> str:
        """The identifier of the cluster that draws the subgraph node ``name``."""
        return self._identifiers.claim((_Drawn.CLUSTER, (*self._scope, name)))

    def into(self, name: str) -> str:
        """Where an edge to ``name`` ends: the node, or a subgraph node's inner START."""
        if name in self._subgraphs:
            return self._identifiers.claim((_Drawn.NODE, (*self._scope, name, START)))
        return self.of(name)

    def out_of(self, name: str) -> str:
        """Where an edge from ``name`` starts: the node, or a subgraph node's inner END."""
        if name in self._subgraphs:
            return self._identifiers.claim((_Drawn.NODE, (*self._scope, name, END)))
        return self.of(name)


class _Identifiers:
    """A unique output identifier per drawn thing of a drawing: ``n_`` and its path's ASCII
    letters, digits and ``_`` (anything else becomes ``_``; levels joined by ``__``), then
    ``_2``, ``_3`` ... on a clash."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[_Drawn, tuple[str, ...]], str] = {}
        self._taken: set[str] = set()

    def claim(self, key: tuple[_Drawn, tuple[str, ...]]) -> str:
        """The identifier of ``key``: ``(what is drawn, path of names)``."""
        if key in self._by_key:
            return self._by_key[key]
        drawn, path = key
        text = "__".join(path) + drawn.value
        base = "n_" + "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_"
                              for c in text)
        candidate, number = base, 1
        while candidate in self._taken:
            number += 1
            candidate = f"{base}_{number}"
        self._taken.add(candidate)
        self._by_key[key] = candidate
        return candidate


# -- Mermaid -------------------------------------------------------------------

# Node text in brackets by kind; a fan-in is a "subroutine" box (double sides).
_MERMAID_SHAPES = {
    NodeKind.START: ('["', '"]'),
    NodeKind.END: ('["', '"]'),
    NodeKind.STEP: ('["', '"]'),
    NodeKind.FAN_IN: ('[["', '"]]'),
    NodeKind.ROUTER_CHOICE: ('{{"', '"}}'),
    NodeKind.SUBGRAPH: ('["', '"]'),  # never on an edge: edges reach its inner START and END
}
# Mermaid's entity codes. '#' first, so the codes added after it stay codes;
# '<' '>' because labels are HTML (and '-->' in a label must not read as an
# arrow); '`' because a quoted label that starts with one is Markdown.
_MERMAID_ENTITIES = (("#", "#35;"), ('"', "#quot;"), ("|", "#124;"), ("<", "#60;"),
                     (">", "#62;"), ("`", "#96;"))


def mermaid_text(drawing: Drawing) -> str:
    """A drawing as a Mermaid flowchart: one line per edge, each end with its shape.

    Every node of a ``describe`` drawing has an edge, so every node is drawn.
    A subgraph node is a ``subgraph`` block holding its inner graph's
    edges, written before the edges that lead into it, so Mermaid places
    each inner node in its block.
    """
    nodes = _all_nodes(drawing)
    return "\n".join(["flowchart TD", *_mermaid_lines(drawing, nodes, "    ")])


def _mermaid_lines(drawing: Drawing, nodes: Mapping[str, DrawnNode], indent: str) -> list[str]:
    lines = []
    for node in drawing.nodes:
        if node.inner is not None:
            lines.append(f'{indent}subgraph {node.id} ["{mermaid_escape(node.label)}"]')
            lines.extend(_mermaid_lines(node.inner, nodes, indent + "    "))
            lines.append(f"{indent}end")
    lines.extend(f"{indent}{_mermaid_node(nodes[edge.source])}{_mermaid_arrow(edge)}"
                 f"{_mermaid_node(nodes[edge.target])}" for edge in drawing.edges)
    return lines


def _all_nodes(drawing: Drawing) -> dict[str, DrawnNode]:
    """Every node of ``drawing`` and of its clusters, by identifier."""
    nodes = {}
    for node in drawing.nodes:
        nodes[node.id] = node
        if node.inner is not None:
            nodes.update(_all_nodes(node.inner))
    return nodes


def _mermaid_node(node: DrawnNode) -> str:
    opening, closing = _MERMAID_SHAPES[node.kind]
    return f"{node.id}{opening}{mermaid_escape(node.label)}{closing}"


def _mermaid_arrow(edge: DrawnEdge) -> str:
    label = mermaid_escape(edge.label)
    if edge.kind is EdgeKind.MAP:
        return f' -. "{label}" .-> '
    # Quoted: an unquoted |label| ends at the first bracket, as in state['total'].
    return f' -->|"{label}"| ' if label else " --> "


def mermaid_escape(text: str) -> str:
    """``text`` safe inside a quoted Mermaid label or a ``|...|`` edge label.

    Line breaks become ``<br>``; other control characters become spaces.
    """
    for character, code in _MERMAID_ENTITIES:
        text = text.replace(character, code)
    return "<br>".join(_printable(line) for line in _lines(text))


# -- DOT -----------------------------------------------------------------------

# Node attributes by kind: a fan-in has a double border, a router's run-time
# choice is a plain note.
_DOT_SHAPES = {
    NodeKind.START: 'shape=oval, style=""',
    NodeKind.END: 'shape=oval, style=""',
    NodeKind.STEP: "",
    NodeKind.FAN_IN: 'style="", peripheries=2',
    NodeKind.ROUTER_CHOICE: 'shape=note, style=""',
    NodeKind.SUBGRAPH: "",  # a cluster, not a node
}
_DOT_EDGE_STYLES = {
    EdgeKind.PLAIN: "",
    EdgeKind.CONDITIONAL: "",
    EdgeKind.PARALLEL: "",
    EdgeKind.MAP: "style=dotted",
}


def dot_text(drawing: Drawing) -> str:
    """A drawing as a Graphviz ``digraph``: nodes first, then edges."""
    title = dot_quote(drawing.title) if drawing.title else "isobranch"
    lines = [f"digraph {title} {{",
             "    nodesep=0.6;",  # room between side-by-side edge labels
             '    node [shape=box, style=rounded, fontname="Helvetica"];',
             '    edge [fontname="Helvetica", fontsize=10];']
    lines.extend(_dot_lines(drawing, "    "))
    lines.append("}")
    return "\n".join(lines)


def _dot_lines(drawing: Drawing, indent: str) -> list[str]:
    """A drawing's nodes (a subgraph node as a ``subgraph cluster_*`` block), then its edges."""
    lines = []
    for node in drawing.nodes:
        if node.inner is not None:
            lines.append(f"{indent}subgraph cluster_{node.id} {{")
            lines.append(f"{indent}    label={dot_quote(node.label)};")
            lines.extend(_dot_lines(node.inner, indent + "    "))
            lines.append(f"{indent}}}")
            continue
        attributes = _dot_attributes("label=" + dot_quote(node.label), _DOT_SHAPES[node.kind])
        lines.append(f"{indent}{node.id} [{attributes}];")
    for edge in drawing.edges:
        label = "label=" + dot_quote(edge.label) if edge.label else ""
        attributes = _dot_attributes(label, _DOT_EDGE_STYLES[edge.kind])
        lines.append(f"{indent}{edge.source} -> {edge.target} [{attributes}];" if attributes
                     else f"{indent}{edge.source} -> {edge.target};")
    return lines


def _dot_attributes(*parts: str) -> str:
    return ", ".join(part for part in parts if part)


def dot_quote(text: str) -> str:
    """``text`` as a DOT quoted string whose label shows exactly ``text``.

    Backslashes are doubled (Graphviz reads ``\\N``, ``\\G``, ``\\l`` ... in
    labels), quotes escaped, line breaks written ``\\n``; other control
    characters become spaces.
    """
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "\\n".join(_printable(line) for line in _lines(text)) + '"'


def _lines(text: str) -> Iterable[str]:
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _printable(line: str) -> str:
    return "".join(" " if unicodedata.category(c) == "Cc" else c for c in line)
