"""Coverage of agent graphs by a regression suite: which nodes, edges and fan-outs ran.

An agent's *shape* (``GraphShape``) lists what can run: its nodes, its
edges — every outcome of a conditional edge apart (each target of a
router's mapping, each ``when:`` target) — its fan-outs and its subgraph
nodes. Each case's run (``running.RunRecord``: the main path's nodes and,
per fan-out, what each branch ran) says what did (``exercised``). A
``CoverageLedger`` adds runs up per agent, travels between pytest
processes as plain data (``to_plain``/``merge_plain``: xdist workers send
theirs to the controller), and becomes the report: ``coverage_report`` (the
JSON document, schema in docs/regression-testing.md) and ``coverage_lines``
(the table). Everything is sorted by name or kept in graph order, so the
same cases give the same report however they were spread over workers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..drawing import EdgeKind
from ..fanout import MapFanOut
from ..routes import END, START
from ..subgraph import PATH_SEPARATOR, SubgraphNode
from .running import RunRecord

# The JSON document's version: bumped when a field changes meaning or goes.
COVERAGE_SCHEMA_VERSION = 1
# The target of a router that returns node names itself (no mapping): any node.
ANY_NODE = "*"


@dataclass(frozen=True)
class ShapeEdge:
    """One edge of an agent: ``source -> target``, its kind (as drawings have it, stored
    as its value in the JSON document) and the condition it stands for."""

    source: str
    target: str
    kind: EdgeKind
    label: str = ""

    def describe(self) -> str:
        """``a -> b``, with the condition or router value that leads there."""
        target = "any node (router)" if self.target == ANY_NODE else self.target
        text = f"{self.source} -> {target}"
        if self.kind is EdgeKind.PARALLEL:
            return f"{text} (parallel)"
        if self.kind is EdgeKind.MAP:
            return f"{text} (map)"
        return f"{text} ({self.label})" if self.label else text


@dataclass(frozen=True)
class GraphShape:
    """What can run in an agent: nodes in graph order, edges in the order they are tried,
    fan-outs by source node (with their fan-in node), subgraph nodes."""

    nodes: tuple[str, ...]
    edges: tuple[ShapeEdge, ...]
    fan_outs: tuple[tuple[str, str], ...]
    subgraphs: tuple[str, ...] = ()

    def to_plain(self) -> dict[str, Any]:
        """Plain lists and strings (what crosses from an xdist worker)."""
        return {"nodes": list(self.nodes),
                "edges": [[e.source, e.target, e.kind.value, e.label] for e in self.edges],
                "fan_outs": [list(pair) for pair in self.fan_outs],
                "subgraphs": list(self.subgraphs)}

    @classmethod
    def from_plain(cls, plain: Mapping[str, Any]) -> GraphShape:
        """The shape ``to_plain`` described."""
        return cls(tuple(plain["nodes"]),
                   tuple(ShapeEdge(s, t, EdgeKind(k), label) for s, t, k, label in plain["edges"]),
                   tuple((s, f) for s, f in plain["fan_outs"]), tuple(plain["subgraphs"]))


class ShapeRoutes(Protocol):
    """The outgoing routes of a node, as ``compiled.Routes`` holds them."""

    router: Any
    mapping: dict[Any, str] | None
    conditional: list[tuple[Any, str]]
    default: str | None


class ShapedGraph(Protocol):
    """What a shape is read from (``compiled.CompiledGraph`` has it)."""

    entry: str
    nodes: Mapping[str, Any]

    def routes_of(self, node: str) -> ShapeRoutes: ...

    def fan_out_of(self, node: str) -> Any: ...


def graph_shape(graph: ShapedGraph) -> GraphShape:
    """The nodes, edges, fan-outs and subgraph nodes of ``graph``."""
    edges: list[ShapeEdge] = [ShapeEdge(START, graph.entry, EdgeKind.PLAIN)]
    fan_outs: list[tuple[str, str]] = []
    for name in graph.nodes:
        fan_out = graph.fan_out_of(name)
        if fan_out is not None:
            fan_outs.append((name, fan_out.fan_in))
            if isinstance(fan_out, MapFanOut):
                edges.append(ShapeEdge(name, fan_out.target, EdgeKind.MAP))
            else:
                edges.extend(ShapeEdge(name, target, EdgeKind.PARALLEL) for target in fan_out.targets)
        edges.extend(_route_edges(name, graph.routes_of(name), fan_out is not None))
    unique: dict[tuple[str, str], ShapeEdge] = {}
    for edge in edges:
        # Two conditions leading to the same node are one outcome: a run
        # shows where it went, not which condition sent it there.
        unique.setdefault((edge.source, edge.target), edge)
    return GraphShape(tuple(graph.nodes), tuple(unique.values()), tuple(fan_outs),
                      _subgraph_nodes(graph))


def _route_edges(name: str, routes: ShapeRoutes, fans_out: bool) -> list[ShapeEdge]:
    if routes.router is not None and routes.mapping is None:
        edges = [ShapeEdge(name, ANY_NODE, EdgeKind.CONDITIONAL,
                           f"router {getattr(routes.router, '__name__', 'router')}")]
    else:
        edges = [ShapeEdge(name, target, EdgeKind.CONDITIONAL, f"router returns {value!r}")
                 for value, target in (routes.mapping or {}).items()]
    edges += [ShapeEdge(name, target, EdgeKind.CONDITIONAL, f"when {condition.describe()}")
              for condition, target in routes.conditional]
    if routes.default is not None:
        edges.append(ShapeEdge(name, routes.default, EdgeKind.PLAIN))
    elif not fans_out and routes.router is None and not routes.conditional:
        edges.append(ShapeEdge(name, END, EdgeKind.PLAIN))  # the runner's implied end
    return edges


def _subgraph_nodes(graph: ShapedGraph) -> tuple[str, ...]:
    return tuple(name for name, node in graph.nodes.items() if isinstance(node, SubgraphNode))


@dataclass
class Exercised:
    """What one run exercised: nodes entered, edges taken (by ``(source, target)``), fan-outs run."""

    nodes: set[str] = field(default_factory=set)
    edges: set[tuple[str, str]] = field(default_factory=set)
    fan_outs: set[str] = field(default_factory=set)


def exercised(shape: GraphShape, record: RunRecord) -> Exercised:
    """What ``record``'s run exercised of ``shape``.

    The route says which nodes completed, in order, on the main path and in
    every branch; a node that failed counts as run (it was reached). An
    edge is taken when its two ends follow each other on a path, a fan-out
    edge when its branch reached a node, a branch's last edge (to its
    fan-in node, or END) when the branch succeeded, the main path's last
    edge when the run did.
    """
    walk = _Walk(shape)
    error = record.error
    # A failure inside a branch is named by that branch's result, not here.
    failed = getattr(error, "node", None) if getattr(error, "branch", None) is None else None
    walk.path(START, record.steps, end=END if error is None else None, failed=failed)
    return walk.found


class _Walk:
    def __init__(self, shape: GraphShape) -> None:
        self.pairs = {(edge.source, edge.target) for edge in shape.edges}
        self.routers = {edge.source for edge in shape.edges if edge.target == ANY_NODE}
        self.fan_ins = dict(shape.fan_outs)
        self.subgraphs = frozenset(shape.subgraphs)
        self.found = Exercised()

    def is_inner(self, step: str) -> bool:
        """Whether ``step`` is a node inside a subgraph node (``review/score``,
        ``review[3]/score``): it runs before the subgraph node's own step and
        is no node or edge of this agent's shape."""
        head, separator, _ = step.partition(PATH_SEPARATOR)
        return bool(separator) and head.partition("[")[0] in self.subgraphs

    def take(self, source: str, target: str) -> bool:
        if (source, target) in self.pairs:
            self.found.edges.add((source, target))
            return True
        if source in self.routers:
            self.found.edges.add((source, ANY_NODE))
            return True
        return False

    def path(self, previous: str, steps: Iterable[Any], *, end: str | None,
             failed: str | None) -> None:
        """One path's steps from ``previous``: the main path (from START) or a branch."""
        after_fan_out = False  # the next node is the fan-in node, reached by no edge
        for step in steps:
            if isinstance(step, str):
                if self.is_inner(step):
                    continue
                self.found.nodes.add(step)
                if not after_fan_out:
                    self.take(previous, step)
                previous, after_fan_out = step, False
                continue
            self.found.fan_outs.add(previous)
            fan_in = self.fan_ins.get(previous)
            for _branch, success, node, route in step:
                self.path(previous, route, end=fan_in if success else None,
                          failed=None if success else node)
            after_fan_out = True
        if failed is not None:
            if self.is_inner(failed):
                # Failing inside a subgraph node reached the subgraph node itself.
                failed = failed.partition(PATH_SEPARATOR)[0].partition("[")[0]
            self.found.nodes.add(failed)
            if not after_fan_out:
                self.take(previous, failed)
        elif end is not None and not after_fan_out:
            # A branch ends by routing to its fan-in node (or to END); the main path to END.
            reached_end = end != END and self.take(previous, end)
            if not reached_end:
                self.take(previous, END)


