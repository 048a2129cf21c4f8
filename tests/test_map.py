"""Map fan-out: one isolated branch per item of a list known only at run time.

Every semantic runs on every backend (the ``isolation`` fixture).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from pathlib import Path

import pytest
import yaml
from benchmarks.proc_scan import is_gone

from conftest import wait_until
from isobranch import END, START, GraphError, GraphExecutionError, StateGraph, YAMLEngine
from isobranch.cli import main
from isobranch.isolation.dask import DaskBackend
from isobranch.isolation.process.branches import SEND_AHEAD_DEPTH
from isobranch.isolation.thread import SUBMIT_AHEAD_PER_THREAD

MAP_YAML = """
name: map-demo
nodes:
  - name: split
    run: |
      return {"docs": [{"id": i, "text": "x" * i} for i in range(12)], "keep": "me"}
  - name: score
    language: lua
    run: |
      return {score = #state.doc.text, id = state.doc.id, position = state.idx,
              saw_list = state.docs ~= nil, keep = state.keep}
  - name: collect
    fan_in: true
    run: |
      return {"scores": [r.state["score"] for r in parallel_results],
              "names": [r.branch for r in parallel_results],
              "indexes": [r.index for r in parallel_results],
              "positions": [r.state["position"] for r in parallel_results],
              "saw_list": any(r.state["saw_list"] for r in parallel_results),
              "keeps": {r.state["keep"] for r in parallel_results}}
edges:
  - {from: __start__, to: split}
  - {from: split, to: score, type: map, over: docs, as: doc, index_as: idx, fan_in: collect,
     max_concurrency: 8}
  - {from: score, to: collect}
