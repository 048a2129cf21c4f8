"""interrupt() on the main path: pausing, the recorded pause, resuming with answers."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from isobranch import (
    END,
    START,
    GraphError,
    GraphExecutionError,
    Interrupt,
    SqliteCheckpointer,
    StateGraph,
    YAMLEngine,
    interrupt,
)
from isobranch.checkpoint import RunStatus


def _ran(marks: Path, node: str) -> int:
    """How many times ``node`` started (each start appends one mark)."""
    path = marks / node
    return len(path.read_text()) if path.exists() else 0


def _mark(state: dict, node: str) -> None:
    with open(Path(state["marks"]) / node, "a") as file:
        file.write("x")


def _draft(state: dict) -> dict:
    _mark(state, "draft")
    return {"draft": "hello"}


def _approve(state: dict) -> dict:
    _mark(state, "approve")
    state["touched"] = True  # changed in place before the pause: never part of the pause
    first = interrupt({"question": "send it?", "draft": state["draft"]})
    second = interrupt("really?")
    return {"first": first, "second": second}


def _send(state: dict) -> dict:
    _mark(state, "send")
    return {"sent": state["first"] == "yes"}


def approval_graph(approve=_approve) -> StateGraph:
    graph = StateGraph()
    graph.add_node("draft", _draft)
    graph.add_node("approve", approve)
    graph.add_node("send", _send)
    graph.add_edge(START, "draft")
    graph.add_edge("draft", "approve")
    graph.add_edge("approve", "send")
    graph.add_edge("send", END)
    return graph


@pytest.fixture
def marks(tmp_path: Path) -> Path:
    path = tmp_path / "marks"
    path.mkdir()
    return path


def test_invoke_returns_the_state_as_of_the_pause_with_its_interrupt(tmp_path, marks):
    store = SqliteCheckpointer(tmp_path / "runs.db")
    with approval_graph().compile(checkpointer=store) as app:
        out = app.invoke({"marks": str(marks)}, config={"run_id": "r1"})
    assert out == {"marks": str(marks), "draft": "hello", "__interrupt__": [Interrupt(
        "approve", {"question": "send it?", "draft": "hello"}, "approve", None)]}
    assert store.get_run("r1").status is RunStatus.INTERRUPTED
    assert store.pending_interrupts("r1") == out["__interrupt__"]
    assert (_ran(marks, "draft"), _ran(marks, "approve"), _ran(marks, "send")) == (1, 1, 0)


def test_each_call_gets_its_own_answer_across_resumes_and_earlier_nodes_never_rerun(
        tmp_path, marks):
    store = SqliteCheckpointer(tmp_path / "runs.db")
    with approval_graph().compile(checkpointer=store) as app:
        app.invoke({"marks": str(marks)}, config={"run_id": "r1"})
        second = app.resume("r1", answer="yes")
        assert second["__interrupt__"] == [Interrupt("approve#2", "really?", "approve", None)]
        assert store.pending_interrupts("r1") == second["__interrupt__"]
        final = app.resume("r1", answers={"approve#2": 42})
    assert final == {"marks": str(marks), "draft": "hello", "touched": True, "first": "yes",
                     "second": 42, "sent": True}
    assert store.get_run("r1").status is RunStatus.SUCCEEDED
    assert store.pending_interrupts("r1") == []
    # The interrupted node reruns from its start on each resume; nothing before it does.
    assert (_ran(marks, "draft"), _ran(marks, "approve"), _ran(marks, "send")) == (1, 3, 1)


def test_stream_ends_with_the_interrupt_event(tmp_path, marks):
    with approval_graph().compile(checkpointer=SqliteCheckpointer(tmp_path / "r.db")) as app:
        events = list(app.stream({"marks": str(marks)}, config={"run_id": "r1"}))
        assert [e["type"] for e in events] == ["run", "node", "interrupt"]
        assert events[-1]["interrupts"] == [Interrupt(
            "approve", {"question": "send it?", "draft": "hello"}, "approve", None)]
        updates = list(app.resume_stream("r1", answer="yes", mode="updates"))
    assert updates[-1] == {"type": "interrupt",
                           "interrupts": [Interrupt("approve#2", "really?", "approve", None)]}


def test_answers_that_do_not_fit_what_the_run_waits_for_are_graph_errors(tmp_path, marks):
    with approval_graph().compile(checkpointer=SqliteCheckpointer(tmp_path / "r.db")) as app:
        app.invoke({"marks": str(marks)}, config={"run_id": "r1"})
        with pytest.raises(GraphError, match="waits for an answer to 'approve'"):
            app.resume("r1")
        with pytest.raises(GraphError, match="no pending interrupt has the id 'approve#2'"):
            app.resume("r1", answers={"approve#2": 1})
        with pytest.raises(GraphError, match="answer= or answers=, not both"):
            app.resume("r1", answer=1, answers={"approve": 1})
        # Nothing ran and the run still waits.
        assert _ran(marks, "approve") == 1
        assert app.checkpointer.get_run("r1").status is RunStatus.INTERRUPTED


def test_answer_needs_exactly_one_pending_interrupt(tmp_path, marks):
    def both(state: dict) -> dict:
        return {}

    graph = StateGraph()
    graph.add_node("start", lambda state: {"items": [1, 2]})
    graph.add_node("ask", lambda state: {"a": interrupt(state["item"])})
    graph.add_fan_in_node("join", lambda state, results: {"n": len(results)})
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "ask", over="items", fan_in="join")
    graph.add_edge("ask", "join")
    graph.add_edge("join", END)
    with graph.compile(isolation="inline",
                       checkpointer=SqliteCheckpointer(tmp_path / "r.db")) as app:
        out = app.invoke({}, config={"run_id": "r1"})
        assert [i.id for i in out["__interrupt__"]] == ["ask[0]", "ask[1]"]
        with pytest.raises(GraphError, match=r"2 interrupts \('ask\[0\]', 'ask\[1\]'\); "
                                              r"answer them with answers="):
            app.resume("r1", answer="x")


def test_without_a_checkpointer_interrupt_fails_the_run_naming_the_node(marks):
    with approval_graph().compile() as app, pytest.raises(GraphExecutionError) as caught:
        app.invoke({"marks": str(marks)})
    assert caught.value.node == "approve"
    assert "needs a checkpointer" in str(caught.value)
    assert caught.value.error_type == "InterruptUnavailable"


def test_async_nodes_pause_each_under_its_own_id(tmp_path):
    async def ask(state: dict) -> dict:
        await asyncio.sleep(0)
        return {"answer": interrupt("name?")}

    async def confirm(state: dict) -> dict:
        await asyncio.sleep(0)
        return {"confirmed": interrupt(f"{state['answer']}?")}

    graph = StateGraph()
    graph.add_node("ask", ask).add_node("confirm", confirm)
    graph.add_edge(START, "ask").add_edge("ask", "confirm").add_edge("confirm", END)
    with graph.compile(checkpointer=SqliteCheckpointer(tmp_path / "r.db")) as app:
        assert app.invoke({}, config={"run_id": "a"})["__interrupt__"] == [
            Interrupt("ask", "name?", "ask")]
        # Both async nodes run in one run here: each awaits under its own node's scope.
        assert app.resume("a", answer="Ada")["__interrupt__"] == [
            Interrupt("confirm", "Ada?", "confirm")]
        assert app.resume("a", answer=True) == {"answer": "Ada", "confirmed": True}


def test_aresume_takes_the_answers(tmp_path, marks):
    async def main(app) -> tuple[dict, dict]:
        await app.ainvoke({"marks": str(marks)}, config={"run_id": "r1"})
        paused = await app.aresume("r1", answer="yes")
        return paused, await app.aresume("r1", answers={"approve#2": "sure"})

    with approval_graph().compile(checkpointer=SqliteCheckpointer(tmp_path / "r.db")) as app:
        paused, final = asyncio.run(main(app))
    assert [i.id for i in paused["__interrupt__"]] == ["approve#2"]
    assert final["second"] == "sure" and final["sent"] is True


def test_a_node_that_catches_exceptions_still_pauses(tmp_path):
    def stubborn(state: dict) -> dict:
        try:
            answer = interrupt("go?")
        except Exception:  # the pause is no Exception: this never runs
            return {"answer": "swallowed"}
        return {"answer": answer}

    def bare(state: dict) -> dict:
        with contextlib.suppress(BaseException):  # swallows even the pause: it pauses anyway
            interrupt("go?")
        return {"answer": "swallowed"}

    for fn in (stubborn, bare):
        graph = StateGraph()
        graph.add_node("ask", fn)
        graph.add_edge(START, "ask")
        graph.add_edge("ask", END)
        with graph.compile(checkpointer=SqliteCheckpointer(tmp_path / f"{fn.__name__}.db")
                           ) as app:
            out = app.invoke({}, config={"run_id": "s"})
            assert [i.id for i in out["__interrupt__"]] == ["ask"], fn.__name__
            assert "answer" not in out


def test_a_value_the_checkpoint_cannot_store_fails_the_run_naming_the_node(tmp_path):
    graph = StateGraph()
    graph.add_node("ask", lambda state: {"a": interrupt(object())})
    graph.add_edge(START, "ask")
    graph.add_edge("ask", END)
    store = SqliteCheckpointer(tmp_path / "r.db")
    with graph.compile(checkpointer=store) as app, pytest.raises(GraphExecutionError) as caught:
        app.invoke({}, config={"run_id": "v"})
    assert caught.value.node == "ask" and caught.value.run_id == "v"
    assert "interrupt 'ask'" in str(caught.value)
    assert store.get_run("v").status is RunStatus.FAILED


def test_interrupt_outside_a_node_is_a_runtime_error():
    with pytest.raises(RuntimeError, match="outside a node"):
        interrupt("hello?")


def test_answered_interrupts_return_their_answer_and_a_retried_node_pauses(tmp_path):
    attempts = []

    def flaky(state: dict) -> dict:
        attempts.append(1)
        answer = interrupt("ok?")
        if len(attempts) < 3:
            raise RuntimeError("try again")
        return {"answer": answer}

    graph = StateGraph()
    graph.add_node("ask", flaky, retry={"max_attempts": 3, "initial_interval": 0.001})
    graph.add_edge(START, "ask")
    graph.add_edge("ask", END)
    with graph.compile(checkpointer=SqliteCheckpointer(tmp_path / "r.db")) as app:
        out = app.invoke({}, config={"run_id": "t"})
        assert [i.id for i in out["__interrupt__"]] == ["ask"] and len(attempts) == 1
        assert app.resume("t", answer="yes") == {"answer": "yes"}
    assert len(attempts) == 3


LUA_ASKING = {
    "nodes": [
        {"name": "start", "run": "return {'items': [1, 2, 3]}"},
        {"name": "ask", "language": "lua",
         "run": "if state.item ~= 2 then return {got = state.item} end\n"
                "local first = interrupt({question = 'ok?', item = state.item})\n"
                "local ok = pcall(interrupt, 'swallowed?')  -- a pause pcall cannot keep\n"
                "return {got = first}"},
        {"name": "join", "fan_in": True,
         "run": "return {'got': [r.state.get('got') for r in parallel_results]}"},
    ],
    "edges": [{"from": "__start__", "to": "start"},
              {"from": "start", "to": "ask", "type": "map", "over": "items", "fan_in": "join"},
              {"from": "ask", "to": "join"}, {"from": "join", "to": "__end__"}],
}


@pytest.mark.parametrize("isolation", ["inline", "process"])
def test_lua_nodes_have_the_global_interrupt(tmp_path, isolation):
    engine = YAMLEngine(isolation=isolation, checkpointer=SqliteCheckpointer(tmp_path / "r.db"))
    with engine.load_from_dict(LUA_ASKING) as app:
        first = app.invoke({}, config={"run_id": "lua"})
        assert first["__interrupt__"] == [
            Interrupt("ask[1]", {"question": "ok?", "item": 2}, "ask", "ask[1]")]
        second = app.resume("lua", answer={"yes": [1, 2]})
        assert [(i.id, i.value) for i in second["__interrupt__"]] == [("ask[1]#2", "swallowed?")]
        final = app.resume("lua", answer=None)
    assert final["got"] == [1, {"yes": [1, 2]}, 3]


def test_a_lua_node_without_a_checkpointer_fails_naming_the_node():
    with YAMLEngine(isolation="inline").load_from_dict(LUA_ASKING) as app:
        events = list(app.stream({}))
    # The branch failed (failures are data), naming its node; its siblings went on.
    results = next(e["branches"] for e in events if e["type"] == "parallel")
    failed = [(r.branch, r.node, r.error_type) for r in results if not r.success]
    assert failed == [("ask[1]", "ask", "InterruptUnavailable")]
    assert "interrupt() needs a checkpointer" in results[1].error, results[1].error
    assert events[-1]["state"]["got"] == [1, None, 3]


def test_lua_code_outside_a_run_has_no_interrupt_global():
    from isobranch import LuaRuntime, LuaRuntimeError

    with LuaRuntime() as runtime, pytest.raises(LuaRuntimeError, match="interrupt"):
        runtime.execute_node_code("return interrupt(1)")


YAML_PYTHON_ASKING = {
    "nodes": [{"name": "approve",
               "run": "return {'approved': interrupt({'question': 'send it?'}) == 'yes'}"}],
    "edges": [{"from": "__start__", "to": "approve"}],
}


def test_yaml_python_code_has_the_global_interrupt_without_an_import(tmp_path, isolation):
    engine = YAMLEngine(isolation=isolation, checkpointer=SqliteCheckpointer(tmp_path / "r.db"))
    with engine.load_from_dict(YAML_PYTHON_ASKING) as app:
        first = app.invoke({}, config={"run_id": "py"})
        assert first["__interrupt__"] == [
            Interrupt("approve", {"question": "send it?"}, "approve", None)]
        final = app.resume("py", answer="yes")
    assert final == {"approved": True}
