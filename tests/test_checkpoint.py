"""SqliteCheckpointer: recording runs, resuming them, refusing what cannot be resumed."""

from __future__ import annotations

import math
import operator
import pickle
import sqlite3
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypedDict

import pytest

from conftest import frames_of, wait_until
from isobranch import END, START, GraphError, GraphExecutionError, SqliteCheckpointer, StateGraph
from isobranch.checkpoint import RunStatus
from isobranch.checkpoint.codec import encode_value

ITEMS = list(range(12))


class HeldBranch:
    """Holds the branch of map item ``item`` at the start of its node until ``release``.

    The items that fail wait until it is there, so it is still in its node
    when the fail_fast stop comes: a thread backend cannot stop a Python
    node, so the branch does all its work after its run has ended.
    ``thread`` is the ident of the thread it ran on.
    """

    def __init__(self, item: int) -> None:
        self.item = item
        self.inside = threading.Event()
        self.release = threading.Event()
        self.thread: int | None = None

    def hold(self) -> None:
        self.thread = threading.get_ident()
        self.inside.set()
        assert self.release.wait(60), "the test never released the held branch"

    def wait_inside(self) -> None:
        assert self.inside.wait(60), f"item {self.item}'s branch never started"

    def finished(self) -> bool:
        """Whether its thread is done with the branch: waiting for more work in its pool
        (so past reporting the result), or ended."""
        frames = frames_of(self.thread)
        return not frames or (frames[-1] == "wait" and "run_branch" not in frames)


def map_body(label: str, held: HeldBranch | None = None) -> Callable[[dict], dict]:
    """The map's body; each run of it leaves a mark in ``state["marks"]`` named by
    ``label``, fixed when the graph is built: a branch's executions are named by the
    compiled graph that ran them, even one that finishes after its run has ended
    (where a label read when the branch runs would name the moment instead). The same
    code whatever the label, so the graph's fingerprint is too."""

    def body(state: dict) -> dict:
        item = state["item"]
        marks = Path(state["marks"])
        fails = (marks.parent / f"fail-{item}").exists()
        if held is not None and item == held.item:
            held.hold()
        elif held is not None and fails:
            held.wait_inside()
        (marks / f"{item}.{label}.{uuid.uuid4().hex}").touch()
        if fails:
            raise RuntimeError(f"item {item} fails this time")
        return {"v": item * 10}

    return body


_body = map_body("first")


def _join(state: dict, results: list) -> dict:
    return {"values": [r.state.get("v") for r in results]}


def _after(state: dict) -> dict:
    return {"total": sum(state["values"])}


def map_graph(tmp_path: Path, *, body=_body, join=_join, after=_after,
              extra_edge: bool = False) -> StateGraph:
    graph = StateGraph()
    graph.add_node("start", lambda state: {"items": list(ITEMS)})
    graph.add_node("body", body)
    graph.add_fan_in_node("join", join)
    graph.add_node("after", after)
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "body", over="items", fan_in="join")
    graph.add_edge("body", "join")
    graph.add_edge("join", "after")
    if extra_edge:
        graph.add_node("extra", lambda state: None)
        graph.add_edge("after", "extra")
        graph.add_edge("extra", END)
    else:
        graph.add_edge("after", END)
    return graph


def executions(marks: Path, phase: str | None = None) -> list[int]:
    """Items whose branch ran (by a graph built with ``map_body(phase)``, or by any), once
    per run of it."""
    return sorted(int(path.name.split(".")[0]) for path in marks.iterdir()
                  if phase is None or path.name.split(".")[1] == phase)


@pytest.fixture
def marks(tmp_path: Path) -> Path:
    path = tmp_path / "marks"
    path.mkdir()
    return path


EXPECTED_VALUES = [i * 10 for i in ITEMS]


