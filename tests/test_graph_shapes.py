"""Graph shapes that must run to their end: a fan-in node that fans out again,
on the main path and inside a branch, with a checkpointer and resume.

Issue 21: a fan-in node with ``parallel`` edges ended the run after it ran
(inside a branch, the branch stopped there and counted as a success). The
differential test (test_shapes_differential.py) covers the whole class;
these pin the reported shapes down one by one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from isobranch import GraphExecutionError, SqliteCheckpointer, YAMLEngine

# The three backends the report names; each runs every shape below.
SHAPE_BACKENDS = ["inline", "thread", "process"]


def _traced(name: str) -> dict:
    return {"name": name, "run": f"return {{'trace': state.get('trace', []) + [{name!r}]}}\n"}


def _fan_in(name: str) -> dict:
    # Records what each branch did, so a cut-off branch shows in the final state.
    return {"name": name, "fan_in": True, "run": (
        f"return {{'trace': state.get('trace', []) + [{name!r}],\n"
        f"        {name!r}: [[r.branch, r.success, r.state.get('trace')]"
        f" for r in parallel_results]}}\n")}


def _parallel(source: str, targets: list[str], fan_in: str) -> list[dict]:
    return [{"from": source, "to": target, "type": "parallel", "fan_in": fan_in}
            for target in targets]


# a -> (b1, b2) -> join1 -> (c1, c2) -> join2 -> last: no node between the fan-outs.
TWO_FAN_OUTS = {
    "name": "fan-in-fans-out",
    "nodes": [_traced("a"), _traced("b1"), _traced("b2"), _fan_in("join1"),
              _traced("c1"), _traced("c2"), _fan_in("join2"), _traced("last")],
    "edges": [{"from": "__start__", "to": "a"}, *_parallel("a", ["b1", "b2"], "join1"),
              {"from": "b1", "to": "join1"}, {"from": "b2", "to": "join1"},
              *_parallel("join1", ["c1", "c2"], "join2"),
              {"from": "c1", "to": "join2"}, {"from": "c2", "to": "join2"},
              {"from": "join2", "to": "last"}],
}

# The same shape inside branch p of an outer fan-out from start; q is a plain sibling.
NESTED = {
    "name": "fan-in-fans-out-in-a-branch",
    "nodes": [_traced("start"), _traced("p"), _traced("b1"), _traced("b2"), _fan_in("join1"),
              _traced("c1"), _traced("c2"), _fan_in("join2"), _traced("q"), _fan_in("outer"),
              _traced("last")],
    "edges": [{"from": "__start__", "to": "start"}, *_parallel("start", ["p", "q"], "outer"),
              *_parallel("p", ["b1", "b2"], "join1"),
              {"from": "b1", "to": "join1"}, {"from": "b2", "to": "join1"},
              *_parallel("join1", ["c1", "c2"], "join2"),
              {"from": "c1", "to": "join2"}, {"from": "c2", "to": "join2"},
              {"from": "join2", "to": "outer"}, {"from": "q", "to": "outer"},
              {"from": "outer", "to": "last"}],
}


@pytest.fixture(params=SHAPE_BACKENDS)
def shape_isolation(request: pytest.FixtureRequest) -> str:
    return request.param


def test_a_fan_in_node_with_parallel_edges_starts_the_next_fan_out(shape_isolation):
    with YAMLEngine(isolation=shape_isolation).load_from_dict(TWO_FAN_OUTS) as graph:
        final = graph.invoke({})
    assert final["trace"] == ["a", "join1", "join2", "last"]
    # Each fan-in node sees the state before its own fan-out.
    assert final["join2"] == [["c1", True, ["a", "join1", "c1"]],
                              ["c2", True, ["a", "join1", "c2"]]]


def test_a_fan_in_node_with_a_map_edge_starts_the_map(shape_isolation):
    document = {
        "name": "fan-in-maps",
        "nodes": [_traced("a"), _traced("b1"), _traced("b2"),
                  {"name": "join1", "fan_in": True,
                   "run": "return {'trace': state['trace'] + ['join1'], "
                          "'items': [r.branch for r in parallel_results]}\n"},
                  {"name": "each", "run": "return {'seen': (state['index'], state['item'])}\n"},
                  {"name": "join2", "fan_in": True,
                   "run": "return {'trace': state['trace'] + ['join2'], "
                          "'seen': [r.state['seen'] for r in parallel_results]}\n"},
                  _traced("last")],
        "edges": [{"from": "__start__", "to": "a"}, *_parallel("a", ["b1", "b2"], "join1"),
                  {"from": "b1", "to": "join1"}, {"from": "b2", "to": "join1"},
                  {"from": "join1", "to": "each", "type": "map", "over": "items",
                   "fan_in": "join2"},
                  {"from": "each", "to": "join2"}, {"from": "join2", "to": "last"}],
    }
    with YAMLEngine(isolation=shape_isolation).load_from_dict(document) as graph:
        final = graph.invoke({})
    assert final["trace"] == ["a", "join1", "join2", "last"]
    assert final["seen"] == [(0, "b1"), (1, "b2")]


def test_a_branch_whose_fan_in_node_fans_out_runs_to_its_own_end(shape_isolation):
    with YAMLEngine(isolation=shape_isolation).load_from_dict(NESTED) as graph:
        final = graph.invoke({})
    assert final["trace"] == ["start", "outer", "last"]
    assert final["outer"] == [["p", True, ["start", "p", "join1", "join2"]],
                              ["q", True, ["start", "q"]]]


@pytest.mark.timeout(60)  # the bug this pins down is a run that never ends
def test_fan_in_nodes_that_fan_out_to_each_other_stop_at_max_steps():
    # join1 fans out to join2's branch and join2 to join1's: no plain node on
    # the main path, so only counting fan-in nodes as steps ends the loop.
    document = {
        "name": "fan-in-cycle",
        "nodes": [_traced("a"), _traced("x"), _fan_in("join1"), _traced("y"), _fan_in("join2")],
        "edges": [{"from": "__start__", "to": "a"}, *_parallel("a", ["x"], "join1"),
                  {"from": "x", "to": "join1"}, *_parallel("join1", ["y"], "join2"),
                  {"from": "y", "to": "join2"}, *_parallel("join2", ["x"], "join1")],
    }
    with YAMLEngine(isolation="inline", max_steps=20).load_from_dict(document) as graph, \
            pytest.raises(GraphExecutionError) as caught:
        graph.invoke({})
    assert caught.value.error_type == "MaxStepsExceeded"
    assert caught.value.node in ("join1", "join2") and "max_steps" in str(caught.value)


_MARK = ("import pathlib, uuid\n"
         "pathlib.Path(state['marks'], {name!r} + '.' + uuid.uuid4().hex).touch()\n")


def _marked(node: dict) -> dict:
    """``node`` leaving a file per execution in ``state['marks']``: a resume shows what ran again."""
    return {**node, "run": _MARK.format(name=node["name"]) + node["run"]}


# TWO_FAN_OUTS with a third branch c3 after join1, every node between a and join2 marked.
CHECKPOINTED = {
    "name": "fan-in-fans-out-resumed",
    "nodes": [_traced("a"), *map(_marked, [_traced("b1"), _traced("b2"), _fan_in("join1"),
                                           _traced("c1"), _traced("c2"), _traced("c3")]),
              _fan_in("join2"), _traced("last")],
    "edges": [{"from": "__start__", "to": "a"}, *_parallel("a", ["b1", "b2"], "join1"),
              {"from": "b1", "to": "join1"}, {"from": "b2", "to": "join1"},
              *_parallel("join1", ["c1", "c2", "c3"], "join2"),
              {"from": "c1", "to": "join2"}, {"from": "c2", "to": "join2"},
              {"from": "c3", "to": "join2"}, {"from": "join2", "to": "last"}],
}


def _executions(marks: Path) -> list[str]:
    return sorted(path.name.split(".")[0] for path in marks.iterdir())


@pytest.mark.parametrize("stop_after", ["join1", "first branch of join1's fan-out"])
def test_a_resumed_run_starts_the_fan_out_of_its_last_fan_in_node(tmp_path, stop_after):
    baseline, marks = tmp_path / "baseline", tmp_path / "marks"
    baseline.mkdir()
    marks.mkdir()
    with YAMLEngine(isolation="inline").load_from_dict(CHECKPOINTED) as graph:
        expected = graph.invoke({"marks": str(baseline)})
    checkpointer = SqliteCheckpointer(tmp_path / "runs.db")
    engine = YAMLEngine(isolation="inline", checkpointer=checkpointer)
    with engine.load_from_dict(CHECKPOINTED) as graph:
        events = graph.stream({"marks": str(marks)}, config={"run_id": "r"})
        branches = 0
        for event in events:
            branches += event["type"] == "branch"
            if stop_after == "join1" and event["type"] == "node" and event["node"] == "join1":
                break
            if branches == 3:  # b1, b2, then the first of c1..c3
                break
        events.close()
        ran_before = _executions(marks)
        final = graph.resume("r")
    assert {**final, "marks": None} == {**expected, "marks": None}
    assert final["trace"] == ["a", "join1", "join2", "last"]
    assert ran_before == (["b1", "b2", "join1"] if stop_after == "join1"
                          else ["b1", "b2", "c1", "join1"])
    # Nothing recorded runs again: b1, b2 and join1 once; c1..c3 once in all.
    assert _executions(marks) == ["b1", "b2", "c1", "c2", "c3", "join1"]