@dataclass
class AgentCoverage:
    """One agent's shape and what the runs of its cases exercised, counted in runs."""

    shape: GraphShape
    runs: int = 0
    nodes: Counter[str] = field(default_factory=Counter)
    edges: Counter[tuple[str, str]] = field(default_factory=Counter)
    fan_outs: Counter[str] = field(default_factory=Counter)

    def add(self, found: Exercised) -> None:
        """Count one run."""
        self.runs += 1
        self.nodes.update(found.nodes)
        self.edges.update(found.edges)
        self.fan_outs.update(found.fan_outs)


class CoverageLedger:
    """Coverage per agent (by its path as the report shows it) in one pytest process."""

    def __init__(self) -> None:
        self.agents: dict[str, AgentCoverage] = {}
        self.not_loaded: dict[str, str] = {}

    def observe(self, agent: str, shape: GraphShape, record: RunRecord) -> None:
        """Count the run ``record`` of ``agent``."""
        entry = self.agents.setdefault(agent, AgentCoverage(shape))
        entry.add(exercised(entry.shape, record))

    def agent_not_loaded(self, agent: str, message: str) -> None:
        """Note an agent whose cases ran but which could not be loaded (not counted)."""
        self.not_loaded.setdefault(agent, message)

    def to_plain(self) -> dict[str, Any]:
        """Plain data (lists, strings, numbers) for the trip from an xdist worker."""
        return {"agents": {agent: {"shape": entry.shape.to_plain(), "runs": entry.runs,
                                   "nodes": dict(entry.nodes),
                                   "edges": [[s, t, n] for (s, t), n in entry.edges.items()],
                                   "fan_outs": dict(entry.fan_outs)}
                           for agent, entry in self.agents.items()},
                "not_loaded": dict(self.not_loaded)}

    def merge_plain(self, plain: Mapping[str, Any]) -> None:
        """Add what another process's ``to_plain`` gave."""
        for agent, data in plain.get("agents", {}).items():
            entry = self.agents.setdefault(agent, AgentCoverage(GraphShape.from_plain(data["shape"])))
            entry.runs += data["runs"]
            entry.nodes.update(data["nodes"])
            entry.edges.update({(s, t): n for s, t, n in data["edges"]})
            entry.fan_outs.update(data["fan_outs"])
        for agent, message in plain.get("not_loaded", {}).items():
            self.not_loaded.setdefault(agent, message)


