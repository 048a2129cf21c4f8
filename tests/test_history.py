"""Run history: ``get_state``, ``history`` and ``fork`` of recorded runs."""

from __future__ import annotations

import operator
import sqlite3
from pathlib import Path
from typing import Annotated, TypedDict

import pytest

from isobranch import (
    END,
    START,
    GraphError,
    GraphExecutionError,
    Interrupt,
    RunState,
    SqliteCheckpointer,
    StateGraph,
    StepRecord,
    interrupt,
)
from isobranch.checkpoint import RunStatus
from isobranch.errors import RunExistsError


class Counted(TypedDict, total=False):
    n: int
    log: Annotated[list, operator.add]


def _add(amount: int, name: str):
    def node(state: dict) -> dict:
        return {"n": state.get("n", 0) + amount, "log": [name]}
    return node


def line_graph() -> StateGraph:
    """``a`` (+1) -> ``b`` (+10) -> ``c`` (+100), each logging its name (a reducer key)."""
    graph = StateGraph(Counted)
    graph.add_node("a", _add(1, "a")).add_node("b", _add(10, "b")).add_node("c", _add(100, "c"))
    graph.add_edge(START, "a").add_edge("a", "b").add_edge("b", "c").add_edge("c", END)
    return graph


def _rows(database: Path, run_id: str) -> dict[str, list[tuple]]:
    """Every row the database holds for ``run_id``, table by table."""
    with sqlite3.connect(database) as connection:
        return {table: connection.execute(f"SELECT * FROM {table} WHERE run_id = ? "
                                          f"ORDER BY 2", (run_id,)).fetchall()
                for table in ("runs", "steps", "fan_outs", "branches")}


def test_history_lists_every_step_oldest_first_with_its_state_and_time(tmp_path):
    with line_graph().compile(checkpointer=SqliteCheckpointer(tmp_path / "runs.db")) as app:
        app.invoke({"n": 0}, config={"run_id": "r"})
        steps = app.history("r")
    assert all(isinstance(step, StepRecord) for step in steps)
    assert [(s.step, s.node) for s in steps] == [(0, START), (1, "a"), (2, "b"), (3, "c")]
    assert [s.state for s in steps] == [
        {"n": 0}, {"n": 1, "log": ["a"]}, {"n": 11, "log": ["a", "b"]},
        {"n": 111, "log": ["a", "b", "c"]}]
    times = [s.time for s in steps]
    assert times == sorted(times) and times[0] > 0
    step, node, state, _ = steps[2]  # a tuple as well
    assert (step, node, state["n"]) == (2, "b", 11)


def test_get_state_of_a_finished_run_has_its_final_state_and_nothing_next(tmp_path):
    with line_graph().compile(checkpointer=SqliteCheckpointer(tmp_path / "runs.db")) as app:
        final = app.invoke({"n": 0}, config={"run_id": "r"})
        state = app.get_state("r")
    assert isinstance(state, RunState)
    assert state == RunState(values=final, status=RunStatus.SUCCEEDED, next=(), interrupts=(),
                             step=3)


def test_get_state_of_a_failed_run_names_the_node_a_resume_runs_next(tmp_path):
    fail = [True]

    def b(state: dict) -> dict:
        if fail[0]:
            raise RuntimeError("b is down")
        return {"n": state["n"] + 10}

    graph = StateGraph(Counted)
    graph.add_node("a", _add(1, "a")).add_node("b", b).add_node("c", _add(100, "c"))
    graph.add_edge(START, "a").add_edge("a", "b").add_edge("b", "c").add_edge("c", END)
    with graph.compile(checkpointer=SqliteCheckpointer(tmp_path / "runs.db")) as app:
        with pytest.raises(GraphExecutionError):
            app.invoke({"n": 0}, config={"run_id": "r"})
        state = app.get_state("r")
        assert state.status is RunStatus.FAILED
        assert state.values == {"n": 1, "log": ["a"]}
        assert (state.next, state.step) == (("b",), 1)
        fail[0] = False
        app.resume("r")
        assert app.get_state("r").next == ()


