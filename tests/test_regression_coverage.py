"""Graph coverage: an agent's shape, what a run exercised (branches included), the report.

The pytest option itself (tables, -n 0 against -n 2, fail-under, JSON) is
tested through real pytest runs in tests/test_plugin_coverage.py.
"""

from __future__ import annotations

import pytest

from isobranch import END, START, StateGraph, YAMLEngine
from isobranch.regression import (
    ANY_NODE,
    CoverageLedger,
    coverage_lines,
    coverage_report,
    exercised,
    graph_shape,
    run_agent_case,
)

# Branch `a1` routes inside its branch (a_hi when x > 5, else a_lo); branch `b`
# runs a nested map of its own; every branch meets at `join`.
BRANCHY = {
    "name": "branchy",
    "nodes": [
        {"name": "start", "run": "return None"},
        {"name": "a1", "run": "return None"},
        {"name": "a_hi", "run": "return {'hi': True}"},
        {"name": "a_lo", "run": "-- lua\nreturn {lo = true}"},
        {"name": "b", "run": "return {'parts': [1, 2]}"},
        {"name": "part", "run": "return {'part': state['item']}"},
        {"name": "parts_done", "fan_in": True, "run": "return None"},
        {"name": "join", "fan_in": True,
         "run": "if state.get('boom'):\n    raise ValueError('boom')\nreturn None"},
    ],
    "edges": [
        {"from": START, "to": "start"},
        {"from": "start", "to": "a1", "type": "parallel", "fan_in": "join"},
        {"from": "start", "to": "b", "type": "parallel", "fan_in": "join"},
        {"from": "a1", "to": "a_hi", "when": "state['x'] > 5"},
        {"from": "a1", "to": "a_lo"},
        {"from": "a_hi", "to": "join"},
        {"from": "a_lo", "to": "join"},
        {"from": "b", "to": "part", "type": "map", "over": "parts", "as": "item",
         "fan_in": "parts_done"},
        {"from": "part", "to": "parts_done"},
        {"from": "parts_done", "to": "join"},
    ],
}

HIGH_X_NODES = {"start", "a1", "a_hi", "b", "part", "parts_done", "join"}
HIGH_X_EDGES = {(START, "start"), ("start", "a1"), ("start", "b"), ("a1", "a_hi"),
                ("a_hi", "join"), ("b", "part"), ("part", "parts_done"),
                ("parts_done", "join"), ("join", END)}


@pytest.fixture
def branchy(isolation: str):
    with YAMLEngine(isolation=isolation).load_from_dict(BRANCHY) as graph:
        yield graph


def test_the_shape_lists_every_node_edge_outcome_and_fan_out() -> None:
    with YAMLEngine().load_from_dict(BRANCHY) as graph:
        shape = graph_shape(graph)
    assert shape.nodes == ("start", "a1", "a_hi", "a_lo", "b", "part", "parts_done", "join")
    assert {(e.source, e.target, e.kind.value) for e in shape.edges} == {
        (START, "start", "plain"), ("start", "a1", "parallel"), ("start", "b", "parallel"),
        ("a1", "a_hi", "conditional"), ("a1", "a_lo", "plain"), ("a_hi", "join", "plain"),
        ("a_lo", "join", "plain"), ("b", "part", "map"), ("part", "parts_done", "plain"),
        ("parts_done", "join", "plain"), ("join", END, "plain")}
    assert shape.fan_outs == (("start", "join"), ("b", "parts_done"))