def coverage_report(ledger: CoverageLedger) -> dict[str, Any]:
    """The coverage document (the JSON ``--isobranch-coverage-json`` writes)."""
    agents = [_agent_report(agent, ledger.agents[agent]) for agent in sorted(ledger.agents)]
    covered = sum(a["covered"] for a in agents)
    total = sum(a["total"] for a in agents)
    return {"version": COVERAGE_SCHEMA_VERSION, "covered": covered, "total": total,
            "percent": _percent(covered, total), "agents": agents,
            "not_loaded": [{"agent": agent, "error": ledger.not_loaded[agent]}
                           for agent in sorted(ledger.not_loaded)]}


def _agent_report(agent: str, entry: AgentCoverage) -> dict[str, Any]:
    shape = entry.shape
    nodes = [{"name": name, "runs": entry.nodes.get(name, 0)} for name in shape.nodes]
    edges = [{"from": e.source, "to": e.target, "kind": e.kind.value, "label": e.label,
              "runs": entry.edges.get((e.source, e.target), 0)} for e in shape.edges]
    fan_outs = [{"node": source, "fan_in": fan_in, "runs": entry.fan_outs.get(source, 0)}
                for source, fan_in in shape.fan_outs]
    subgraphs = [{"node": name, "runs": entry.nodes.get(name, 0)} for name in shape.subgraphs]
    covered = sum(1 for item in nodes + edges if item["runs"])
    total = len(nodes) + len(edges)
    return {"agent": agent, "runs": entry.runs,
            "nodes": _part(nodes), "edges": _part(edges), "fan_outs": _part(fan_outs),
            "subgraphs": _part(subgraphs),
            "covered": covered, "total": total, "percent": _percent(covered, total)}


def _part(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"covered": sum(1 for item in items if item["runs"]), "total": len(items),
            "items": items}


def _percent(covered: int, total: int) -> float:
    return round(100.0 * covered / total, 1) if total else 100.0


def coverage_lines(report: Mapping[str, Any]) -> list[str]:
    """The table printed at the end of the session, one agent per row, then what never ran."""
    agents = report["agents"]
    header = ("agent", "nodes", "edges", "fan-outs", "subgraphs", "cover")
    rows = [(a["agent"], *(f"{a[k]['covered']}/{a[k]['total']}"
                          for k in ("nodes", "edges", "fan_outs", "subgraphs")),
             f"{a['percent']:.1f}%") for a in agents]
    rows.append(("total", "", "", "", "", f"{report['percent']:.1f}%"))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                       for i, cell in enumerate(row)).rstrip() for row in [header, *rows]]
    for agent in agents:
        missed = _never_run(agent)
        if missed:
            lines.append(f"never run in {agent['agent']}:")
            lines += [f"  {line}" for line in missed]
    for broken in report["not_loaded"]:
        lines.append(f"not counted: {broken['agent']} cannot be loaded: {broken['error']}")
    return lines


def _never_run(agent: Mapping[str, Any]) -> list[str]:
    lines = [f"node {item['name']}" for item in agent["nodes"]["items"] if not item["runs"]]
    lines += [f"edge {ShapeEdge(e['from'], e['to'], EdgeKind(e['kind']), e['label']).describe()}"
              for e in agent["edges"]["items"] if not e["runs"]]
    lines += [f"fan-out from {item['node']}" for item in agent["fan_outs"]["items"]
              if not item["runs"]]
    lines += [f"subgraph {item['node']}" for item in agent["subgraphs"]["items"] if not item["runs"]]
    return lines