"""


def map_graph(items, body, *, fan_in=None, over="items", **edge):
    """start -> map(body) over ``items`` -> join (keeps every result as ``results``)."""
    graph = StateGraph()
    graph.add_node("start", lambda state: {"items": items} if items is not None else None)
    graph.add_node("body", body)
    graph.add_fan_in_node("join", fan_in or (lambda state, results: {"results": results}))
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "body", over=over, fan_in="join", **edge)
    graph.add_edge("body", "join")
    graph.add_edge("join", END)
    return graph


def compiled(graph, isolation, **options):
    options.setdefault("max_workers", 2)
    return graph.compile(isolation=isolation, **options)


# -- the §8 rules on every backend ------------------------------------------------


def test_yaml_map_runs_one_lua_branch_per_item_in_item_order(load):
    final = load(MAP_YAML).invoke({})
    assert final["scores"] == list(range(12))
    assert final["names"] == [f"score[{i}]" for i in range(12)]
    assert final["indexes"] == list(range(12))
    assert final["positions"] == list(range(12))
    assert final["saw_list"] is False, "a branch must receive its item, never the whole list"
    assert final["keeps"] == {"me"}, "the rest of the state reaches every branch"
    assert len(final["docs"]) == 12, "the main state keeps the list"


def test_python_branch_gets_a_private_item_and_no_list(isolation):
    def body(state):
        state["item"]["mutated"] = True  # a private copy: must not reach the caller's list
        return {"out": state["item"]["n"] * 10, "has_items": "items" in state,
                "index_seen": state["index"]}

    items = [{"n": n} for n in range(7)]
    with compiled(map_graph(items, body), isolation) as app:
        final = app.invoke({})
    results = final["results"]
    assert [r.state["out"] for r in results] == [n * 10 for n in range(7)]
    assert [r.state["index_seen"] for r in results] == list(range(7))
    assert [r.index for r in results] == list(range(7))
    assert not any(r.state["has_items"] for r in results)
    assert final["items"] == [{"n": n} for n in range(7)]


def test_empty_list_runs_no_branch_and_the_fan_in_gets_an_empty_list(isolation):
    ran = []

    def fan_in(state, results):
        ran.append(results)
        return {"n": len(results)}

    with compiled(map_graph([], lambda s: {"x": 1}, fan_in=fan_in), isolation) as app:
        events = list(app.stream({}))
    assert events[-1]["state"]["n"] == 0
    parallel = [e for e in events if e["type"] == "parallel"]
    assert parallel and parallel[0]["branches"] == []
    assert not [e for e in events if e["type"] == "branch"]


@pytest.mark.parametrize("value", [{"a": 1}, "abc", 42, None])
def test_a_value_that_is_not_a_list_fails_the_run_naming_node_and_key(isolation, value):
    graph = map_graph(None, lambda s: None)
    with compiled(graph, isolation) as app, pytest.raises(GraphExecutionError) as info:
        app.invoke({"items": value})
    message = str(info.value)
    assert "node 'start'" in message and "'items'" in message
    assert type(value).__name__ in message
    assert info.value.node == "start"


def test_a_missing_key_fails_the_run_naming_node_and_key(isolation):
    with compiled(map_graph(None, lambda s: None), isolation) as app, \
            pytest.raises(GraphExecutionError, match=r"node 'start'.*no key 'items'"):
        app.invoke({})


def test_a_tuple_is_mapped_like_a_list(isolation):
    with compiled(map_graph((5, 6), lambda s: {"v": s["item"] + 1}), isolation) as app:
        assert [r.state["v"] for r in app.invoke({})["results"]] == [6, 7]


@pytest.mark.parametrize("over", [{"python": "[d for d in state['raw'] if d > 1]"},
                                  {"lua": "state.raw"}])
def test_over_may_be_a_python_or_lua_expression(load, over):
    document = {
        "nodes": [
            {"name": "start", "run": "return {'raw': [1, 2, 3]}"},
            {"name": "body", "run": "return {'double': state['item'] * 2, 'raw_seen': 'raw' in state}"},
            {"name": "join", "fan_in": True,
             "run": "return {'doubles': [r.state['double'] for r in parallel_results],"
                    " 'raw_seen': all(r.state['raw_seen'] for r in parallel_results)}"},
        ],
        "edges": [
            {"from": START, "to": "start"},
            {"from": "start", "to": "body", "type": "map", "over": over, "fan_in": "join"},
            {"from": "body", "to": "join"},
        ],
    }
    final = load(document).invoke({})
    expected = [4, 6] if "python" in over else [2, 4, 6]
    assert final["doubles"] == expected
    assert final["raw_seen"] is True, "with an expression, the state keeps every key"


def test_an_empty_lua_table_maps_as_an_empty_list(load):
    document = yaml.safe_load(MAP_YAML)
    document["edges"][1] = {"from": "split", "to": "score", "type": "map",
                            "over": {"lua": "{}"}, "as": "doc", "fan_in": "collect"}
    assert load(document).invoke({})["scores"] == []


def test_over_may_be_a_callable_giving_any_iterable(isolation):
    graph = map_graph(None, lambda s: {"sq": s["item"] ** 2}, over=lambda s: range(s["n"]))
    with compiled(graph, isolation) as app:
        assert [r.state["sq"] for r in app.invoke({"n": 4})["results"]] == [0, 1, 4, 9]


def test_lua_fan_in_sees_the_same_list_in_item_order(load):
    document = yaml.safe_load(MAP_YAML)
    document["nodes"][2] = {"name": "collect", "fan_in": True, "language": "lua", "run": (
        "local names, scores = {}, {}\n"
        "for i, r in ipairs(state.parallel_results) do\n"
        "  names[i] = r.branch .. '@' .. r.index; scores[i] = r.state.score\n"
        "end\n"
        "return {names = names, scores = scores}")}
    final = load(document).invoke({})
    assert final["names"] == [f"score[{i}]@{i}" for i in range(12)]
    assert final["scores"] == list(range(12))


def _fail_fast_map(marks: Path, items: int, *, siblings_wait: bool) -> StateGraph:
    """start -> map(body -> after) over ``range(items)`` -> join, for the fail_fast tests.

    Every branch leaves ``started-I`` in ``marks`` (its pid and thread) as its
    first node begins and ``after-I`` if its second node runs. Item 1 fails
    once item 0 has started. With ``siblings_wait`` every other item then
    stays in its first node until the test writes ``raised`` (``gave-up-I``
    after a minute), so the failure finds item 0 running and the items
    after it not started.
    """

    def mark(name: str, text: str = "") -> None:
        partial = marks / f".{name}.{os.getpid()}.{threading.get_ident()}"
        partial.write_text(text)
        os.replace(partial, marks / name)  # whole or absent: read from another process

    def wait_for(name: str) -> bool:
        deadline = time.monotonic() + 60
        while not (marks / name).exists():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)  # polling for a file another branch or the test writes
        return True

    def body(state):
        item = state["item"]
        mark(f"started-{item}", f"{os.getpid()} {threading.get_ident()}")
        if item == 1:
            wait_for("started-0")
            raise ValueError("item one is bad")
        if siblings_wait and not wait_for("raised"):
            mark(f"gave-up-{item}")
        return {"v": item}

    def after(state):
        mark(f"after-{state['item']}")

    graph = StateGraph()
    graph.add_node("start", lambda state: {"items": list(range(items))})
    graph.add_node("body", body)
    graph.add_node("after", after)
    graph.add_fan_in_node("join", lambda state, results: {"results": results})
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "body", over="items", fan_in="join")
    graph.add_edge("body", "after")
    graph.add_edge("after", "join")
    graph.add_edge("join", END)
    return graph


def _marked(marks: Path, kind: str) -> dict[int, str]:
    """Items that left a ``kind-I`` mark, with what it holds."""
    prefix = f"{kind}-"
    return {int(path.name[len(prefix):]): path.read_text() for path in marks.iterdir()
            if path.name.startswith(prefix)}


# Not on dask: there a branch that starts just as the fan-out stops, before the
# client hears that it started, runs on, and so may what was queued behind it.
@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_fail_fast_applies_per_item(isolation, tmp_path, no_process_leak):
    """A failing item stops the items running beside it (at their next node boundary on
    threads; by killing their worker on process) and starts none of the rest."""
    items = 8
    graph = _fail_fast_map(tmp_path, items, siblings_wait=True)
    with graph.compile(isolation=isolation, max_workers=2, fail_fast=True) as app:
        with pytest.raises(GraphExecutionError) as info:
            app.invoke({})
        running = {item: tuple(map(int, text.split())) for item, text in
                   _marked(tmp_path, "started").items()}
        assert {0, 1} <= set(running), sorted(running)
        if isolation == "thread":
            # The lanes that ran them: the failed item's lane may have taken one more
            # item before the failure reached the caller; it runs on that lane too.
            live = {thread.ident: thread for thread in threading.enumerate()}
            lanes = {live[ident] for _, ident in running.values() if ident in live}
        else:
            for item in set(running) - {1}:
                pid = running[item][0]
                assert wait_until(lambda pid=pid: is_gone(pid), 30), (
                    f"the worker running item {item} (pid {pid}) was not killed")
        (tmp_path / "raised").touch()  # lets a branch still in its first node return
    if isolation == "thread":
        for lane in lanes:
            lane.join(30)
        assert not [lane.name for lane in lanes if lane.is_alive()], "a lane kept running"
    started = set(_marked(tmp_path, "started"))
    # Item 0 was running when item 1 failed, and at most the one item the failed
    # item's worker took next; none of the others ever started.
    assert {0, 1} <= started and len(started) <= 3, sorted(started)
    assert not _marked(tmp_path, "after"), "a stopped item went on to its next node"
    assert not _marked(tmp_path, "gave-up"), "an item ran on until its wait gave up"
    error = info.value
    assert error.branch == "body[1]" and "item one is bad" in str(error)
    assert [r.branch for r in error.results] == [f"body[{i}]" for i in range(items)]
    assert [r.error_type for r in error.results] == ["Cancelled", "ValueError"] + \
        ["Cancelled"] * (items - 2)


def test_fail_fast_on_inline_starts_no_item_after_the_failed_one(tmp_path):
    items = 6
    graph = _fail_fast_map(tmp_path, items, siblings_wait=False)
    with graph.compile(isolation="inline", fail_fast=True) as app, \
            pytest.raises(GraphExecutionError) as info:
        app.invoke({})
    assert set(_marked(tmp_path, "started")) == {0, 1}
    assert set(_marked(tmp_path, "after")) == {0}, "item 0 ran to its end before item 1 began"
    assert info.value.branch == "body[1]"
    assert [r.error_type for r in info.value.results] == [None, "ValueError"] + \
        ["Cancelled"] * (items - 2)


def test_without_fail_fast_one_failed_item_leaves_the_others(isolation):
    def body(state):
        if state["item"] == 1:
            raise KeyError("nope")
        return {"v": state["item"]}

    with compiled(map_graph([0, 1, 2], body), isolation) as app:
        results = app.invoke({})["results"]
    assert [r.success for r in results] == [True, False, True]
    assert results[1].branch == "body[1]" and results[1].index == 1


def test_branch_timeout_applies_per_item(load):
    document = yaml.safe_load(MAP_YAML)
    document["settings"] = {"parallel": {"branch_timeout": 1.0}}
    document["nodes"][1]["run"] = (
        "if state.idx == 2 then while true do end end\n"
        "return {score = #state.doc.text}")
    document["nodes"][2]["run"] = "return {'results': parallel_results}"
    document["nodes"][0]["run"] = "return {'docs': [{'text': 'ab'}] * 4}"
    results = load(document).invoke({})["results"]
    assert [r.timed_out for r in results] == [False, False, True, False]
    assert results[2].branch == "score[2]" and "timed out" in results[2].error
    assert [r.state.get("score") for r in results if r.success] == [2, 2, 2]


def test_a_map_inside_a_static_branch_and_a_map_inside_a_map_branch(isolation):
    graph = StateGraph()
    graph.add_node("start", lambda s: {"groups": [[1, 2], [3, 4, 5]]})
    # static branch "plain" and static branch "outer", which maps over groups
    graph.add_node("plain", lambda s: {"plain": True})
    graph.add_node("outer", lambda s: None)
    graph.add_node("group", lambda s: None)  # one branch per group ...
    graph.add_node("member", lambda s: {"sq": s["member"] ** 2})  # ... one per member
    graph.add_fan_in_node("group_join",
                          lambda s, rs: {"sum": sum(r.state["sq"] for r in rs),
                                         "names": [r.branch for r in rs]})
    graph.add_fan_in_node("outer_join", lambda s, rs: {"sums": [r.state["sum"] for r in rs],
                                                       "inner": [r.state["names"] for r in rs]})
    graph.add_fan_in_node("join", lambda s, rs: {"results": {r.branch: r.state for r in rs}})
    graph.add_edge(START, "start")
    graph.add_parallel_edge("start", "plain", fan_in="join")
    graph.add_parallel_edge("start", "outer", fan_in="join")
    graph.add_edge("plain", "join")
    graph.add_map_edge("outer", "group", over="groups", item_key="group", fan_in="outer_join")
    graph.add_map_edge("group", "member", over=lambda s: s["group"], item_key="member",
                       fan_in="group_join")
    graph.add_edge("member", "group_join")
    graph.add_edge("group_join", "outer_join")
    graph.add_edge("outer_join", "join")
    graph.add_edge("join", END)
    with compiled(graph, isolation) as app:
        events = list(app.stream({}))
    results = events[-1]["state"]["results"]
    assert results["plain"]["plain"] is True
    assert results["outer"]["sums"] == [1 + 4, 9 + 16 + 25]
    assert results["outer"]["inner"] == [["member[0]", "member[1]"],
                                         ["member[0]", "member[1]", "member[2]"]]
    # only the main path's fan-out reports its branches
    branch_events = [e for e in events if e["type"] == "branch"]
    assert sorted(e["branch"] for e in branch_events) == ["outer", "plain"]


def test_branch_events_come_per_finished_branch_before_the_parallel_event(isolation):
    with compiled(map_graph(list(range(5)), lambda s: {"v": 1}), isolation) as app:
        events = list(app.stream({}))
    kinds = [e["type"] for e in events]
    first_branch, parallel = kinds.index("branch"), kinds.index("parallel")
    branch_events = [e for e in events if e["type"] == "branch"]
    assert kinds[first_branch:parallel] == ["branch"] * 5
    assert [e["done"] for e in branch_events] == [1, 2, 3, 4, 5]
    assert {e["total"] for e in branch_events} == {5}
    assert sorted(e["index"] for e in branch_events) == list(range(5))
    event = branch_events[0]
    assert set(event) == {"type", "fan_out", "fan_in", "branch", "index", "success",
                          "error_type", "timed_out", "duration_ms", "attempts", "done", "total"}
    assert event["fan_out"] == "start" and event["fan_in"] == "join"
    assert event["branch"] == f"body[{event['index']}]"
    assert event["success"] is True and event["attempts"] == 1


def test_a_failed_branch_carries_its_traceback_as_text(isolation):
    def deep_helper_that_raises(value):
        raise RuntimeError(f"bad value {value}")

    def body(state):
        if state["item"] == 1:
            deep_helper_that_raises(state["item"])
        return {}

    with compiled(map_graph([0, 1], body), isolation) as app:
        results = app.invoke({})["results"]
    assert results[0].traceback is None
    assert "deep_helper_that_raises" in results[1].traceback
    assert "RuntimeError: bad value 1" in results[1].traceback
    with compiled(map_graph([0, 1], body), isolation, fail_fast=True) as app, \
            pytest.raises(GraphExecutionError) as info:
        app.invoke({})
    assert "deep_helper_that_raises" in info.value.traceback


def test_max_concurrency_bounds_branches_in_flight(isolation, tmp_path):
    """Branches count themselves in and out under a file lock (works across processes).

    Each branch waits, after entering, until ``bound`` branches are in flight
    (or every branch has entered): a backend that ran more at once would be
    seen exceeding the bound, one that ran fewer would never let it reach it.
    """
    bound = 1 if isolation == "inline" else 2
    items = 8
    counter = str(tmp_path / "counter.json")
    with open(counter, "w") as out:
        json.dump({"in": 0, "entered": 0, "max": 0}, out)

    def update(change):
        with open(counter, "r+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            data = json.load(handle)
            change(data)
            handle.seek(0)
            handle.truncate()
            json.dump(data, handle)
            return data

    def enter(data):
        data["in"] += 1
        data["entered"] += 1
        data["max"] = max(data["max"], data["in"])

    def body(state):
        update(enter)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            seen = update(lambda data: None)
            if seen["in"] >= bound or seen["entered"] == items:
                break
            time.sleep(0.002)  # polling the shared counter, not waiting for time to pass
        update(lambda data: data.__setitem__("in", data["in"] - 1))
        return {}

    with compiled(map_graph(list(range(items)), body, max_concurrency=bound), isolation,
                  max_workers=3) as app:
        app.invoke({})
    with open(counter) as handle:
        final = json.load(handle)
    assert final["entered"] == items and final["in"] == 0
    assert final["max"] == bound


def test_max_concurrency_comes_from_edge_compile_or_config(tmp_path):
    graph = map_graph([1], lambda s: None)
    with graph.compile(isolation="thread", max_concurrency=3) as app:
        assert app.max_concurrency == 3
        app.invoke({}, config={"max_concurrency": 2})
        with pytest.raises(GraphError, match="max_concurrency"):
            app.invoke({}, config={"max_concurrency": 0})
    with pytest.raises(GraphError, match="max_concurrency must be a positive integer"):
        map_graph([1], lambda s: None).compile(max_concurrency=1.5)
    with pytest.raises(GraphError, match="max_concurrency must be a positive integer"):
        map_graph([1], lambda s: None, max_concurrency=-1)


def test_settings_parallel_max_concurrency_reaches_the_graph():
    document = yaml.safe_load(MAP_YAML)
    document["settings"] = {"parallel": {"max_concurrency": 5}}
    with YAMLEngine(isolation="inline").load_from_dict(document) as app:
        assert app.max_concurrency == 5


# -- graph validation ---------------------------------------------------------


def test_a_node_with_a_map_edge_and_parallel_edges_is_a_graph_error():
    graph = map_graph([1], lambda s: None)
    graph.add_node("other", lambda s: None)
    graph.add_parallel_edge("start", "other", fan_in="join")
    with pytest.raises(GraphError, match="parallel edges or one map edge, never both"):
        graph.compile()


def test_two_map_edges_from_one_node_is_a_graph_error():
    graph = map_graph([1], lambda s: None)
    graph.add_node("second", lambda s: None)
    graph.add_map_edge("start", "second", over="items", fan_in="join")
    with pytest.raises(GraphError, match="two map edges"):
        graph.compile()


def test_an_invalid_retry_on_a_map_edge_is_a_graph_error_naming_the_edge():
    with pytest.raises(GraphError, match=r"map edge start -> body: retry.max_attempts must be"):
        map_graph([1], lambda s: None, retry={"max_attempts": 0})


@pytest.mark.parametrize(("edge", "message"), [
    ({"over": "docs"}, "needs 'fan_in'"),
    ({"fan_in": "collect"}, "needs 'over'"),
    ({"over": "docs", "fan_in": "nowhere"}, "fan-in node 'nowhere' does not exist"),
    ({"over": "docs", "fan_in": "collect", "as": ""}, "'as' must be a non-empty state key"),
    ({"over": "docs", "fan_in": "collect", "as": "i", "index_as": "i"},
     "item_key and index_key are both 'i'"),
    ({"over": {"ruby": "x"}, "fan_in": "collect"}, "'over' must be an expression"),
    ({"over": {"python": "state["}, "fan_in": "collect"}, "invalid Python expression in 'over'"),
    ({"over": 3, "fan_in": "collect"}, "'over' must be a state key"),
    ({"over": "docs", "fan_in": "collect", "max_concurrency": 0},
     "max_concurrency must be a positive integer"),
    ({"over": "docs", "fan_in": "collect", "when": "True"}, "cannot have a 'when'"),
])
def test_invalid_map_edges_are_graph_errors_naming_the_edge(edge, message):
    document = yaml.safe_load(MAP_YAML)
    document["edges"][1] = {"from": "split", "to": "score", "type": "map", **edge}
    with pytest.raises(GraphError) as info:
        YAMLEngine().load_from_dict(document)
    assert message in str(info.value)
    assert "edges[1] (split -> score)" in str(info.value)


def test_map_keys_on_a_plain_edge_are_reported():
    document = yaml.safe_load(MAP_YAML)
    document["edges"][2]["over"] = "docs"
    with pytest.raises(GraphError, match="'over' belongs to map edges"):
        YAMLEngine().load_from_dict(document)


def test_cli_validate_names_the_bad_map_edge_and_graph_draws_map_edges(tmp_path, capfd):
    good = tmp_path / "map.yaml"
    good.write_text(MAP_YAML)
    assert main(["validate", str(good)]) == 0
    assert main(["graph", str(good)]) == 0
    drawing = capfd.readouterr().out
    assert 'n_split["split"] -. "map over docs as doc, fan-in collect" .-> n_score["score"]' \
        in drawing
    document = yaml.safe_load(MAP_YAML)
    document["edges"][1]["fan_in"] = "missing"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(document))
    assert main(["validate", str(bad)]) == 2
    assert "edges[1] (split -> score): fan-in node 'missing' does not exist" \
        in capfd.readouterr().err


def test_cli_debug_shows_the_failed_branch_traceback(tmp_path, capsys):
    document = yaml.safe_load(MAP_YAML)
    document["settings"] = {"parallel": {"fail_fast": True, "isolation": "process"}}
    document["nodes"][1] = {"name": "score", "run": (
        "def inner_helper_for_debug(doc):\n"
        "    raise ValueError('doc %s is bad' % doc['id'])\n"
        "if state['idx'] == 4:\n"
        "    inner_helper_for_debug(state['doc'])\n"
        "return {'score': 1}")}
    path = tmp_path / "fails.yaml"
    path.write_text(yaml.safe_dump(document))
    assert main(["run", str(path), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "traceback of the failing code (score[4])" in err
    assert "inner_helper_for_debug" in err and "ValueError: doc 4 is bad" in err


# -- scale, crashes, memory ---------------------------------------------------------


@pytest.mark.stress
@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_a_10000_item_map(isolation):
    graph = map_graph(list(range(10_000)), lambda s: {"v": s["item"] + 1},
                      fan_in=lambda s, rs: {"total": sum(r.state["v"] for r in rs),
                                            "ordered": [r.index for r in rs] == list(range(10_000)),
                                            "ok": all(r.success for r in rs)})
    with compiled(graph, isolation) as app:
        final = app.invoke({})
    assert final["ok"] and final["ordered"]
    assert final["total"] == sum(range(1, 10_001))


def test_a_worker_crash_in_one_item_fails_only_that_item(no_process_leak):
    def body(state):
        if state["item"] == 2:
            os._exit(7)
        return {"v": state["item"]}

    with compiled(map_graph(list(range(6)), body), "process") as app:
        results = app.invoke({})["results"]
    assert [r.success for r in results] == [True, True, False, True, True, True]
    assert results[2].error_type == "WorkerCrashed" and "exited with code 7" in results[2].error
    assert results[2].branch == "body[2]" and results[2].index == 2
    assert [r.state["v"] for r in results if r.success] == [0, 1, 3, 4, 5]


def test_an_item_that_cannot_be_pickled_fails_naming_its_path():
    items = [1, 2, lambda: None]
    with compiled(map_graph(items, lambda s: None), "process") as app, \
            pytest.raises(GraphExecutionError, match=r"node 'start'.*state\['items'\]\[2\]"):
        app.invoke({})
    # In-process backends copy what pickle refuses with deepcopy.
    with compiled(map_graph(items, lambda s: None), "thread") as app:
        assert len(app.invoke({})["results"]) == 3


MEMORY_PROBE = """
import json
from benchmarks.proc_scan import rss_bytes as rss
from isobranch import END, START, StateGraph