def test_every_target_of_a_router_mapping_is_an_outcome_and_a_mapless_router_one() -> None:
    graph = StateGraph()
    for name in ("pick", "left", "right", "free"):
        graph.add_node(name, lambda state: None)
    graph.add_edge(START, "pick")
    graph.add_conditional_edges("pick", lambda state: state["go"], {"l": "left", "r": "right",
                                                                    "also_l": "left"})
    graph.add_conditional_edges("left", lambda state: "free")
    graph.add_edge("right", END)
    graph.add_edge("free", END)
    with graph.compile(isolation="inline") as app:
        shape = graph_shape(app)
        pairs = [(e.source, e.target) for e in shape.edges]
        # Two router values leading to one node are one outcome.
        assert pairs.count(("pick", "left")) == 1 and ("pick", "right") in pairs
        assert ("left", ANY_NODE) in pairs
        found = exercised(shape, run_agent_case(app, {"go": "l"}))
    assert found.edges == {(START, "pick"), ("pick", "left"), ("left", ANY_NODE), ("free", END)}
    assert found.nodes == {"pick", "left", "free"}


def test_nodes_and_edges_inside_branches_count_on_every_backend(branchy) -> None:
    shape = graph_shape(branchy)
    record = run_agent_case(branchy, {"x": 9})
    assert record.error is None
    found = exercised(shape, record)
    assert found.nodes == HIGH_X_NODES
    assert found.edges == HIGH_X_EDGES
    assert found.fan_outs == {"start", "b"}


def test_a_failed_node_counts_as_run_but_not_the_edges_after_it(branchy) -> None:
    shape = graph_shape(branchy)
    found = exercised(shape, run_agent_case(branchy, {"x": 1, "boom": True}))
    assert "join" in found.nodes and "a_lo" in found.nodes
    assert ("a1", "a_lo") in found.edges and ("a_lo", "join") in found.edges
    assert ("join", END) not in found.edges


def test_a_branch_that_fails_fast_counts_up_to_its_failing_node() -> None:
    document = {**BRANCHY, "settings": {"parallel": {"fail_fast": True}}}
    document["nodes"] = [dict(node, run="raise ValueError('no')") if node["name"] == "a_lo"
                         else node for node in BRANCHY["nodes"]]
    with YAMLEngine(isolation="thread").load_from_dict(document) as graph:
        record = run_agent_case(graph, {"x": 1})
        found = exercised(graph_shape(graph), record)
    assert record.error is not None
    assert {"start", "a1", "a_lo"} <= found.nodes
    assert ("a1", "a_lo") in found.edges and ("a_lo", "join") not in found.edges
    assert "join" not in found.nodes


def test_the_report_counts_runs_and_names_what_never_ran() -> None:
    ledger = CoverageLedger()
    with YAMLEngine().load_from_dict(BRANCHY) as graph:
        shape = graph_shape(graph)
        ledger.observe("agents/branchy.yaml", shape, run_agent_case(graph, {"x": 9}))
        ledger.observe("agents/branchy.yaml", shape, run_agent_case(graph, {"x": 7}))
    report = coverage_report(ledger)
    agent = report["agents"][0]
    assert agent["runs"] == 2
    assert agent["nodes"]["covered"] == 7 and agent["nodes"]["total"] == 8
    assert agent["edges"]["covered"] == 9 and agent["edges"]["total"] == 11
    assert {item["name"]: item["runs"] for item in agent["nodes"]["items"]}["a_hi"] == 2
    assert report["covered"] == 16 and report["total"] == 19 and report["percent"] == 84.2
    lines = coverage_lines(report)
    assert lines[0].split() == ["agent", "nodes", "edges", "fan-outs", "subgraphs", "cover"]
    assert lines[1].split() == ["agents/branchy.yaml", "7/8", "9/11", "2/2", "0/0", "84.2%"]
    assert lines[3:] == ["never run in agents/branchy.yaml:", "  node a_lo",
                         "  edge a1 -> a_lo", "  edge a_lo -> join"]


def test_a_ledger_merged_from_parts_equals_one_that_saw_every_run() -> None:
    whole, first, second = CoverageLedger(), CoverageLedger(), CoverageLedger()
    with YAMLEngine().load_from_dict(BRANCHY) as graph:
        shape = graph_shape(graph)
        for x, part in ((9, first), (1, second), (3, second)):
            record = run_agent_case(graph, {"x": x})
            whole.observe("b.yaml", shape, record)
            part.observe("b.yaml", shape, record)
    merged = CoverageLedger()
    merged.merge_plain(second.to_plain())
    merged.merge_plain(first.to_plain())
    assert coverage_report(merged) == coverage_report(whole)
    assert coverage_report(whole)["percent"] == 100.0