def test_a_generated_run_id_is_the_first_stream_event_and_the_run_is_listed(tmp_path, marks):
    checkpointer = SqliteCheckpointer(tmp_path / "runs.db")
    with map_graph(tmp_path).compile(isolation="inline", checkpointer=checkpointer) as app:
        events = list(app.stream({"marks": str(marks)}))
    assert events[0]["type"] == "run" and isinstance(events[0]["run_id"], str)
    run = checkpointer.get_run(events[0]["run_id"])
    assert run is not None and run.status is RunStatus.SUCCEEDED
    assert (run.branches_done, run.branches_total) == (len(ITEMS), len(ITEMS))
    assert run.duration is not None and run.duration >= 0
    assert [r.run_id for r in checkpointer.list_runs()] == [events[0]["run_id"]]


def test_a_failed_run_carries_its_run_id_and_is_recorded_failed(tmp_path, marks):
    (tmp_path / "fail-3").touch()
    checkpointer = SqliteCheckpointer(tmp_path / "runs.db")
    app = map_graph(tmp_path).compile(isolation="inline", fail_fast=True,
                                      checkpointer=checkpointer)
    with app, pytest.raises(GraphExecutionError) as caught:
        app.invoke({"marks": str(marks)}, config={"run_id": "nightly-1"})
    assert caught.value.run_id == "nightly-1"
    run = checkpointer.get_run("nightly-1")
    assert run.status is RunStatus.FAILED and "item 3 fails" in run.error


def _fail_then_resume(tmp_path: Path, marks: Path, isolation: str,
                      held: HeldBranch | None = None) -> None:
    """Items 3 and 7 fail the run under fail_fast; a resume finishes it and runs exactly
    the items the failed run did not report successful, once each."""
    for item in (3, 7):
        (tmp_path / f"fail-{item}").touch()
    checkpointer = SqliteCheckpointer(tmp_path / "runs.db")
    options = {"isolation": isolation, "max_workers": 2, "fail_fast": True,
               "checkpointer": checkpointer}
    with map_graph(tmp_path, body=map_body("first", held)).compile(**options) as app:
        with pytest.raises(GraphExecutionError) as caught:
            app.invoke({"marks": str(marks)}, config={"run_id": "r"})
        # What the run itself reported, not what the database under test holds.
        succeeded = {r.index for r in caught.value.results if r.success}
        assert succeeded and 3 not in succeeded, "the run got somewhere before item 3 failed"
        if held is not None:
            assert held.item not in succeeded, "the held branch was still in its node"
            held.release.set()
            # Back in the pool: the branch has finished and said so, after its run.
            assert wait_until(held.finished)
            assert held.item in executions(marks, "first"), "the held branch ran to its end"
        assert _recorded_successes(tmp_path / "runs.db", "r") == succeeded, (
            "what the run reported successful is recorded, and nothing else")
    for item in (3, 7):
        (tmp_path / f"fail-{item}").unlink()
    # Resumed by another build of the same graph, as another process would: its branches
    # mark their executions as the resume's, whenever the first run's branches end.
    with map_graph(tmp_path, body=map_body("resume")).compile(**options) as app:
        final = app.resume("r")
    # The state an uninterrupted run ends with, computed from the input.
    assert final == {"marks": str(marks), "items": ITEMS, "values": EXPECTED_VALUES,
                     "total": sum(EXPECTED_VALUES)}
    assert executions(marks, "resume") == sorted(set(ITEMS) - succeeded), (
        "exactly the items without a reported success ran again, once each")
    assert checkpointer.get_run("r").status is RunStatus.SUCCEEDED


@pytest.mark.parametrize("isolation", ["inline", "thread", "process"])
def test_resume_reruns_only_the_branches_without_a_recorded_success(tmp_path, marks, isolation,
                                                                    no_thread_leak):
    _fail_then_resume(tmp_path, marks, isolation)