count, size = 10_000, 1024
graph = StateGraph()
graph.add_node("start", lambda s: {"docs": [f"{i:08d}" + "x" * (size - 8) for i in range(count)]})
graph.add_node("body", lambda s: {"out": s["doc"][::-1]})
graph.add_fan_in_node("join", lambda s, rs: {"n": sum(len(r.state["out"]) for r in rs),
                                             "results": rs})
graph.add_edge(START, "start")
graph.add_map_edge("start", "body", over="docs", item_key="doc", fan_in="join")
graph.add_edge("body", "join")
graph.add_edge("join", END)
with graph.compile(isolation="thread", max_workers=2) as app:
    app.invoke({"docs": []})  # warm the pool
    before = rss()
    final = app.invoke({})
    print(json.dumps({"grown": rss() - before, "n": final["n"]}))
"""


def test_map_memory_stays_within_three_times_the_items_bytes():
    """10,000 items of 1 KiB in, 1 KiB out each, on threads: the caller's RSS
    grows by at most 3x the items' bytes (no per-branch copy of the list).

    Measured in a fresh interpreter: RSS in a test worker depends on what
    other tests left in its heap.
    """
    import subprocess
    import sys

    count, size = 10_000, 1024
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True,
                          timeout=120, check=True, cwd=Path(__file__).parent.parent)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["n"] == count * size
    # 3x the items' own bytes (the 1 KiB outputs held in the results count against it too)
    assert measured["grown"] <= 3 * count * size, \
        f"RSS grew by {measured['grown'] / 2**20:.1f} MiB"


# -- the backend protocol -----------------------------------------------------------


class ListOnlyBackend:
    """A third-party backend of the old protocol: run_branches(list) -> list only."""

    name = "list-only"
    chunks: list[int] = []

    def __init__(self, max_workers=None):
        self.max_workers = max_workers

    def run_branches(self, tasks):
        from isobranch.branch_run import run_branch

        ListOnlyBackend.chunks.append(len(tasks))
        return [run_branch(task) for task in tasks]

    def close(self):
        pass


def test_a_backend_with_only_run_branches_works_through_the_adapter(test_backend):
    test_backend("list-only", ListOnlyBackend)
    ListOnlyBackend.chunks = []
    graph = map_graph(list(range(10)), lambda s: {"v": s["item"] * 2})
    with graph.compile(isolation="list-only", max_concurrency=3) as app:
        events = list(app.stream({}))
    results = events[-1]["state"]["results"]
    assert [r.state["v"] for r in results] == [i * 2 for i in range(10)]
    assert [r.branch for r in results] == [f"body[{i}]" for i in range(10)]
    assert ListOnlyBackend.chunks == [3, 3, 3, 1]
    assert [e["done"] for e in events if e["type"] == "branch"] == list(range(1, 11))


def _tasks(app, isolation, count, pulled):
    """``count`` map tasks of ``app``'s body, recording in ``pulled`` how many were taken."""
    from isobranch.branch import BranchLimits, BranchTask
    from isobranch.statecopy import StateSnapshot

    snapshot = StateSnapshot({})
    for index in range(count):
        pulled.append(index)
        yield BranchTask(graph=app, name=f"body[{index}]", start="body", fan_in="join", snapshot=snapshot,
                         limits=BranchLimits(), isolation=isolation, index=index,
                         overlay=StateSnapshot({"item": index, "index": index}))


