"""Checkpoints of subgraph nodes: inner steps recorded under their path, resumed inside, fingerprinted."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import plain_environment
from isobranch import END, START, GraphError, GraphExecutionError, SqliteCheckpointer, StateGraph
from isobranch.checkpoint import RunStatus

AGENT = Path(__file__).with_name("subgraph_agents.py")


def executions(marks: Path) -> Counter:
    """How many times each node path ran (``review/b``), from the marks the nodes left."""
    return Counter(path.name.rsplit(".", 1)[0].replace(".", "/") for path in marks.iterdir()
                   if not path.name.startswith("kill"))


def run_agent(tmp_path: Path, database: Path, marks: Path, result: Path
              ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(AGENT), str(database), "r", str(marks),
                           str(result)], env=plain_environment(), capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)


def test_a_run_killed_inside_a_subgraph_resumes_after_its_last_recorded_inner_step(tmp_path):
    reference_marks, marks = tmp_path / "reference-marks", tmp_path / "marks"
    reference_marks.mkdir()
    marks.mkdir()
    done = run_agent(tmp_path, tmp_path / "reference.db", reference_marks, tmp_path / "ref.json")
    assert done.returncode == 0, done.stderr
    (marks / "kill-b").touch()
    killed = run_agent(tmp_path, tmp_path / "runs.db", marks, tmp_path / "final.json")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert executions(marks) == {"prep": 1, "review/a": 1, "review/b": 1}
    with sqlite3.connect(tmp_path / "runs.db") as connection:
        recorded = [node for (node,) in connection.execute(
            "SELECT node FROM steps WHERE run_id = 'r' ORDER BY seq")]
    assert recorded == ["prep", "review/a"], "the inner step is recorded under its path"

    resumed = run_agent(tmp_path, tmp_path / "runs.db", marks, tmp_path / "final.json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((tmp_path / "final.json").read_text()) == {
        **json.loads((tmp_path / "ref.json").read_text()), "marks": str(marks)}
    # Neither prep nor the subgraph's first step ran again: the run went on inside it.
    assert executions(marks) == {"prep": 1, "review/a": 1, "review/b": 2, "review/c": 1,
                                 "after": 1}


def counting(name: str, calls: Counter, update=None, *, stop: list | None = None):
    def node(state: dict) -> dict | None:
        calls[name] += 1
        if stop and stop[0] == name:
            raise KeyboardInterrupt  # stands for a kill at this step
        return update(state) if update else None
    return node


def _add_y(state: dict) -> dict:
    return {"path": [*state["path"], "y"]}


def _add_capital_y(state: dict) -> dict:
    return {"path": [*state["path"], "Y"]}


def nested_graph(calls: Counter, stop: list, y=None) -> StateGraph:
    """``outer``: ``first`` -> ``sub`` (``x`` -> ``deep`` (``y`` -> ``z``)) -> ``last``.

    ``y`` replaces inner node ``y`` (which then counts no calls).
    """
    deep = StateGraph()
    deep.add_node("y", y or counting("sub/deep/y", calls, _add_y))
    deep.add_node("z", counting("sub/deep/z", calls, lambda s: {"path": [*s["path"], "z"]},
                                stop=stop))
    deep.add_edge(START, "y").add_edge("y", "z").add_edge("z", END)
    sub = StateGraph()
    sub.add_node("x", counting("sub/x", calls, lambda s: {"path": [*s["path"], "x"]}))
    sub.add_node("deep", deep, output={"path": "path"})
    sub.add_edge(START, "x").add_edge("x", "deep").add_edge("deep", END)
    outer = StateGraph()
    outer.add_node("first", counting("first", calls, lambda s: {"path": ["first"]}))
    outer.add_node("sub", sub, input={"path": "path"}, output={"sub_path": "path"})
    outer.add_node("last", counting("last", calls, lambda s: {"n": len(s["sub_path"])}))
    outer.add_edge(START, "first").add_edge("first", "sub").add_edge("sub", "last")
    outer.add_edge("last", END)
    return outer


def test_resume_continues_inside_a_subgraph_nested_in_a_subgraph(tmp_path):
    calls, stop = Counter(), ["sub/deep/z"]
    checkpointer = SqliteCheckpointer(tmp_path / "runs.db")
    with nested_graph(calls, stop).compile(isolation="inline", checkpointer=checkpointer) as app:
        with pytest.raises(KeyboardInterrupt):
            app.invoke({}, config={"run_id": "r"})
        assert checkpointer.get_run("r").status is RunStatus.INTERRUPTED
        stop[0] = None
        final = app.resume("r")
    assert final == {"path": ["first"], "sub_path": ["first", "x", "y", "z"], "n": 4}
    assert calls == {"first": 1, "sub/x": 1, "sub/deep/y": 1, "sub/deep/z": 2, "last": 1}


def test_a_resumed_fan_out_inside_a_subgraph_reruns_only_its_unrecorded_branches(tmp_path):
    calls: Counter = Counter()
    failing = {3}

    def work(state):
        calls[state["item"]] += 1
        if state["item"] in failing:
            raise RuntimeError(f"item {state['item']} fails")
        return {"v": state["item"] * 2}

    inner = StateGraph()
    inner.add_node("split", lambda s: {"items": list(range(6))})
    inner.add_node("work", work)
    inner.add_fan_in_node("gather", lambda s, rs: {"values": [r.state["v"] for r in rs]})
    inner.add_edge(START, "split")
    inner.add_map_edge("split", "work", over="items", fan_in="gather")
    inner.add_edge("work", "gather").add_edge("gather", END)
    outer = StateGraph()
    outer.add_node("sub", inner, output={"values": "values"})
    outer.set_entry_point("sub").set_finish_point("sub")
    checkpointer = SqliteCheckpointer(tmp_path / "runs.db")
    with outer.compile(isolation="inline", fail_fast=True, checkpointer=checkpointer) as app:
        events = []
        with pytest.raises(GraphExecutionError) as caught:
            for event in app.stream({}, config={"run_id": "r"}):
                events.append(event)
        assert caught.value.branch == "sub/work[3]"
        assert "fan-out from node 'sub/split': branch 'sub/work[3]' failed" in str(caught.value)
        assert "node 'work' in branch 'sub/work[3]' failed: RuntimeError" in str(caught.value)
        branches = [e for e in events if e["type"] == "branch"]
        assert [e["branch"] for e in branches] == ["sub/work[0]", "sub/work[1]", "sub/work[2]",
                                                   "sub/work[3]"]
        assert {e["fan_out"] for e in branches} == {"sub/split"}
        failing.clear()
        assert app.resume("r") == {"values": [0, 2, 4, 6, 8, 10]}
    assert calls == {0: 1, 1: 1, 2: 1, 3: 2, 4: 1, 5: 1}


def test_changing_an_inner_node_makes_resume_name_it(tmp_path):
    calls, stop = Counter(), ["sub/deep/z"]
    checkpointer = SqliteCheckpointer(tmp_path / "runs.db")
    app = nested_graph(calls, stop, y=_add_y).compile(isolation="inline",
                                                      checkpointer=checkpointer)
    with app, pytest.raises(KeyboardInterrupt):
        app.invoke({}, config={"run_id": "r"})
    changed = nested_graph(calls, [None], y=_add_capital_y)
    app = changed.compile(isolation="inline", checkpointer=checkpointer)
    with app, pytest.raises(GraphError) as caught:
        app.resume("r")
    assert "node 'sub/deep/y' changed" in str(caught.value)
    assert "node 'sub/x'" not in str(caught.value) and "node 'first'" not in str(caught.value)


def test_a_subgraph_in_a_branch_is_part_of_the_branch_and_not_recorded_on_its_own(tmp_path):
    inner = StateGraph()
    inner.add_node("double", lambda s: {"v": s["item"] * 2})
    inner.set_entry_point("double").set_finish_point("double")
    outer = StateGraph()
    outer.add_node("split", lambda s: {"items": [1, 2, 3]})
    outer.add_node("sub", inner)
    outer.add_fan_in_node("gather", lambda s, rs: {"values": [r.state["v"] for r in rs]})
    outer.add_edge(START, "split")
    outer.add_map_edge("split", "sub", over="items", fan_in="gather")
    outer.add_edge("sub", "gather").add_edge("gather", END)
    checkpointer = SqliteCheckpointer(tmp_path / "runs.db")
    with outer.compile(isolation="inline", checkpointer=checkpointer) as app:
        assert app.invoke({}, config={"run_id": "r"})["values"] == [2, 4, 6]
    with sqlite3.connect(tmp_path / "runs.db") as connection:
        steps = [node for (node,) in connection.execute("SELECT node FROM steps ORDER BY seq")]
        branches = connection.execute("SELECT COUNT(*) FROM branches").fetchone()[0]
    assert steps == ["split", "gather"] and branches == 3
