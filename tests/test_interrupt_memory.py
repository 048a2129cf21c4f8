"""SqliteCheckpointer() without a path: runs kept in memory for the life of the object."""

from __future__ import annotations

import pickle

import pytest

from conftest import HAVE_DASK
from isobranch import END, START, GraphError, SqliteCheckpointer, StateGraph, interrupt
from isobranch.checkpoint import RunStatus


def asking_map() -> StateGraph:
    """A map over 6 items whose items 0 and 3 ask; the fan-in collects the answers."""
    graph = StateGraph()
    graph.add_node("start", lambda state: {"items": list(range(6))})
    graph.add_node("ask", lambda state: {
        "a": interrupt(state["item"]) if state["item"] % 3 == 0 else "-"})
    graph.add_fan_in_node("join", lambda state, results: {"all": [r.state["a"] for r in results]})
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "ask", over="items", fan_in="join")
    graph.add_edge("ask", "join").add_edge("join", END)
    return graph


@pytest.mark.parametrize("isolation", [
    "inline", "thread", "process",
    pytest.param("dask", marks=pytest.mark.skipif(not HAVE_DASK, reason="no dask extra"))])
def test_a_run_pauses_and_resumes_in_memory_on_every_backend(isolation, no_process_leak):
    # The in-memory checkpointer refuses to be pickled: a backend that ships the graph
    # to workers can run only because branches never carry the store (the caller
    # records their results).
    store = SqliteCheckpointer()
    with asking_map().compile(isolation=isolation, max_workers=2, checkpointer=store) as app:
        paused = app.invoke({}, config={"run_id": "m"})
        assert [i.id for i in paused["__interrupt__"]] == ["ask[0]", "ask[3]"]
        store.close()  # closing the connection keeps the runs
        run = store.get_run("m")
        assert run.status is RunStatus.INTERRUPTED and run.branches_done == 4
        final = app.resume("m", answers={"ask[0]": "x", "ask[3]": "y"})
    assert final["all"] == ["x", "-", "-", "y", "-", "-"]
    assert store.get_run("m").status is RunStatus.SUCCEEDED


def test_each_in_memory_checkpointer_is_a_database_of_its_own():
    first, second = SqliteCheckpointer(), SqliteCheckpointer()
    assert first.path == second.path and str(first.path) == ":memory:"
    with asking_map().compile(checkpointer=first) as app:
        app.invoke({}, config={"run_id": "one"})
    assert [r.run_id for r in first.list_runs()] == ["one"]
    assert second.list_runs() == []
    assert repr(first) == "SqliteCheckpointer()"


def test_an_in_memory_checkpointer_cannot_leave_its_process():
    with pytest.raises(GraphError, match="cannot leave its process"):
        pickle.dumps(SqliteCheckpointer())