def test_a_branch_still_in_its_node_at_a_fail_fast_stop_is_not_recorded_and_runs_again(
        tmp_path, marks, no_thread_leak):
    # The thread backend cannot stop a Python node: item 0's branch entered its node
    # before the stop and does all its work after the run raised. Its late success is
    # neither reported nor recorded, so the resume runs it again.
    _fail_then_resume(tmp_path, marks, "thread", held=HeldBranch(0))


def _recorded_successes(database: Path, run_id: str) -> set[int]:
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT position FROM branches WHERE run_id = ? AND "
                                  "success = 1", (run_id,)).fetchall()
    return {position for (position,) in rows}


def test_a_consumer_that_stops_reading_leaves_an_interrupted_run_that_resumes(tmp_path, marks,
                                                                             no_thread_leak):
    checkpointer = SqliteCheckpointer(tmp_path / "runs.db")
    with map_graph(tmp_path).compile(isolation="inline", checkpointer=checkpointer) as app:
        events = app.stream({"marks": str(marks)}, config={"run_id": "r"})
        seen = 0
        for event in events:
            seen += event["type"] == "branch"
            if seen == 5:
                break
        events.close()
        assert checkpointer.get_run("r").status is RunStatus.INTERRUPTED
        assert executions(marks) == list(range(5))
        final = app.resume("r")
    assert final["values"] == EXPECTED_VALUES
    assert executions(marks) == ITEMS, "no recorded branch ran twice"


def test_keyboard_interrupt_in_a_node_records_interrupted_then_resume_skips_done_steps(tmp_path):
    calls = {"first": 0, "second": 0}
    interrupt = [True]

    def first(state):
        calls["first"] += 1
        return {"a": 1}

    def second(state):
        calls["second"] += 1
        if interrupt[0]:
            raise KeyboardInterrupt
        return {"b": state["a"] + 1}

    graph = StateGraph()
    graph.add_node("first", first)
    graph.add_node("second", second)
    graph.add_edge(START, "first")
    graph.add_edge("first", "second")
    graph.add_edge("second", END)
    checkpointer = SqliteCheckpointer(tmp_path / "runs.db")
    with graph.compile(isolation="inline", checkpointer=checkpointer) as app:
        with pytest.raises(KeyboardInterrupt):
            app.invoke({"x": 0}, config={"run_id": "r"})
        assert checkpointer.get_run("r").status is RunStatus.INTERRUPTED
        interrupt[0] = False
        assert app.resume("r") == {"x": 0, "a": 1, "b": 2}
        assert calls == {"first": 1, "second": 2}
        assert app.resume("r") == {"x": 0, "a": 1, "b": 2}, "a succeeded run returns its state"
        assert calls == {"first": 1, "second": 2}, "and runs nothing"


def test_invoke_with_an_existing_run_id_is_refused_before_anything_runs(tmp_path, marks):
    checkpointer = SqliteCheckpointer(tmp_path / "runs.db")
    with map_graph(tmp_path).compile(isolation="inline", checkpointer=checkpointer) as app:
        app.invoke({"marks": str(marks)}, config={"run_id": "r"})
        ran = executions(marks)
        with pytest.raises(GraphError, match="run 'r' already exists"):
            app.invoke({"marks": str(marks)}, config={"run_id": "r"})
    assert executions(marks) == ran


def test_run_ids_need_a_checkpointer_and_must_be_usable(tmp_path, marks):
    with map_graph(tmp_path).compile(isolation="inline") as app:
        with pytest.raises(GraphError, match="run_id needs a checkpointer"):
            app.invoke({"marks": str(marks)}, config={"run_id": "r"})
        with pytest.raises(GraphError, match="needs a checkpointer"):
            app.resume("r")
    with map_graph(tmp_path).compile(isolation="inline",
                                     checkpointer=SqliteCheckpointer(tmp_path / "r.db")) as app:
        for bad in ("", "a\nb", 7):
            with pytest.raises(GraphError, match="run_id must be"):
                app.invoke({"marks": str(marks)}, config={"run_id": bad})
        with pytest.raises(GraphError, match="no such run"):
            app.resume("missing")
    with pytest.raises(GraphError, match="checkpointer must be a SqliteCheckpointer"):
        map_graph(tmp_path).compile(checkpointer="runs.db")