def test_next_follows_the_conditions_the_recorded_state_meets(tmp_path):
    def stopped(state):
        raise KeyboardInterrupt  # stands for a kill at this node

    graph = StateGraph()
    graph.add_node("start", lambda s: None)
    graph.add_node("small", stopped).add_node("big", stopped)
    graph.add_edge(START, "start")
    graph.add_conditional_edges("start", lambda s: "big" if s["n"] > 5 else "small")
    graph.add_edge("small", END).add_edge("big", END)
    with graph.compile(checkpointer=SqliteCheckpointer(tmp_path / "runs.db")) as app:
        for run_id, n, expected in (("low", 1, "small"), ("high", 9, "big")):
            with pytest.raises(KeyboardInterrupt):
                app.invoke({"n": n}, config={"run_id": run_id})
            state = app.get_state(run_id)
            assert (state.status, state.next, state.step) == (
                RunStatus.INTERRUPTED, (expected,), 1)


def _fan_out_graph() -> StateGraph:
    graph = StateGraph()
    graph.add_node("split", lambda s: {"items": [1, 2, 3]})
    graph.add_node("x", lambda s: {"x": 1}).add_node("y", lambda s: {"y": 1})
    graph.add_node("z", lambda s: {"z": 1})
    graph.add_fan_in_node("join", lambda s, rs: {"joined": sorted(
        k for r in rs for k in r.state if k in "xyz")})
    graph.add_edge(START, "split")
    for name in "xyz":
        graph.add_parallel_edge("split", name, fan_in="join").add_edge(name, "join")
    graph.add_edge("join", END)
    return graph


def test_a_fan_out_under_way_has_its_unfinished_branches_next(tmp_path):
    with _fan_out_graph().compile(isolation="inline",
                                  checkpointer=SqliteCheckpointer(tmp_path / "runs.db")) as app:
        events = app.stream({}, config={"run_id": "r"})
        for event in events:
            if event["type"] == "branch":  # inline: branch x finished, y and z not
                break
        events.close()
        state = app.get_state("r")
        assert (state.status, state.step, state.next) == (RunStatus.INTERRUPTED, 1, ("y", "z"))
        app.resume("r")
        steps = app.history("r")
    assert [s.node for s in steps] == [START, "split", "join"]
    assert steps[-1].state["joined"] == ["x", "y", "z"], "a fan-in step shows the fan-in's state"


def test_a_map_fan_out_not_started_has_its_body_next_and_an_empty_one_its_fan_in(tmp_path):
    def build(items):
        graph = StateGraph()
        graph.add_node("split", lambda s: {"items": items})
        graph.add_node("work", lambda s: None)
        graph.add_fan_in_node("join", lambda s, rs: None)
        graph.add_edge(START, "split")
        graph.add_map_edge("split", "work", over="items", fan_in="join")
        graph.add_edge("work", "join").add_edge("join", END)
        return graph

    for items, expected in (([1, 2], ("work",)), ([], ("join",))):
        database = tmp_path / f"runs-{len(items)}.db"
        with build(items).compile(checkpointer=SqliteCheckpointer(database)) as app:
            app.invoke({}, config={"run_id": "r"})
            with sqlite3.connect(database) as connection:  # as if killed before the fan-out
                connection.execute("DELETE FROM steps WHERE node = 'join'")
                connection.execute("DELETE FROM fan_outs")
                connection.execute("DELETE FROM branches")
                connection.execute("UPDATE runs SET status = 'running'")
            assert app.get_state("r").next == expected


def _subgraph_graph(stop: list) -> StateGraph:
    def scored(state):
        if stop and stop[0] == "score":
            raise KeyboardInterrupt
        return {"score": len(state["text"])}

    inner = StateGraph()
    inner.add_node("read", lambda s: {"text": s["text"].upper()})
    inner.add_node("score", scored)
    inner.add_edge(START, "read").add_edge("read", "score").add_edge("score", END)
    outer = StateGraph()
    outer.add_node("prep", lambda s: {"text": "hello"})
    outer.add_node("review", inner, output={"score": "score", "loud": "text"})
    outer.add_node("after", lambda s: {"done": True})
    outer.add_edge(START, "prep").add_edge("prep", "review").add_edge("review", "after")
    outer.add_edge("after", END)
    return outer


