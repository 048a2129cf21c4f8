"""Benchmark rows for subgraph nodes: a map whose body is a one-node subgraph."""

from __future__ import annotations

from isobranch import END, START, StateGraph

from .cases import Row, round_robin_best, slowdown_row
from .map_cases import _body, _check, _join


def _graph(body) -> StateGraph:
    """start -> one branch per item of ``state["items"]`` running ``body`` -> join."""
    graph = StateGraph()
    graph.add_node("start", lambda state: None)
    graph.add_node("body", body)
    graph.add_fan_in_node("join", _join)
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "body", over="items", fan_in="join")
    graph.add_edge("body", "join")
    graph.add_edge("join", END)
    return graph


def one_node_subgraph() -> StateGraph:
    """The map's body node alone, as a graph."""
    inner = StateGraph()
    inner.add_node("body", _body)
    inner.set_entry_point("body").set_finish_point("body")
    return inner


def subgraph_map_vs_node_map(isolation: str, items: int = 1_000, workers: int = 2,
                             repeat: int = 5) -> Row:
    """A map of ``items`` whose body is a one-node subgraph against the same map with that
    node as its body, on ``isolation``, measured in turns."""
    values = list(range(items))
    with _graph(_body).compile(isolation=isolation, max_workers=workers) as plain, \
            _graph(one_node_subgraph()).compile(isolation=isolation,
                                                max_workers=workers) as nested:
        for app in (plain, nested):  # warm pools, and both compute the same thing
            _check(app.invoke({"items": values}), values)
        baseline, measured = round_robin_best(
            [lambda: plain.invoke({"items": values}), lambda: nested.invoke({"items": values})],
            repeat)
    return slowdown_row(f"map of {items:,} items, body a one-node subgraph, {isolation}",
                        1.3, "the node as body", baseline, measured,
                        f"node {baseline / items * 1000:.3f} ms/item, "
                        f"subgraph {measured / items * 1000:.3f} ms/item")