def test_a_changed_graph_is_refused_saying_what_changed_unless_forced(tmp_path, marks):
    (tmp_path / "fail-0").touch()
    checkpointer = SqliteCheckpointer(tmp_path / "runs.db")
    app = map_graph(tmp_path).compile(isolation="inline", fail_fast=True,
                                      checkpointer=checkpointer)
    with app, pytest.raises(GraphExecutionError):
        app.invoke({"marks": str(marks)}, config={"run_id": "r"})
    (tmp_path / "fail-0").unlink()

    def other_join(state, results):
        return {"values": [r.state.get("v") for r in results], "changed": True}

    changed = map_graph(tmp_path, join=other_join, extra_edge=True)
    with changed.compile(isolation="inline", checkpointer=checkpointer) as app:
        with pytest.raises(GraphError) as caught:
            app.resume("r")
        message = str(caught.value)
        assert "node 'join' changed" in message
        assert "node 'extra' added" in message and "edge after->extra added" in message
        assert "edge after->__end__ removed" in message
        assert "node 'body'" not in message
        final = app.resume("r", force=True)
    assert final["changed"] is True and final["values"] == EXPECTED_VALUES


def test_states_come_back_equal_through_the_database(tmp_path):
    odd = {"tuple": (1, (2, 3)), "bytes": b"\x00\xff", "set": {1, 2}, "frozen": frozenset("ab"),
           "int_keys": {1: "one", (2, 3): "pair"}, "inf": math.inf, "ninf": -math.inf,
           "nested": [{"x": (None, True)}], "$dollar": "key that looks like a tag"}
    interrupt = [True]

    def stop(state):
        if interrupt[0]:
            raise KeyboardInterrupt
        return {"seen": {key: state[key] for key in odd}, "nan_is_nan": math.isnan(state["nan"])}

    graph = StateGraph()
    graph.add_node("make", lambda state: {**odd, "nan": math.nan})
    graph.add_node("stop", stop)
    graph.add_edge(START, "make")
    graph.add_edge("make", "stop")
    graph.add_edge("stop", END)
    with graph.compile(isolation="inline",
                       checkpointer=SqliteCheckpointer(tmp_path / "runs.db")) as app:
        with pytest.raises(KeyboardInterrupt):
            app.invoke({}, config={"run_id": "r"})
        interrupt[0] = False
        final = app.resume("r")
    assert final["seen"] == odd and final["nan_is_nan"] is True