def _threads_left(before: set[threading.Thread]) -> list[str]:
    """Names of the threads started since ``before`` still running after 10 s each."""
    started = [thread for thread in threading.enumerate() if thread not in before]
    for thread in started:
        thread.join(10)
    return [thread.name for thread in started if thread.is_alive()]


def test_stream_branches_pulls_tasks_lazily_and_stops_when_closed(isolation, no_process_leak):
    from isobranch.fanout_run import drive
    from isobranch.isolation import create_backend

    graph = map_graph([], lambda s: {"v": s["item"]})
    with compiled(graph, isolation) as app:
        threads_before = set(threading.enumerate())
        backend = create_backend(isolation, max_workers=2)
        try:
            pulled: list[int] = []
            stream = drive(backend, _tasks(app, isolation, 1000, pulled), max_concurrency=2)
            # Started and unfinished <= 2 (the in-flight test checks that); one more
            # may be built and waiting; the thread backend queues a few more in its
            # pool, the process backend sends short branches ahead to busy workers.
            # Dask takes what its batches of short branches need, as far as it declares.
            ahead = {"thread": 3 + 2 * SUBMIT_AHEAD_PER_THREAD,
                     "dask": 3 + 2 * DaskBackend.tasks_ahead_per_worker,
                     "process": 3 + 2 * SEND_AHEAD_DEPTH}.get(isolation, 3)
            seen = []
            for position, result in stream:
                assert result.success and result.state["v"] == position
                seen.append(position)
                assert len(pulled) - len(seen) <= ahead
                if len(seen) == 5:
                    break
            # A backend may build tasks in the background until the stream is
            # closed (within the same bound); once close() returns, none.
            stream.close()
            taken = len(pulled)
            assert taken - len(seen) <= ahead
            assert len(set(seen)) == len(seen) == 5
        finally:
            backend.close()
        assert len(pulled) == taken, "a closed stream takes no more tasks"
        if isolation == "thread":
            assert not _threads_left(threads_before), "a closed stream left threads running"


