"""Subgraph nodes in the Python API: a graph as a node, how state crosses, names as paths."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isobranch import END, START, GraphError, GraphExecutionError, StateGraph
from isobranch.nodes import LuaNode
from isobranch.regression import run_agent_case

BACKENDS = ["inline", "thread", "process"]


def review_graph(**schema) -> StateGraph:
    """``score`` then ``check``: the score of ``doc`` and an inner key nobody maps out."""
    inner = StateGraph(schema or None)
    inner.add_node("score", lambda s: {"score": len(s["doc"]), "scratch": "inner only"})
    inner.add_node("check", lambda s: {"checked": True})
    inner.add_edge(START, "score").add_edge("score", "check").add_edge("check", END)
    return inner


def chain(*nodes) -> StateGraph:
    """A graph running ``nodes`` (``(name, fn_or_graph, options)``) one after another."""
    graph = StateGraph()
    previous = START
    for name, fn, options in nodes:
        graph.add_node(name, fn, **options)
        graph.add_edge(previous, name)
        previous = name
    graph.add_edge(previous, END)
    return graph


@pytest.mark.parametrize("isolation", BACKENDS)
def test_mapped_subgraph_writes_only_its_output_keys(isolation):
    graph = chain(("prep", lambda s: {"item": "hello"}, {}),
                  ("review", review_graph(), {"input": {"doc": "item"},
                                              "output": {"review_score": "score"}}))
    with graph.compile(isolation=isolation) as app:
        assert app.invoke({"keep": 1}) == {"keep": 1, "item": "hello", "review_score": 5}


def test_unmapped_subgraph_starts_from_a_private_copy_and_returns_its_final_state():
    def mutate(state):
        state["shared"].append("inner")  # in place: the outer state must not see it
        return {"doc": "abc"}

    inner = review_graph()
    inner_first = StateGraph()
    inner_first.add_node("mutate", mutate).add_node("review", inner)
    inner_first.add_edge(START, "mutate").add_edge("mutate", "review").add_edge("review", END)
    seen = {}
    graph = chain(("sub", inner_first, {}),
                  ("after", lambda s: seen.update(s), {}))
    with graph.compile(isolation="inline") as app:
        final = app.invoke({"shared": ["outer"]})
    # The update is the inner final state: its own copy of "shared", and every inner key.
    assert final == {"shared": ["outer", "inner"], "doc": "abc", "score": 3,
                     "scratch": "inner only", "checked": True}
    assert seen == final
    # With an output mapping, what the inner run changed in place stays inside too.
    graph = chain(("sub", inner_first, {"output": {"score": "score"}}))
    with graph.compile(isolation="inline") as app:
        assert app.invoke({"shared": ["outer"]}) == {"shared": ["outer"], "score": 3}


def test_input_mapping_starts_the_inner_run_from_the_mapped_keys_only():
    seen = {}
    inner = StateGraph()
    inner.add_node("look", lambda s: seen.update(s))
    inner.set_entry_point("look").set_finish_point("look")
    graph = chain(("sub", inner, {"input": {"doc": "text", "gone": "missing"}}))
    with graph.compile(isolation="inline") as app:
        app.invoke({"text": "t", "other": 1})
    assert seen == {"doc": "t"}  # renamed; an outer key the state lacks is left out


def test_a_compiled_graph_is_a_node_too_and_keeps_its_own_variables():
    inner = StateGraph()
    inner.add_node("read", LuaNode("read", "return {seen = variables.limit}"))
    inner.set_entry_point("read").set_finish_point("read")
    with inner.compile(isolation="inline", variables={"limit": 7}) as compiled_inner:
        graph = chain(("sub", compiled_inner, {"output": {"limit": "seen"}}))
        with graph.compile(isolation="thread", variables={"limit": 1}) as app:
            assert app.invoke({}) == {"limit": 7}


def test_node_events_name_inner_nodes_by_their_path():
    graph = chain(("review", review_graph(), {"input": {"doc": "item"}}))
    with graph.compile(isolation="inline") as app:
        nodes = [e["node"] for e in app.stream({"item": "x"}) if e["type"] == "node"]
    assert nodes == ["review/score", "review/check", "review"]


def test_updates_mode_names_inner_nodes_by_path_and_the_node_updates_with_its_output():
    graph = chain(("review", review_graph(), {"input": {"doc": "item"},
                                              "output": {"review_score": "score"}}))
    with graph.compile(isolation="inline") as app:
        updates = [(e["node"], e["update"]) for e in app.stream({"item": "xy"}, mode="updates")
                   if e["type"] == "node"]
    assert updates == [("review/score", {"score": 2, "scratch": "inner only"}),
                       ("review/check", {"checked": True}), ("review", {"review_score": 2})]


def test_an_inner_failure_names_the_inner_node_by_its_path():
    inner = StateGraph()
    inner.add_node("score", lambda s: 1 / 0)
    inner.set_entry_point("score").set_finish_point("score")
    outer = chain(("review", inner, {}))
    with outer.compile(isolation="inline") as app, pytest.raises(GraphExecutionError) as caught:
        app.invoke({})
    assert caught.value.node == "review/score"
    assert "node 'review/score' failed: ZeroDivisionError" in str(caught.value)


def test_input_and_output_on_a_node_that_is_not_a_graph_is_an_error_naming_it():
    with pytest.raises(GraphError, match=r"node 'plain': input= and output= are for subgraph"):
        StateGraph().add_node("plain", lambda s: None, input={"a": "b"})


def test_a_mapping_to_a_key_the_inner_schema_lacks_names_the_node_and_the_key():
    inner = review_graph(doc=str, score=int)
    with pytest.raises(GraphError) as caught:
        StateGraph().add_node("review", inner, input={"text": "item"},
                              output={"total": "points"})
    message = str(caught.value)
    assert "node 'review': input maps inner key 'text'" in message
    assert "node 'review': output maps inner key 'points'" in message


def test_a_graph_that_contains_itself_is_an_error_naming_the_cycle():
    a, b = StateGraph(), StateGraph()
    a.add_node("into_b", b).set_entry_point("into_b")
    b.add_node("into_a", a).set_entry_point("into_a")
    with pytest.raises(GraphError, match="'into_b' → 'into_a' → 'into_b'"):
        a.compile(isolation="inline")
    direct = StateGraph()
    direct.add_node("me", direct).set_entry_point("me")
    with pytest.raises(GraphError, match="'me' → 'me'"):
        direct.compile(isolation="inline")


def test_a_node_that_is_not_callable_is_named_once():
    with pytest.raises(GraphError) as caught:
        StateGraph().add_node("review", 42)
    assert str(caught.value) == "node 'review': expected a callable, got int"


def test_inner_problems_are_named_under_the_subgraph_node():
    inner = StateGraph()
    inner.add_node("a", lambda s: None).set_entry_point("a").add_edge("a", "nowhere")
    outer = chain(("review", inner, {}))
    with pytest.raises(GraphError, match=r"node 'review': edge a -> nowhere: unknown node"):
        outer.compile(isolation="inline")


def test_a_subgraph_node_cannot_be_a_fan_in_node():
    outer = StateGraph()
    outer.add_node("review", review_graph()).mark_fan_in("review").set_entry_point("review")
    with pytest.raises(GraphError, match="node 'review': a subgraph node cannot be a fan-in"):
        outer.compile(isolation="inline")


# -- the mapping rules, against a tiny reference -------------------------------------

KEYS = st.sampled_from(["a", "b", "c", "d", "e"])
MAPPINGS = st.none() | st.dictionaries(KEYS, KEYS, max_size=4)


def reference_update(outer: dict, input: dict | None, output: dict | None,
                     inner_update: dict) -> tuple[dict, dict]:
    """What the inner run starts from, and the outer state after the node, by the rules."""
    start = dict(outer) if input is None else {
        inner: outer[key] for inner, key in input.items() if key in outer}
    final = {**start, **inner_update}
    update = final if output is None else {
        key: final[inner] for key, inner in output.items() if inner in final}
    return start, {**outer, **update}


@settings(max_examples=150, deadline=None, database=None, derandomize=True)
@given(outer=st.dictionaries(KEYS, st.integers(0, 9), max_size=5), input=MAPPINGS,
       output=MAPPINGS, inner_update=st.dictionaries(KEYS, st.integers(10, 19), max_size=3))
def test_the_outer_state_after_a_subgraph_node_follows_the_mapping_rules(
        outer, input, output, inner_update):
    seen = []
    inner = StateGraph()
    inner.add_node("work", lambda s: seen.append(dict(s)) or dict(inner_update))
    inner.set_entry_point("work").set_finish_point("work")
    graph = StateGraph()
    graph.add_node("sub", inner, input=input, output=output)
    graph.set_entry_point("sub").set_finish_point("sub")
    start, expected = reference_update(outer, input, output, inner_update)
    with graph.compile(isolation="inline") as app:
        assert app.invoke(outer) == expected
    assert seen == [start]


def test_a_subgraph_runs_its_lua_on_a_vm_of_its_own_and_the_outer_vm_lives_on():
    inner = StateGraph()
    inner.add_node("peek", LuaNode("peek", "mark = 'inner'\nreturn {inner_saw = outer_mark}"))
    inner.set_entry_point("peek").set_finish_point("peek")
    graph = chain(
        ("set", LuaNode("set", "outer_mark = 'outer'\nreturn {}"), {}),
        ("sub", inner, {"output": {"inner_saw": "inner_saw"}}),
        ("get", LuaNode("get", "return {outer_kept = outer_mark, leaked = mark}"), {}))
    with graph.compile(isolation="inline") as app:
        final = app.invoke({})
    # Lua turns a nil into no key at all.
    assert final == {"outer_kept": "outer"}


def test_a_regression_route_names_inner_nodes_by_path():
    graph = chain(("prep", lambda s: {"item": "abc"}, {}),
                  ("review", review_graph(), {"input": {"doc": "item"}}))
    with graph.compile(isolation="inline") as app:
        record = run_agent_case(app, {})
    assert record.route == ["prep", "review/score", "review/check", "review"]


def spinning_graph() -> StateGraph:
    """``spin`` forever: its edge leads back to itself until ``done``, which it never sets."""
    inner = StateGraph()
    inner.add_node("spin", lambda s: {"turns": s.get("turns", 0) + 1})
    inner.set_entry_point("spin")
    inner.add_conditional_edges("spin", lambda s: "stop" if s.get("done") else "again",
                                {"again": "spin", "stop": END})
    return inner


@pytest.mark.parametrize("isolation", ["inline", "thread"])
def test_a_looping_subgraph_stops_at_its_own_max_steps_naming_the_inner_node(isolation):
    with spinning_graph().compile(isolation="inline", max_steps=4) as inner:
        graph = StateGraph()
        graph.add_node("start", lambda s: None)
        graph.add_node("loop", inner, input={})
        graph.add_fan_in_node("join", lambda s, results: {
            "errors": [(r.node, r.error_type) for r in results]})
        graph.add_edge(START, "start").add_edge("loop", "join").add_edge("join", END)
        graph.add_map_edge("start", "loop", over="items", fan_in="join")
        with graph.compile(isolation=isolation, max_workers=2) as app:
            assert app.invoke({"items": [1]})["errors"] == [("loop[0]/spin", "MaxStepsExceeded")]
    main_path = chain(("loop", spinning_graph(), {}))
    with main_path.compile(isolation="inline") as app, \
            pytest.raises(GraphExecutionError) as caught:
        app.invoke({})
    assert caught.value.node == "loop/spin" and caught.value.error_type == "MaxStepsExceeded"
    assert "node 'loop/spin': stopped after" in str(caught.value)


def test_streamed_inner_node_events_keep_the_state_as_that_node_left_it():
    graph = chain(("review", review_graph(), {"input": {"doc": "item"}}))
    with graph.compile(isolation="inline") as app:
        states = {e["node"]: e["state"] for e in app.stream({"item": "xy"})
                  if e["type"] == "node"}
    assert states["review/score"] == {"doc": "xy", "score": 2, "scratch": "inner only"}
    assert states["review/check"]["checked"] is True
    assert states["review"]["checked"] is True


def test_a_traced_map_of_subgraphs_has_a_span_for_each_inner_node(monkeypatch):
    trace = pytest.importorskip("opentelemetry.trace")
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory, provider = InMemorySpanExporter(), sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)  # this test's provider only
    graph = StateGraph()
    graph.add_node("start", lambda s: None)
    graph.add_node("review", review_graph(), input={"doc": "item"}, output={"score": "score"})
    graph.add_fan_in_node("join", lambda s, results: {"n": len(results)})
    graph.add_edge(START, "start").add_edge("review", "join").add_edge("join", END)
    graph.add_map_edge("start", "review", over="items", fan_in="join")
    with graph.compile(isolation="inline") as app:
        assert app.invoke({"items": ["a", "bb"]})["n"] == 2
    provider.shutdown()
    nodes = sorted(span.attributes["isobranch.node"] for span in memory.get_finished_spans()
                   if span.name == "isobranch.node")
    assert nodes == sorted(["start", "join", "review", "review", "review[0]/score",
                            "review[0]/check", "review[1]/score", "review[1]/check"])