class Opaque:
    """A value JSON cannot hold."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque)

    def __hash__(self) -> int:
        return 1


def test_a_value_that_cannot_be_stored_fails_at_the_first_checkpoint_naming_its_path(tmp_path):
    graph = StateGraph()
    graph.add_node("make", lambda state: {"deep": {"list": [1, Opaque()]}})
    graph.add_node("later", lambda state: {"later": True})
    graph.add_edge(START, "make")
    graph.add_edge("make", "later")
    graph.add_edge("later", END)
    checkpointer = SqliteCheckpointer(tmp_path / "runs.db")
    app = graph.compile(isolation="inline", checkpointer=checkpointer)
    with app, pytest.raises(GraphExecutionError) as caught:
        app.invoke({}, config={"run_id": "r"})
    assert "node 'make'" in str(caught.value) and "['deep']['list'][1]" in str(caught.value)
    assert caught.value.node == "make" and caught.value.error_type == "StateEncodeError"
    assert checkpointer.get_run("r").status is RunStatus.FAILED
    with graph.compile(isolation="inline",
                       checkpointer=SqliteCheckpointer(tmp_path / "p.db", pickle=True)) as app:
        assert app.invoke({}, config={"run_id": "r"})["deep"]["list"][1] == Opaque()


def test_a_branch_result_that_cannot_be_stored_fails_the_run_naming_the_branch_and_its_path(
        tmp_path):
    # The other results are recorded all the same: a resume reruns none of them.
    opaque = {"on": True}  # item 2's result holds an Opaque on the first run only
    ran: list[int] = []

    def score(state):
        ran.append(state["item"])
        return {"value": Opaque() if state["item"] == 2 and opaque["on"] else state["item"]}

    graph = StateGraph()
    graph.add_node("split", lambda state: {"items": [0, 1, 2, 3]})
    graph.add_node("score", score)
    graph.add_fan_in_node("collect", lambda state, results: {
        "values": [r.state["value"] for r in results]})
    graph.add_edge(START, "split")
    graph.add_map_edge("split", "score", over="items", fan_in="collect")
    graph.add_edge("score", "collect")
    graph.add_edge("collect", END)
    checkpointer = SqliteCheckpointer(tmp_path / "runs.db")
    with graph.compile(isolation="inline", checkpointer=checkpointer) as app:
        with pytest.raises(GraphExecutionError) as caught:
            app.invoke({}, config={"run_id": "r"})
        assert "branch 'score[2]'" in str(caught.value)
        assert "['state']['value']" in str(caught.value)
        assert caught.value.error_type == "StateEncodeError"
        assert checkpointer.get_run("r").status is RunStatus.FAILED
        recorded = _recorded_successes(tmp_path / "runs.db", "r")
        # 3 may or may not have run before the run stopped; 0 and 1 ran before 2.
        assert {0, 1} <= recorded and 2 not in recorded
        opaque["on"], ran[:] = False, []
        assert app.resume("r")["values"] == [0, 1, 2, 3]
    assert sorted(ran) == sorted({0, 1, 2, 3} - recorded)
    checkpointer.close()


def test_a_tampered_database_cannot_run_code(tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    interrupt = [True]

    def stop(state):
        if interrupt[0]:
            raise KeyboardInterrupt
        return {}

    graph = StateGraph()
    graph.add_node("make", lambda state: {"a": 1})
    graph.add_node("stop", stop)
    graph.add_edge(START, "make")
    graph.add_edge("make", "stop")
    graph.add_edge("stop", END)
    database = tmp_path / "runs.db"
    with graph.compile(isolation="inline", checkpointer=SqliteCheckpointer(database)) as app:
        with pytest.raises(KeyboardInterrupt):
            app.invoke({}, config={"run_id": "r"})
        tampered = encode_value({"a": Payload()}, allow_pickle=True)
        with sqlite3.connect(database) as connection:
            connection.execute("UPDATE steps SET state = ? WHERE run_id = 'r'", (tampered,))
        interrupt[0] = False
        with pytest.raises(GraphError, match="unreadable"):
            app.resume("r")
    assert not marker.exists()


def test_runs_are_listed_and_deleted(tmp_path, marks):
    checkpointer = SqliteCheckpointer(tmp_path / "runs.db")
    with map_graph(tmp_path).compile(isolation="inline", checkpointer=checkpointer,
                                     name="demo") as app:
        for run_id in ("a", "b"):
            app.invoke({"marks": str(marks)}, config={"run_id": run_id})
    assert [(r.run_id, r.graph) for r in checkpointer.list_runs()] == [("a", "demo"),
                                                                        ("b", "demo")]
    assert checkpointer.delete_run("a") is True
    assert checkpointer.delete_run("a") is False
    assert [r.run_id for r in checkpointer.list_runs()] == ["b"]
    with sqlite3.connect(tmp_path / "runs.db") as connection:
        for table in ("steps", "branches", "fan_outs"):
            assert connection.execute(f"SELECT COUNT(*) FROM {table} WHERE run_id = 'a'"
                                      ).fetchone() == (0,)


def _inner(state: dict) -> dict:
    return {"leaf": state["item"]}


def test_only_main_path_steps_and_branches_are_recorded(tmp_path):
    inner = StateGraph()
    inner.add_node("split", lambda state: {"sub": [1, 2, 3]})
    inner.add_node("leaf", _inner)
    inner.add_fan_in_node("gather", lambda state, results: {"n": len(results)})
    inner.add_edge(START, "split")
    inner.add_map_edge("split", "leaf", over="sub", fan_in="gather")
    inner.add_edge("leaf", "gather")
    inner.add_edge("gather", END)
    graph = StateGraph()
    graph.add_node("start", lambda state: None)
    graph.add_node("left", lambda state: {"left": 1})
    graph.add_node("split", lambda state: {"sub": [1, 2, 3]})
    graph.add_node("leaf", _inner)
    graph.add_fan_in_node("gather", lambda state, results: {"n": len(results)})
    graph.add_fan_in_node("join", lambda state, results: {"branches": len(results)})
    graph.add_edge(START, "start")
    graph.add_parallel_edge("start", "left", fan_in="join")
    graph.add_parallel_edge("start", "split", fan_in="join")
    graph.add_edge("left", "join")
    graph.add_map_edge("split", "leaf", over="sub", fan_in="gather")  # nested in a branch
    graph.add_edge("leaf", "gather")
    graph.add_edge("gather", "join")
    graph.add_edge("join", END)
    checkpointer = SqliteCheckpointer(tmp_path / "runs.db")
    with graph.compile(isolation="thread", checkpointer=checkpointer) as app:
        assert app.invoke({}, config={"run_id": "r"})["branches"] == 2
    with sqlite3.connect(tmp_path / "runs.db") as connection:
        steps = connection.execute("SELECT node, kind FROM steps ORDER BY seq").fetchall()
        fan_outs = connection.execute("SELECT node, total FROM fan_outs").fetchall()
        branches = connection.execute("SELECT COUNT(*) FROM branches").fetchone()[0]
    assert steps == [("start", "node"), ("join", "fan_in")]
    assert fan_outs == [("start", 2)] and branches == 2
    run = checkpointer.get_run("r")
    assert (run.branches_done, run.branches_total) == (2, 2)


def test_a_database_that_is_not_sqlite_is_a_clear_error(tmp_path, marks):
    database = tmp_path / "runs.db"
    database.write_text("not a database at all, " * 100)
    app = map_graph(tmp_path).compile(isolation="inline",
                                      checkpointer=SqliteCheckpointer(database))
    with app, pytest.raises(GraphError, match=r"runs\.db.* is not usable"):
        app.invoke({"marks": str(marks)})


def test_the_checkpointer_pickles_without_its_connection(tmp_path):
    checkpointer = SqliteCheckpointer(tmp_path / "runs.db", pickle=True)
    assert checkpointer.list_runs() == []
    copy = pickle.loads(pickle.dumps(checkpointer))
    assert (copy.path, copy.pickle) == (checkpointer.path, True)
    assert copy.list_runs() == []
    checkpointer.close()
    copy.close()


def test_a_branch_result_that_cannot_be_stored_fails_the_run_naming_the_branch(tmp_path):
    graph = StateGraph()
    graph.add_node("start", lambda state: {"items": [1, 2, 3]})
    graph.add_node("body", lambda state: {"odd": Opaque()} if state["item"] == 2 else None)
    graph.add_fan_in_node("join", lambda state, results: {"n": len(results)})
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "body", over="items", fan_in="join")
    graph.add_edge("body", "join")
    graph.add_edge("join", END)
    checkpointer = SqliteCheckpointer(tmp_path / "runs.db")
    app = graph.compile(isolation="thread", checkpointer=checkpointer)
    with app, pytest.raises(GraphExecutionError) as caught:
        app.invoke({}, config={"run_id": "r"})
    assert caught.value.branch == "body[1]" and "['odd']" in str(caught.value)
    assert caught.value.run_id == "r"
    assert checkpointer.get_run("r").status is RunStatus.FAILED


def test_a_database_that_breaks_mid_run_fails_the_run_saying_so(tmp_path, marks, monkeypatch,
                                                                no_thread_leak):
    checkpointer = SqliteCheckpointer(tmp_path / "runs.db")

    def broken(rows):
        raise GraphError("checkpoint database 'runs.db' is not usable: disk I/O error")

    monkeypatch.setattr(checkpointer, "write_branches", broken)
    app = map_graph(tmp_path).compile(isolation="thread", checkpointer=checkpointer)
    with app, pytest.raises(GraphExecutionError) as caught:
        app.invoke({"marks": str(marks)}, config={"run_id": "r"})
    assert "run 'r': recording branch results failed" in str(caught.value)
    assert "disk I/O error" in str(caught.value) and caught.value.run_id == "r"
    assert checkpointer.get_run("r").status is RunStatus.FAILED


def test_resume_after_a_fan_in_step_reruns_neither_branches_nor_fan_in(tmp_path, marks):
    calls = {"join": 0, "after": 0}
    interrupt = [True]

    def join(state, results):
        calls["join"] += 1
        return _join(state, results)

    def after(state):
        calls["after"] += 1
        if interrupt[0]:
            raise KeyboardInterrupt
        return _after(state)

    graph = map_graph(tmp_path, join=join, after=after)
    checkpointer = SqliteCheckpointer(tmp_path / "runs.db")
    with graph.compile(isolation="inline", checkpointer=checkpointer) as app:
        with pytest.raises(KeyboardInterrupt):
            app.invoke({"marks": str(marks)}, config={"run_id": "r"})
        interrupt[0] = False
        final = app.resume("r")
    assert final["total"] == sum(EXPECTED_VALUES)
    assert calls == {"join": 1, "after": 2} and executions(marks) == ITEMS


def test_a_fan_out_run_again_in_a_loop_reuses_only_its_own_recorded_results(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()

    def body(state):
        (marks / f"{state['round']}-{state['item']}.{len(list(marks.iterdir()))}").touch()
        return {"v": state["item"] + 100 * state["round"]}

    graph = StateGraph()
    graph.add_node("start", lambda state: {"items": list(range(6)),
                                           "round": state.get("round", -1) + 1})
    graph.add_node("body", body)
    graph.add_fan_in_node("join", lambda state, results: {
        "seen": [*state.get("seen", []), [r.state["v"] for r in results]]})
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "body", over="items", fan_in="join")
    graph.add_edge("body", "join")
    graph.add_edge("join", "start", when=lambda state: state["round"] < 1)
    graph.add_edge("join", END, when=lambda state: state["round"] >= 1)
    checkpointer = SqliteCheckpointer(tmp_path / "runs.db")
    with graph.compile(isolation="inline", checkpointer=checkpointer) as app:
        events = app.stream({}, config={"run_id": "r"})
        branches = 0
        for event in events:
            branches += event["type"] == "branch"
            if branches == 8:  # two branches into the second round
                break
        events.close()
        final = app.resume("r")
    assert final["seen"] == [[0, 1, 2, 3, 4, 5], [100, 101, 102, 103, 104, 105]]
    ran = sorted(path.name.split(".")[0] for path in marks.iterdir())
    assert ran == sorted(f"{r}-{i}" for r in (0, 1) for i in range(6)), "each ran once"


def _slow_unless_released(state: dict) -> dict:
    marks = Path(state["marks"])
    (marks / f"{state['item']}.{uuid.uuid4().hex}").touch()
    if state["item"] >= 3 and not (marks.parent / "released").exists():
        import time

        time.sleep(60)  # until the cancellation kills this worker
    return {"v": state["item"] * 10}


def test_a_cancelled_ainvoke_is_recorded_interrupted_and_aresume_finishes_it(tmp_path, marks):
    import asyncio

    graph = map_graph(tmp_path, body=_slow_unless_released)
    checkpointer = SqliteCheckpointer(tmp_path / "runs.db")

    async def scenario(app):
        task = asyncio.create_task(app.ainvoke({"marks": str(marks)}, config={"run_id": "a"}))
        while True:  # until the three quick branches are recorded
            run = checkpointer.get_run("a")
            if run is not None and run.branches_done >= 3:
                break
            assert not task.done()
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert checkpointer.get_run("a").status is RunStatus.INTERRUPTED
        (tmp_path / "released").touch()
        return await app.aresume("a")

    with graph.compile(isolation="process", max_workers=2, max_concurrency=2,
                       checkpointer=checkpointer) as app:
        final = asyncio.run(scenario(app))
    assert final["values"] == EXPECTED_VALUES
    ran = executions(marks)
    assert [ran.count(item) for item in (0, 1, 2)] == [1, 1, 1], "recorded branches ran once"


def test_a_retried_branch_is_recorded_once_with_its_attempts_and_kept_on_resume(tmp_path, marks):
    from isobranch import RetryPolicy

    def body(state):
        flag = marks.parent / f"tried-{state['item']}"
        if state["item"] == 2 and not flag.exists():
            flag.touch()
            raise RuntimeError("first attempt fails")
        if state["item"] == 4 and not (marks.parent / "released").exists():
            raise KeyboardInterrupt  # stands for a kill while the map is under way
        (marks / f"{state['item']}.{uuid.uuid4().hex}").touch()
        return {"v": state["item"] * 10}

    graph = StateGraph()
    graph.add_node("start", lambda state: {"items": list(range(6))})
    graph.add_node("body", body)
    graph.add_fan_in_node("join", lambda state, results: {
        "values": [r.state["v"] for r in results], "attempts": [r.attempts for r in results]})
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "body", over="items", fan_in="join",
                       retry=RetryPolicy(max_attempts=2, initial_interval=0.0, jitter=False,
                                         retry_on=["RuntimeError"]))
    graph.add_edge("body", "join")
    graph.add_edge("join", END)
    checkpointer = SqliteCheckpointer(tmp_path / "runs.db")
    with graph.compile(isolation="inline", checkpointer=checkpointer) as app:
        with pytest.raises(KeyboardInterrupt):
            app.invoke({}, config={"run_id": "r"})
        assert _recorded_successes(tmp_path / "runs.db", "r") == {0, 1, 2, 3}
        (tmp_path / "released").touch()
        final = app.resume("r")
    assert final["values"] == [0, 10, 20, 30, 40, 50]
    assert final["attempts"] == [1, 1, 2, 1, 1, 1], "the recorded result keeps its attempts"
    assert executions(marks) == [0, 1, 2, 3, 4, 5]


class ReducerState(TypedDict, total=False):
    found: Annotated[list, operator.add]
    item: int


def test_a_resumed_map_folds_the_reducer_writes_of_recorded_branches_too(tmp_path, marks):
    def body(state):
        if state["item"] == 4 and not (marks.parent / "released").exists():
            raise KeyboardInterrupt
        (marks / f"{state['item']}.{uuid.uuid4().hex}").touch()
        return {"found": [state["item"] * 10]}

    graph = StateGraph(ReducerState)
    graph.add_node("start", lambda state: {"items": list(range(6))})
    graph.add_node("body", body)
    graph.add_fan_in_node("join", lambda state, results: None)
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "body", over="items", fan_in="join")
    graph.add_edge("body", "join")
    graph.add_edge("join", END)
    with graph.compile(isolation="inline",
                       checkpointer=SqliteCheckpointer(tmp_path / "runs.db")) as app:
        with pytest.raises(KeyboardInterrupt):
            app.invoke({}, config={"run_id": "r"})
        (tmp_path / "released").touch()
        final = app.resume("r")
        uninterrupted = app.invoke({})
    assert sorted(final["found"]) == [0, 10, 20, 30, 40, 50]
    assert final["found"] == uninterrupted["found"]
    assert executions(marks).count(0) == 2, "item 0 ran once in the run, once uninterrupted"