def _review_agent(isolation: str, *, mapped: bool, fail: bool = False):
    """The compiled agent (its caller closes it: on process or dask it holds workers)."""
    inner = StateGraph()
    inner.add_node("read", lambda state: {"seen": True})
    inner.add_node("score", (lambda state: 1 / 0) if fail else (lambda state: {"score": 1}))
    inner.set_entry_point("read")
    inner.add_edge("read", "score")
    inner.add_edge("score", END)
    outer = StateGraph()
    outer.add_node("pre", lambda state: {"items": [1, 2, 3]})
    outer.add_node("review", inner, input={"item": "item"} if mapped else None, output={})
    outer.set_entry_point("pre")
    if mapped:
        outer.add_fan_in_node("post", lambda state, results: None)
        outer.add_map_edge("pre", "review", over="items", fan_in="post")
    else:
        outer.add_node("post", lambda state: None)
        outer.add_edge("pre", "review")
    outer.add_edge("review", "post")
    outer.add_edge("post", END)
    return outer.compile(isolation=isolation)


@pytest.mark.parametrize("mapped", [False, True], ids=["main-path", "map-target"])
def test_a_subgraph_node_counts_as_one_node_and_its_edges_as_taken(isolation: str,
                                                                   mapped: bool) -> None:
    with _review_agent(isolation, mapped=mapped) as graph:
        shape = graph_shape(graph)
        assert shape.subgraphs == ("review",)
        record = run_agent_case(graph, {})
    assert record.error is None
    found = exercised(shape, record)
    # The inner nodes (review/read, review[2]/score ...) are not nodes of this agent.
    assert found.nodes == {"pre", "review", "post"}
    assert found.edges == {(START, "pre"), ("pre", "review"), ("review", "post"), ("post", END)}
    report = coverage_report(_ledger_of(graph, shape, record))
    assert report["agents"][0]["subgraphs"]["covered"] == 1


def _ledger_of(graph, shape, record) -> CoverageLedger:
    ledger = CoverageLedger()
    ledger.observe("review.yaml", shape, record)
    return ledger


def test_a_failure_inside_a_subgraph_node_counts_the_subgraph_node_as_run() -> None:
    with _review_agent("inline", mapped=False, fail=True) as graph:
        shape = graph_shape(graph)
        record = run_agent_case(graph, {})
    assert record.error is not None
    found = exercised(shape, record)
    assert found.nodes == {"pre", "review"}
    assert ("pre", "review") in found.edges and ("review", "post") not in found.edges


def test_a_fan_out_inside_a_subgraph_node_is_named_by_path_and_is_not_this_agents(
        isolation: str) -> None:
    inner = StateGraph()
    inner.add_node("pre", lambda state: {"items": [1, 2]})
    inner.add_node("work", lambda state: {"w": state["item"]})
    inner.add_fan_in_node("done", lambda state, results: None)
    inner.set_entry_point("pre")
    inner.add_map_edge("pre", "work", over="items", fan_in="done")
    inner.add_edge("work", "done")
    inner.add_edge("done", END)
    outer = StateGraph()
    outer.add_node("sub", inner, output={})
    outer.set_entry_point("sub")
    outer.add_edge("sub", END)
    with outer.compile(isolation=isolation) as graph:
        record = run_agent_case(graph, {})
        shape = graph_shape(graph)
    assert record.error is None
    assert record.route == ["sub/pre", "[sub/work[0] | sub/work[1]]", "sub/done", "sub"]
    found = exercised(shape, record)
    assert found.nodes == {"sub"} and found.fan_outs == set()
    assert found.edges == {(START, "sub"), ("sub", END)}