def test_thread_stream_takes_no_more_than_its_cap_ahead_of_a_consumer_holding_results():
    """Lanes keep running while the consumer holds a result; a branch counts as
    consumed only once it is handed back, not when its report was read."""
    from isobranch.fanout_run import drive
    from isobranch.isolation.thread import ThreadBackend

    ran: list[int] = []

    def body(state):
        ran.append(state["item"])
        return {"v": state["item"]}

    cap = 2 + 2 * SUBMIT_AHEAD_PER_THREAD  # max_concurrency plus what waits in the queue
    with compiled(map_graph([], body), "thread") as app:
        threads_before = set(threading.enumerate())
        backend = ThreadBackend(max_workers=2)
        try:
            pulled: list[int] = []
            stream = drive(backend, _tasks(app, "thread", 1000, pulled), max_concurrency=2)
            seen = []
            for position, _ in stream:
                seen.append(position)
                # Hold the result until the lanes are idle with every taken branch
                # finished, so the next read finds a batch of finished reports.
                settled = wait_until(lambda: len(pulled) - len(seen) >= cap
                                     and len(ran) == len(pulled), 30, interval=0.001)
                assert len(pulled) - len(seen) <= cap, (len(pulled), len(seen))
                assert settled, (len(pulled), len(ran), len(seen))
                if len(seen) == 4:
                    break
            stream.close()
        finally:
            backend.close()
        assert sorted(seen) == [0, 1, 2, 3]
        assert not _threads_left(threads_before), "a closed stream left threads running"