def test_inner_steps_of_a_subgraph_appear_with_their_path_and_the_subgraphs_state(tmp_path):
    stop = ["score"]
    with _subgraph_graph(stop).compile(
            checkpointer=SqliteCheckpointer(tmp_path / "runs.db")) as app:
        with pytest.raises(KeyboardInterrupt):
            app.invoke({}, config={"run_id": "r"})
        state = app.get_state("r")
        assert state.next == ("review/score",)
        assert state.values == {"text": "hello"}, "the main path's state"
        stop.clear()
        app.resume("r")
        steps = app.history("r")
        assert app.get_state("r").next == ()
    assert [s.node for s in steps] == [START, "prep", "review/read", "review/score", "review",
                                       "after"]
    assert steps[2].state == {"text": "HELLO"}, "an inner step shows the subgraph's own state"
    assert steps[4].state == {"text": "hello", "score": 5, "loud": "HELLO"}


def test_next_leaves_a_finished_subgraph_for_the_node_after_it(tmp_path):
    with _subgraph_graph([]).compile(checkpointer=SqliteCheckpointer(tmp_path / "runs.db")
                                     ) as app:
        app.invoke({}, config={"run_id": "r"})
        with sqlite3.connect(tmp_path / "runs.db") as connection:  # killed after review/score
            connection.execute("DELETE FROM steps WHERE node IN ('review', 'after')")
            connection.execute("UPDATE runs SET status = 'running'")
        assert app.get_state("r").next == ("after",)


def test_an_unknown_run_is_an_error_naming_it_and_the_database(tmp_path):
    database = tmp_path / "runs.db"
    with line_graph().compile(checkpointer=SqliteCheckpointer(database)) as app:
        for call in (app.get_state, app.history, lambda run_id: app.fork(run_id, 0)):
            with pytest.raises(GraphError, match=r"run 'nope' in .*runs\.db.*no such run"):
                call("nope")
    with line_graph().compile() as app, pytest.raises(GraphError, match="needs a checkpointer"):
        app.get_state("r")


def test_a_fork_resumed_continues_from_the_step_with_the_update_merged(tmp_path):
    database = tmp_path / "runs.db"
    with line_graph().compile(checkpointer=SqliteCheckpointer(database)) as app:
        app.invoke({"n": 0}, config={"run_id": "r"})
        fork = app.fork("r", 1, {"n": 5, "log": ["edited"]})
        assert fork != "r"
        forked = app.get_state(fork)
        assert (forked.status, forked.step, forked.next) == (RunStatus.INTERRUPTED, 1, ("b",))
        assert forked.values == {"n": 5, "log": ["a", "edited"]}, "the reducer applies"
        final = app.resume(fork)
        assert [s.node for s in app.history(fork)] == [START, "a", "b", "c"]
    assert final == {"n": 115, "log": ["a", "edited", "b", "c"]}


def test_forking_and_resuming_the_fork_never_changes_the_original(tmp_path):
    database = tmp_path / "runs.db"
    with line_graph().compile(checkpointer=SqliteCheckpointer(database)) as app:
        app.invoke({"n": 0}, config={"run_id": "r"})
        before = _rows(database, "r")
        for step in (0, 2, 3):
            app.resume(app.fork("r", step, {"n": 1000}, new_run_id=f"f{step}"))
        assert app.history("f0")[0].state == {"n": 1000}, "step 0 forks the input"
        assert app.get_state("f3").values["n"] == 1000
    assert _rows(database, "r") == before


def test_fork_refuses_a_step_out_of_range_an_existing_id_and_a_bad_update(tmp_path):
    with line_graph().compile(checkpointer=SqliteCheckpointer(tmp_path / "runs.db")) as app:
        app.invoke({"n": 0}, config={"run_id": "r"})
        for step in (-1, 4, "1", True):
            with pytest.raises(GraphError, match=r"step .* is out of range: its steps are 0 "
                                                 r"\(the input\) to 3"):
                app.fork("r", step)
        with pytest.raises(RunExistsError, match="'r' already exists"):
            app.fork("r", 1, new_run_id="r")
        with pytest.raises(GraphError, match="update must be a dict"):
            app.fork("r", 1, ["n"])
        with pytest.raises(GraphError, match="cannot be merged after node 'a'"):
            app.fork("r", 1, {"log": 3})
        assert [run.run_id for run in app.checkpointer.list_runs()] == ["r"]


