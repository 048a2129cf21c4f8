"""interrupt() inside fan-out branches, on every backend: a branch pauses alone, its
siblings finish and are never run again, a resume continues only the paused branches
from the node they paused in."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import HAVE_DASK
from isobranch import END, START, Interrupt, SqliteCheckpointer, StateGraph, interrupt
from isobranch.checkpoint import RunStatus

ITEMS = list(range(20))
ASKING = (3, 11)
BACKENDS = ["inline", "thread", "process",
            pytest.param("dask", marks=pytest.mark.skipif(
                not HAVE_DASK, reason="the dask extra is not installed"))]


def _mark(state: dict, node: str) -> None:
    """Append one mark to the file of ``node`` (and the item): counted across processes."""
    name = node if "item" not in state else f"{node}-{state['item']}"
    with open(Path(state["marks"]) / name, "a") as file:
        file.write("x")


def ran(marks: Path) -> dict[str, int]:
    """How many times each node (per item) started."""
    return {path.name: len(path.read_text()) for path in marks.iterdir()}


def _start(state: dict) -> dict:
    _mark(state, "start")
    return {"items": list(ITEMS)}


def _prep(state: dict) -> dict:
    _mark(state, "prep")
    return {"draft": f"draft {state['item']}"}


def _approve(state: dict) -> dict:
    _mark(state, "approve")
    if state["item"] in ASKING:
        return {"verdict": interrupt({"draft": state["draft"]})}
    return {"verdict": "auto"}


def _join(state: dict, results: list) -> dict:
    _mark(state, "join")
    return {"verdicts": [r.state.get("verdict") for r in results],
            "drafts": [r.state.get("draft") for r in results],
            "routes": [r.route for r in results]}


def review_map(**edge) -> StateGraph:
    """``start`` -> map of ``prep`` -> ``approve`` over 20 items -> ``join``."""
    graph = StateGraph()
    graph.add_node("start", _start).add_node("prep", _prep).add_node("approve", _approve)
    graph.add_fan_in_node("join", _join)
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "prep", over="items", fan_in="join", **edge)
    graph.add_edge("prep", "approve").add_edge("approve", "join").add_edge("join", END)
    return graph


@pytest.mark.parametrize("isolation", BACKENDS)
def test_paused_branches_resume_alone_and_nothing_finished_runs_again(tmp_path, isolation,
                                                                      no_process_leak):
    marks = tmp_path / "marks"
    marks.mkdir()
    store = SqliteCheckpointer(tmp_path / "runs.db")
    with review_map().compile(isolation=isolation, max_workers=2, checkpointer=store) as app:
        paused = app.invoke({"marks": str(marks)}, config={"run_id": "r"})
        assert paused["__interrupt__"] == [
            Interrupt(f"prep[{i}]/approve", {"draft": f"draft {i}"}, "approve", f"prep[{i}]")
            for i in ASKING]
        assert "verdicts" not in paused, "the fan-in node waits for the answers"
        first = ran(marks)
        assert first == {"start": 1, **{f"prep-{i}": 1 for i in ITEMS},
                         **{f"approve-{i}": 1 for i in ITEMS}}
        run = store.get_run("r")
        assert run.status is RunStatus.INTERRUPTED
        assert (run.branches_done, run.branches_total) == (18, 20), "siblings recorded"
        final = app.resume("r", answers={"prep[3]/approve": "yes", "prep[11]/approve": "no"})
    assert final["verdicts"] == ["yes" if i == 3 else "no" if i == 11 else "auto"
                                 for i in ITEMS]
    assert final["drafts"] == [f"draft {i}" for i in ITEMS], "paused state kept"
    assert final["routes"][3] == ("prep", "approve"), "the route spans the pause"
    # Only the two paused branches ran again, each from ``approve``: no ``prep``.
    assert ran(marks) == {**first, "approve-3": 2, "approve-11": 2, "join": 1}
    assert store.get_run("r").status is RunStatus.SUCCEEDED


def test_a_pause_never_triggers_fail_fast_nor_a_branch_retry(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    # Even a policy that names the pause's kind never retries it: a pause is no failure.
    graph = review_map(retry={"max_attempts": 3, "initial_interval": 0.001,
                              "retry_on": ["Interrupted"]})
    with graph.compile(isolation="thread", max_workers=2, fail_fast=True,
                       checkpointer=SqliteCheckpointer(tmp_path / "r.db")) as app:
        paused = app.invoke({"marks": str(marks)}, config={"run_id": "r"})
    assert [i.id for i in paused["__interrupt__"]] == ["prep[3]/approve", "prep[11]/approve"]
    assert ran(marks)["approve-3"] == 1 and ran(marks)["approve-19"] == 1


def test_answers_given_in_separate_resumes_accumulate(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    with review_map().compile(isolation="inline",
                              checkpointer=SqliteCheckpointer(tmp_path / "r.db")) as app:
        app.invoke({"marks": str(marks)}, config={"run_id": "r"})
        still = app.resume("r", answers={"prep[3]/approve": "yes"})
        assert [i.id for i in still["__interrupt__"]] == ["prep[11]/approve"]
        final = app.resume("r", answer="no")
    assert final["verdicts"][3] == "yes" and final["verdicts"][11] == "no"
    # Branch 3 finished on the first resume and never ran again; 11 ran once per resume.
    assert ran(marks)["approve-3"] == 2 and ran(marks)["approve-11"] == 3
    assert ran(marks)["approve-0"] == 1


def test_ids_of_a_branch_that_starts_at_the_asking_node_and_of_nested_fan_outs(tmp_path):
    inner = StateGraph()
    inner.add_node("fan", lambda state: {"letters": ["a", "b"]})
    inner.add_node("ask", lambda state: {"got": interrupt(state["item"])})
    inner.add_fan_in_node("meet", lambda state, results: {
        "got": [r.state["got"] for r in results]})
    graph = StateGraph()
    graph.add_node("start", lambda state: {"items": [0, 1]})
    graph.add_node("fan", lambda state: {"letters": [f"{state['item']}a"]})
    graph.add_node("ask", lambda state: {"got": interrupt(state["item"])})
    graph.add_fan_in_node("meet", lambda state, results: {
        "got": [r.state["got"] for r in results]})
    graph.add_fan_in_node("join", lambda state, results: {
        "all": [r.state["got"] for r in results]})
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "fan", over="items", fan_in="join")
    graph.add_map_edge("fan", "ask", over="letters", fan_in="meet")
    graph.add_edge("ask", "meet").add_edge("meet", "join").add_edge("join", END)
    with graph.compile(isolation="thread", max_workers=2,
                       checkpointer=SqliteCheckpointer(tmp_path / "r.db")) as app:
        paused = app.invoke({}, config={"run_id": "n"})
        assert [(i.id, i.value, i.branch) for i in paused["__interrupt__"]] == [
            ("fan[0]/ask[0]", "0a", "fan[0]/ask[0]"), ("fan[1]/ask[0]", "1a", "fan[1]/ask[0]")]
        final = app.resume("n", answers={"fan[0]/ask[0]": "x", "fan[1]/ask[0]": "y"})
    assert final["all"] == [["x"], ["y"]]


def _subgraph_prep(state: dict) -> dict:
    _mark(state, "inner-prep")
    return {"draft": f"d{state['item']}"}


def _subgraph_approve(state: dict) -> dict:
    _mark(state, "inner-approve")
    return {"ok": interrupt(state["draft"]) if state["item"] in ASKING else "auto"}


def reviewed_subgraph() -> StateGraph:
    inner = StateGraph()
    inner.add_node("prep", _subgraph_prep).add_node("approve", _subgraph_approve)
    inner.add_edge(START, "prep").add_edge("prep", "approve").add_edge("approve", END)
    return inner


@pytest.mark.parametrize("isolation", ["inline", "process"])
def test_a_map_of_subgraphs_pauses_and_resumes_inside_each(tmp_path, isolation):
    marks = tmp_path / "marks"
    marks.mkdir()
    graph = StateGraph()
    graph.add_node("start", lambda state: {"items": list(range(5))})
    graph.add_node("review", reviewed_subgraph(),
                   input={"item": "item", "marks": "marks"}, output={"ok": "ok"})
    graph.add_fan_in_node("join", lambda state, results: {
        "oks": [r.state.get("ok") for r in results]})
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "review", over="items", fan_in="join")
    graph.add_edge("review", "join").add_edge("join", END)
    with graph.compile(isolation=isolation, max_workers=2,
                       checkpointer=SqliteCheckpointer(tmp_path / "r.db")) as app:
        paused = app.invoke({"marks": str(marks)}, config={"run_id": "s"})
        assert [(i.id, i.node, i.value) for i in paused["__interrupt__"]] == [
            ("review[3]/approve", "review[3]/approve", "d3")]
        final = app.resume("s", answer="yes")
    assert final["oks"] == ["auto", "auto", "auto", "yes", "auto"]
    counts = ran(marks)
    assert counts["inner-prep-3"] == 1, "the subgraph's earlier node never runs again"
    assert counts["inner-approve-3"] == 2 and counts["inner-approve-4"] == 1


def test_a_main_path_subgraph_pauses_inside_with_its_path_as_id(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    graph = StateGraph()
    graph.add_node("review", reviewed_subgraph(), input={"item": "item", "marks": "marks"},
                   output={"ok": "ok"})
    graph.add_edge(START, "review").add_edge("review", END)
    store = SqliteCheckpointer(tmp_path / "r.db")
    with graph.compile(checkpointer=store) as app:
        paused = app.invoke({"marks": str(marks), "item": 3}, config={"run_id": "m"})
        assert paused["__interrupt__"] == [Interrupt("review/approve", "d3", "review/approve")]
        assert store.pending_interrupts("m") == paused["__interrupt__"]
        final = app.resume("m", answer="fine")
    assert final == {"marks": str(marks), "item": 3, "ok": "fine"}
    # The inner step before the pause was recorded: a resume continues after it.
    assert ran(marks) == {"inner-prep-3": 1, "inner-approve-3": 2}


@pytest.mark.parametrize("isolation", ["inline", "thread"])
def test_interrupt_in_a_branch_router_is_outside_a_node_even_after_a_node_asked(tmp_path,
                                                                               isolation):
    """A branch's nodes find their call through the branch's context, which stays the
    running one between its nodes: a router there is still no node call to pause."""

    def ask(state: dict) -> dict:
        return {"answer": interrupt("go on?")}  # answered below: returns at once

    def route(state: dict) -> str:
        interrupt("from a router")
        return "after"

    graph = StateGraph()
    graph.add_node("start", lambda state: {"items": [0, 1]})
    graph.add_node("ask", ask).add_node("after", lambda state: {"done": True})
    graph.add_fan_in_node("join", lambda state, results: {
        "errors": [(r.error_type, r.error) for r in results]})
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "ask", over="items", fan_in="join")
    graph.add_conditional_edges("ask", route)
    graph.add_edge("after", "join").add_edge("join", END)
    store = SqliteCheckpointer(tmp_path / "r.db")
    with graph.compile(isolation=isolation, checkpointer=store) as app:
        app.invoke({}, config={"run_id": "r"})
        final = app.resume("r", answers={"ask[0]": "yes", "ask[1]": "yes"})
    assert "__interrupt__" not in final, "a router's interrupt() pauses nothing"
    assert [error_type for error_type, _ in final["errors"]] == ["RuntimeError"] * 2
    assert all("outside a node" in error for _, error in final["errors"])