@pytest.mark.parametrize("failure", ["crash", "timeout"])
def test_branches_sent_ahead_to_a_worker_that_dies_run_once_elsewhere(
        tmp_path, monkeypatch, failure, no_process_leak):
    """Short branches are sent ahead to a busy worker; when the branch it runs
    crashes or overruns its timeout, only that branch fails, and the ones
    queued behind it run (once each) on a new worker."""
    from isobranch.isolation.process import branches as process_branches

    requeued: list[int] = []
    retry_all = process_branches.TaskSource.retry_all

    def spy(self, queued):
        queued = list(queued)
        requeued.extend(q.position for q in queued)
        retry_all(self, queued)

    monkeypatch.setattr(process_branches.TaskSource, "retry_all", spy)
    marks = str(tmp_path)

    def body(state):
        # O_EXCL: a branch that ran twice fails here
        os.close(os.open(os.path.join(marks, str(state["item"])), os.O_CREAT | os.O_EXCL))
        if state["item"] == 12:
            if failure == "crash":
                os._exit(3)
            while True:
                pass
        return {"v": state["item"]}

    with compiled(map_graph(list(range(30)), body), "process", max_workers=1,
                  branch_timeout=1.0) as app:
        results = app.invoke({})["results"]
    assert [r.index for r in results if not r.success] == [12]
    expected_type = "WorkerCrashed" if failure == "crash" else "BranchTimeout"
    assert results[12].error_type == expected_type
    assert [r.state["v"] for r in results if r.success] == [i for i in range(30) if i != 12]
    assert requeued and min(requeued) == 13, "the branches behind it were sent ahead"
    assert sorted(int(name) for name in os.listdir(marks)) == list(range(30))