def test_a_fork_inside_a_subgraph_merges_into_the_subgraphs_state(tmp_path):
    with _subgraph_graph([]).compile(checkpointer=SqliteCheckpointer(tmp_path / "runs.db")
                                     ) as app:
        app.invoke({}, config={"run_id": "r"})
        assert app.history("r")[2].node == "review/read"
        final = app.resume(app.fork("r", 2, {"text": "HEY"}))
    assert final == {"text": "hello", "score": 3, "loud": "HEY", "done": True}


def _approval_map() -> StateGraph:
    """A map of 4 drafts; items 1 and 3 ask for approval in their branch's second node."""
    def check(state: dict) -> dict:
        if state["item"] % 2:
            return {"ok": interrupt({"item": state["item"]})}
        return {"ok": True}

    graph = StateGraph()
    graph.add_node("split", lambda s: {"items": [0, 1, 2, 3]})
    graph.add_node("draft", lambda s: {"draft": s["item"] * 10}).add_node("check", check)
    graph.add_fan_in_node("send", lambda s, rs: {"sent": [r.state["draft"] for r in rs
                                                          if r.state["ok"] is True]})
    graph.add_edge(START, "split")
    graph.add_map_edge("split", "draft", over="items", fan_in="send")
    graph.add_edge("draft", "check").add_edge("check", "send").add_edge("send", END)
    return graph


def test_get_state_of_a_paused_run_shows_its_interrupts_and_the_paused_nodes_next(tmp_path):
    graph = StateGraph()
    graph.add_node("draft", lambda s: {"text": "hi"})
    graph.add_node("approve", lambda s: {"ok": interrupt({"send": s["text"]})})
    graph.add_edge(START, "draft").add_edge("draft", "approve").add_edge("approve", END)
    with graph.compile(checkpointer=SqliteCheckpointer(tmp_path / "runs.db")) as app:
        app.invoke({}, config={"run_id": "r"})
        state = app.get_state("r")
        assert state == RunState(values={"text": "hi"}, status=RunStatus.INTERRUPTED,
                                 next=("approve",), step=1, interrupts=(
                                     Interrupt("approve", {"send": "hi"}, "approve", None),))
        # A fork from before the question asks it again: answers are the original's own.
        fork = app.fork("r", 1)
        assert app.resume("r", answer="yes") == {"text": "hi", "ok": "yes"}
        assert app.resume(fork)["__interrupt__"][0].id == "approve"
        assert [s.node for s in app.history("r")] == [START, "draft", "approve"]


def test_a_paused_fan_out_has_its_paused_branches_nodes_next(tmp_path):
    with _approval_map().compile(isolation="thread",
                                 checkpointer=SqliteCheckpointer(tmp_path / "runs.db")) as app:
        paused = app.invoke({}, config={"run_id": "r"})
        state = app.get_state("r")
        assert sorted(i.id for i in state.interrupts) == ["draft[1]/check", "draft[3]/check"]
        assert [i.id for i in state.interrupts] == [i.id for i in paused["__interrupt__"]]
        assert (state.next, state.step, state.values) == (("check",), 1,
                                                          {"items": [0, 1, 2, 3]})
        final = app.resume("r", answers={"draft[1]/check": True, "draft[3]/check": False})
        assert final["sent"] == [0, 10, 20]
        assert app.get_state("r").next == ()
        assert [s.node for s in app.history("r")] == [START, "split", "send"]


@pytest.mark.parametrize(("where", "expected_next", "expected_step"), [
    ("interrupt_before", ("b",), 1), ("interrupt_after", ("c",), 2)])
def test_a_breakpoint_has_the_node_after_the_pause_next(tmp_path, where, expected_next,
                                                        expected_step):
    with line_graph().compile(checkpointer=SqliteCheckpointer(tmp_path / "runs.db"),
                              **{where: ["b"]}) as app:
        app.invoke({"n": 0}, config={"run_id": "r"})
        state = app.get_state("r")
        assert (state.status, state.next, state.step) == (
            RunStatus.INTERRUPTED, expected_next, expected_step)
        assert [i.node for i in state.interrupts] == ["b"]
