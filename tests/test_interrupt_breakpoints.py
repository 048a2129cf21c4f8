"""Breakpoints: compile(interrupt_before=..., interrupt_after=...) and the YAML keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from isobranch import (
    END,
    START,
    GraphError,
    Interrupt,
    SqliteCheckpointer,
    StateGraph,
    YAMLEngine,
    interrupt,
)
from isobranch.checkpoint import RunStatus
from isobranch.interrupts import Breakpoint


def line(asking: bool = False) -> tuple[StateGraph, list[str]]:
    """``draft`` -> ``approve`` -> ``send``, and the list of nodes as they start."""
    started: list[str] = []

    def node(name: str):
        def run(state: dict) -> dict:
            started.append(name)
            if asking and name == "approve":
                return {name: interrupt("ok?")}
            return {name: True}
        return run

    graph = StateGraph()
    for name in ("draft", "approve", "send"):
        graph.add_node(name, node(name))
    graph.add_edge(START, "draft").add_edge("draft", "approve").add_edge("approve", "send")
    graph.add_edge("send", END)
    return graph, started


def test_interrupt_before_pauses_before_the_node_and_resume_goes_through_it(tmp_path):
    graph, started = line()
    store = SqliteCheckpointer(tmp_path / "r.db")
    with graph.compile(checkpointer=store, interrupt_before=["approve"]) as app:
        paused = app.invoke({}, config={"run_id": "b"})
        assert paused == {"draft": True, "__interrupt__": [
            Interrupt("approve", None, "approve", None, Breakpoint.BEFORE)]}
        assert started == ["draft"] and store.get_run("b").status is RunStatus.INTERRUPTED
        with pytest.raises(GraphError, match="waits for no interrupt"):
            app.resume("b", answer="yes")
        final = app.resume("b")
    assert final == {"draft": True, "approve": True, "send": True}
    assert started == ["draft", "approve", "send"]


def test_interrupt_after_pauses_after_the_node_which_never_runs_again(tmp_path):
    graph, started = line()
    with graph.compile(checkpointer=SqliteCheckpointer(tmp_path / "r.db"),
                       interrupt_after=["draft", "approve"]) as app:
        first = app.invoke({}, config={"run_id": "a"})
        assert first["__interrupt__"] == [
            Interrupt("draft", None, "draft", None, Breakpoint.AFTER)]
        assert first["draft"] is True
        second = app.resume("a")
        assert [i.id for i in second["__interrupt__"]] == ["approve"]
        final = app.resume("a")
    assert final == {"draft": True, "approve": True, "send": True}
    assert started == ["draft", "approve", "send"]


def test_a_breakpoint_before_a_node_that_asks_is_passed_once_per_pause(tmp_path):
    graph, started = line(asking=True)
    with graph.compile(checkpointer=SqliteCheckpointer(tmp_path / "r.db"),
                       interrupt_before=["approve"]) as app:
        app.invoke({}, config={"run_id": "q"})
        asked = app.resume("q")
        assert asked["__interrupt__"] == [Interrupt("approve", "ok?", "approve", None)]
        final = app.resume("q", answer="yes")
    assert final == {"draft": True, "approve": "yes", "send": True}
    assert started == ["draft", "approve", "approve", "send"]


def test_breakpoints_name_known_nodes_and_need_a_checkpointer(tmp_path):
    graph, _ = line()
    with pytest.raises(GraphError) as caught:
        graph.compile(checkpointer=SqliteCheckpointer(tmp_path / "r.db"),
                      interrupt_before=["aprove"], interrupt_after="send")
    assert "interrupt_before: unknown node(s) 'aprove'" in str(caught.value)
    assert "interrupt_after must be a list of node names, got 'send'" in str(caught.value)
    with pytest.raises(GraphError, match="interrupt_before needs a checkpointer"):
        graph.compile(interrupt_before=["approve"])


def _workflow(db: Path, **top) -> dict:
    return {"nodes": [{"name": "draft", "run": "return {'draft': True}"},
                      {"name": "send", "run": "return {'sent': True}"}],
            "edges": [{"from": "__start__", "to": "draft"}, {"from": "draft", "to": "send"},
                      {"from": "send", "to": "__end__"}],
            "settings": {"checkpoint": {"path": str(db)}}, **top}


def test_yaml_top_level_breakpoints(tmp_path):
    with YAMLEngine().load_from_dict(_workflow(tmp_path / "r.db",
                                               interrupt_before=["send"])) as app:
        paused = app.invoke({}, config={"run_id": "y"})
        assert [(i.id, i.breakpoint) for i in paused["__interrupt__"]] == [
            ("send", Breakpoint.BEFORE)]
        assert app.resume("y") == {"draft": True, "sent": True}
    with pytest.raises(GraphError, match="interrupt_after: unknown node"):
        YAMLEngine().load_from_dict(_workflow(tmp_path / "r.db", interrupt_after=["nope"]))


def test_a_subgraph_file_cannot_have_breakpoints(tmp_path):
    (tmp_path / "inner.yaml").write_text(
        "interrupt_before: [x]\nnodes:\n  - {name: x, run: \"return {'x': 1}\"}\n")
    (tmp_path / "main.yaml").write_text(
        "nodes:\n  - {name: review, subgraph: inner.yaml}\n")
    with pytest.raises(GraphError, match="interrupt_before: breakpoints belong to the top "
                                         "workflow file"):
        YAMLEngine().load_from_file(tmp_path / "main.yaml")