def test_the_documented_map_yaml_example_runs(isolation):
    import pathlib
    import re

    section = (pathlib.Path(__file__).parent.parent / "docs" / "map.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", section, re.DOTALL).group(1)
    with YAMLEngine(isolation=isolation).load_from_dict(yaml.safe_load(block)) as app:
        assert app.invoke({})["scores"] == list(range(500))


def test_closing_the_stream_early_stops_running_and_queued_branches(isolation, tmp_path,
                                                                    no_process_leak):
    """A consumer that stops reading events (as on Ctrl-C) ends the fan-out at once:
    branches stuck in Lua loops are stopped (cancelled, killed or restarted), no
    queued branch starts, and on threads no lane is left running."""
    from isobranch.nodes import LuaNode

    def enter(state):  # where the item runs, before its Lua node
        item = state["item"]
        partial = tmp_path / f".started-{item}"
        partial.write_text(f"{os.getpid()} {threading.get_ident()}")
        os.replace(partial, tmp_path / f"started-{item}")

    graph = StateGraph()
    graph.add_node("start", lambda state: {"items": list(range(6))})
    graph.add_node("enter", enter)
    graph.add_node("spin", LuaNode(
        "spin", "if state.item > 0 then while true do end end\nreturn {done = true}"))
    graph.add_fan_in_node("join", lambda state, results: None)
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "enter", over="items", fan_in="join")
    graph.add_edge("enter", "spin")
    graph.add_edge("spin", "join")
    graph.add_edge("join", END)
    with compiled(graph, isolation, lua_timeout=60) as app:
        started = time.monotonic()
        events = app.stream({})
        for event in events:
            if event["type"] == "branch":
                assert event["index"] == 0 and event["success"]
                break
        events.close()
        elapsed = time.monotonic() - started
        running = {item: tuple(map(int, text.split()))
                   for item, text in _marked(tmp_path, "started").items()}
        if isolation == "thread":
            # Item 0's lane may have taken the next item before the stream closed.
            live = {thread.ident: thread for thread in threading.enumerate()}
            lanes = {live[ident] for _, ident in running.values() if ident in live}
        elif isolation == "process":
            for item in set(running) - {0}:  # item 0 had finished; its worker lives on
                pid = running[item][0]
                assert wait_until(lambda pid=pid: is_gone(pid), 30), (
                    f"the worker spinning in item {item} (pid {pid}) was not ended")
    # Lua would run for 60 s per item if nothing stopped it.
    assert elapsed < 30, f"closing the stream took {elapsed:.1f}s"
    if isolation == "thread":
        for lane in lanes:
            lane.join(10)
        assert not [lane.name for lane in lanes if lane.is_alive()], \
            "a lane still spins in Lua after the stream and the graph were closed"
    # Which items started is not checked on dask: there a branch that starts just as
    # the stream closes, before the client hears that it started, runs on (until the
    # cluster closes), and so may what was queued behind it.
    started_items = set(_marked(tmp_path, "started"))
    if isolation == "inline":
        assert started_items == {0}
    elif isolation != "dask":  # item 0, the one running beside it, the one taken next
        assert 0 in started_items and len(started_items) <= 3, sorted(started_items)
