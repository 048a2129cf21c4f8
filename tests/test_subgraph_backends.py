"""Subgraph nodes on every backend: as a map's body, nested, with retries, timeouts and inner fan-outs."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from conftest import HAVE_DASK
from isobranch import END, START, GraphExecutionError, RetryPolicy, StateGraph

BACKENDS = ["inline", "thread", "process"]


def mark(directory: str, name: str) -> None:
    """Leave a file saying ``name`` ran (counted across processes)."""
    Path(directory, f"{name}.{uuid.uuid4().hex}").touch()


def runs(directory: Path, name: str) -> int:
    return sum(1 for path in directory.iterdir() if path.name.rsplit(".", 1)[0] == name)


def _score(state: dict) -> dict:
    return {"score": len(state["doc"]), "pid": os.getpid(), "scratch": True}


def _check(state: dict) -> dict:
    if state["doc"] == "bad":
        raise ValueError("a bad document")
    return {"checked": os.getpid() == state["pid"]}


def review_graph() -> StateGraph:
    """``score`` -> ``check``: ``check`` fails on ``"bad"`` and sees whether it ran in
    the process ``score`` ran in."""
    inner = StateGraph()
    inner.add_node("score", _score).add_node("check", _check)
    inner.add_edge(START, "score").add_edge("score", "check").add_edge("check", END)
    return inner


def _split(state: dict) -> dict:
    return {"docs": state["input_docs"]}


def _collect(state: dict, results: list) -> dict:
    return {"scores": [r.state.get("review_score") for r in results],
            "same_worker": [r.state.get("same_worker") for r in results],
            "failed": [(r.branch, r.node, r.error_type) for r in results if not r.success]}


def map_over_reviews(**map_options) -> StateGraph:
    """``split`` -> map of ``review`` (the subgraph) over ``docs`` -> ``collect``."""
    graph = StateGraph()
    graph.add_node("split", _split)
    graph.add_node("review", review_graph(), input={"doc": "item"},
                   output={"review_score": "score", "same_worker": "checked"})
    graph.add_fan_in_node("collect", _collect)
    graph.add_edge(START, "split")
    graph.add_map_edge("split", "review", over="docs", fan_in="collect", **map_options)
    graph.add_edge("review", "collect").add_edge("collect", END)
    return graph


@pytest.mark.parametrize("isolation", BACKENDS)
def test_each_map_item_runs_the_whole_subgraph_in_its_branch(isolation):
    with map_over_reviews().compile(isolation=isolation, max_workers=2) as app:
        final = app.invoke({"input_docs": ["a", "bb", "bad", "dddd"]})
    assert final["scores"] == [1, 2, None, 4]
    assert final["same_worker"] == [True, True, None, True], "one branch, one place"
    assert final["failed"] == [("review[2]", "review[2]/check", "ValueError")]
    assert "scratch" not in final and "doc" not in final, "unmapped inner keys stay inside"


@pytest.mark.skipif(not HAVE_DASK, reason="the dask extra is not installed")
@pytest.mark.usefixtures("no_process_leak")
def test_subgraphs_on_dask_a_map_of_them_and_one_with_a_map_inside():
    # Before the map: a main-path subgraph whose own map runs on the cluster.
    graph = StateGraph()
    graph.add_node("spell", letters_graph(), input={"doc": "word"},
                   output={"letters": "letters"})
    graph.add_node("split", _split)
    graph.add_node("review", review_graph(), input={"doc": "item"},
                   output={"review_score": "score", "same_worker": "checked"})
    graph.add_fan_in_node("collect", _collect)
    graph.add_edge(START, "spell").add_edge("spell", "split")
    graph.add_map_edge("split", "review", over="docs", fan_in="collect")
    graph.add_edge("review", "collect").add_edge("collect", END)
    with graph.compile(isolation="dask", max_workers=2) as app:
        events = list(app.stream({"word": "xy", "input_docs": ["a", "bb", "bad"]}))
    final = events[-1]["state"]
    assert final["letters"] == "XY"
    assert sorted(e["branch"] for e in events if e["type"] == "branch") == [
        "review[0]", "review[1]", "review[2]", "spell/letter[0]", "spell/letter[1]"]
    assert final["scores"] == [1, 2, None]
    assert final["same_worker"] == [True, True, None]
    assert final["failed"] == [("review[2]", "review[2]/check", "ValueError")]


@pytest.mark.parametrize("isolation", BACKENDS)
def test_a_subgraph_in_a_subgraph_in_a_static_branch_names_nodes_by_path(isolation):
    innermost = StateGraph()
    innermost.add_node("leaf", lambda s: {"depth": s["depth"] + 1, "who": "leaf"})
    innermost.set_entry_point("leaf").set_finish_point("leaf")
    middle = StateGraph()
    middle.add_node("inc", lambda s: {"depth": s["depth"] + 1})
    middle.add_node("deeper", innermost, output={"depth": "depth"})
    middle.add_edge(START, "inc").add_edge("inc", "deeper").add_edge("deeper", END)
    graph = StateGraph()
    graph.add_node("start", lambda s: {"depth": 0})
    graph.add_node("nest", middle, output={"nested_depth": "depth"})
    graph.add_node("other", lambda s: {"other": True})
    graph.add_fan_in_node("join", lambda s, rs: {"depths": [r.state.get("nested_depth")
                                                            for r in rs]})
    graph.add_edge(START, "start")
    graph.add_parallel_edge("start", "nest", fan_in="join")
    graph.add_parallel_edge("start", "other", fan_in="join")
    graph.add_edge("nest", "join").add_edge("other", "join").add_edge("join", END)
    with graph.compile(isolation=isolation) as app:
        assert app.invoke({})["depths"] == [2, None]
    # On the main path every level shows in the node events.
    with middle.compile(isolation=isolation) as inner_app:
        outer = StateGraph()
        outer.add_node("nest", inner_app)
        outer.set_entry_point("nest").set_finish_point("nest")
        with outer.compile(isolation=isolation) as app:
            nodes = [e["node"] for e in app.stream({"depth": 0}) if e["type"] == "node"]
    assert nodes == ["nest/inc", "nest/deeper/leaf", "nest/deeper", "nest"]


def _inner_split(state: dict) -> dict:
    return {"parts": list(state["doc"])}


def _inner_gather(state: dict, results: list) -> dict:
    return {"letters": "".join(r.state["upper"] for r in results),
            "pids": sorted({r.state["pid"] for r in results})}


def letters_graph() -> StateGraph:
    """A subgraph with a map of its own: one branch per letter of ``doc``."""
    inner = StateGraph()
    inner.add_node("split", _inner_split)
    inner.add_node("letter", lambda s: {"upper": s["part"].upper(), "pid": os.getpid()})
    inner.add_fan_in_node("gather", _inner_gather)
    inner.add_edge(START, "split")
    inner.add_map_edge("split", "letter", over="parts", item_key="part", fan_in="gather")
    inner.add_edge("letter", "gather").add_edge("gather", END)
    return inner


@pytest.mark.parametrize("isolation", BACKENDS)
def test_a_subgraph_with_its_own_map_inside_a_map(isolation):
    graph = StateGraph()
    graph.add_node("split", _split)
    graph.add_node("spell", letters_graph(), input={"doc": "item"},
                   output={"letters": "letters", "pids": "pids"})
    graph.add_fan_in_node("collect", lambda s, rs: {
        "words": [r.state["letters"] for r in rs],
        "one_process_per_item": [len(r.state["pids"]) == 1 for r in rs]})
    graph.add_edge(START, "split")
    graph.add_map_edge("split", "spell", over="docs", fan_in="collect")
    graph.add_edge("spell", "collect").add_edge("collect", END)
    with graph.compile(isolation=isolation, max_workers=2) as app:
        final = app.invoke({"input_docs": ["ab", "cde"]})
    assert final["words"] == ["AB", "CDE"]
    # The inner map is nested in its item's branch: on process it runs in that worker.
    assert final["one_process_per_item"] == [True, True]


@pytest.mark.parametrize("isolation", BACKENDS)
def test_inner_fan_out_events_on_the_main_path_name_their_branches_by_path(isolation):
    graph = StateGraph()
    graph.add_node("spell", letters_graph())
    graph.set_entry_point("spell").set_finish_point("spell")
    with graph.compile(isolation=isolation) as app:
        events = list(app.stream({"doc": "xy"}))
    branches = sorted(e["branch"] for e in events if e["type"] == "branch")
    assert branches == ["spell/letter[0]", "spell/letter[1]"]
    assert {(e["fan_out"], e["fan_in"]) for e in events if e["type"] == "branch"} == {
        ("spell/split", "spell/gather")}
    parallel = [e for e in events if e["type"] == "parallel"]
    assert [e["fan_in"] for e in parallel] == ["spell/gather"]
    assert [e["node"] for e in events if e["type"] == "node"] == [
        "spell/split", "spell/gather", "spell"]
    assert events[-1]["state"]["letters"] == "XY"


def _flaky_first(state: dict) -> dict:
    mark(state["marks"], "first")
    return {"tries": runs(Path(state["marks"]), "first")}


def _flaky_second(state: dict) -> dict:
    mark(state["marks"], "second")
    if runs(Path(state["marks"]), "second") < 3:
        raise ConnectionError("flaky")
    return {"ok": True}


@pytest.mark.parametrize("isolation", BACKENDS)
def test_a_retry_reruns_the_whole_subgraph_from_its_start(isolation, tmp_path):
    inner = StateGraph()
    inner.add_node("first", _flaky_first).add_node("second", _flaky_second)
    inner.add_edge(START, "first").add_edge("first", "second").add_edge("second", END)
    graph = StateGraph()
    graph.add_node("sub", inner, retry=RetryPolicy(max_attempts=3, initial_interval=0.001,
                                                   jitter=False))
    graph.set_entry_point("sub").set_finish_point("sub")
    with graph.compile(isolation=isolation) as app:
        events = list(app.stream({"marks": str(tmp_path)}))
    assert events[-1]["state"]["tries"] == 3 and events[-1]["state"]["ok"] is True
    assert runs(tmp_path, "first") == 3, "every attempt starts at the subgraph's START"
    retries = [e for e in events if e["type"] == "node_retry"]
    assert [(e["node"], e["attempt"], e["error_type"]) for e in retries] == [
        ("sub", 1, "ConnectionError"), ("sub", 2, "ConnectionError")]
    assert "node 'sub/second' failed: ConnectionError: flaky" in retries[0]["error"]


def test_a_subgraph_retry_follows_retry_on_of_the_inner_failure():
    inner = StateGraph()
    inner.add_node("boom", lambda s: {}["missing"])  # KeyError: a programming error
    inner.set_entry_point("boom").set_finish_point("boom")
    graph = StateGraph()
    graph.add_node("sub", inner, retry=3)
    graph.set_entry_point("sub").set_finish_point("sub")
    with graph.compile(isolation="inline") as app, pytest.raises(GraphExecutionError) as caught:
        app.invoke({})
    assert caught.value.attempts == 1 and caught.value.node == "sub/boom"
    assert caught.value.error_type == "KeyError"
    assert str(caught.value).startswith("node 'sub' failed on attempt 1 of 3 (not retried")
    assert "node 'sub/boom' failed: KeyError" in str(caught.value)


def _spin(state: dict) -> dict:
    if state["doc"] == "slow":
        while True:  # C-level-free busy loop: only a kill stops it in time
            pass
    return {"score": 1}


def test_branch_timeout_kills_a_whole_subgraph_branch_on_process():
    inner = StateGraph()
    inner.add_node("prepare", lambda s: {"pid": os.getpid()})
    inner.add_node("spin", _spin)
    inner.add_edge(START, "prepare").add_edge("prepare", "spin").add_edge("spin", END)
    graph = StateGraph()
    graph.add_node("split", _split)
    graph.add_node("review", inner, input={"doc": "item"}, output={"score": "score"})
    graph.add_fan_in_node("collect", lambda s, rs: {"results": [
        (r.branch, r.success, r.timed_out, r.node, sorted(r.state)) for r in rs]})
    graph.add_edge(START, "split")
    graph.add_map_edge("split", "review", over="docs", fan_in="collect")
    graph.add_edge("review", "collect").add_edge("collect", END)
    with graph.compile(isolation="process", max_workers=2, branch_timeout=1.0) as app:
        final = app.invoke({"input_docs": ["fast", "slow", "fast"]})
    # The killed branch's state is rebuilt from its own updates: none of the inner ones.
    assert final["results"] == [("review[0]", True, False, None, ["index", "input_docs", "item", "score"]),
                                ("review[1]", False, True, "review[1]/spin", ["index", "input_docs", "item"]),
                                ("review[2]", True, False, None, ["index", "input_docs", "item", "score"])]
