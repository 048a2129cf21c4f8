"""StateGraph and CompiledGraph: building, validating, routing, fan-out semantics."""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time

import pytest

from conftest import fan_out, invoke_concurrently
from isobranch import (
    END,
    START,
    GraphError,
    GraphExecutionError,
    ParallelFlowResult,
    StateGraph,
)
from isobranch.nodes import LuaNode


def test_start_and_end_constants():
    assert START == "__start__" and END == "__end__"


def test_linear_graph_merges_updates_shallowly(isolation):
    graph = StateGraph()
    graph.add_node("a", lambda s: {"x": 1, "nested": {"keep": False}})
    graph.add_node("b", lambda s: {"y": s["x"] + 1, "nested": {"replaced": True}})
    graph.add_node("c", lambda s: None)
    graph.add_edge(START, "a").add_edge("a", "b").add_edge("b", "c").add_edge("c", END)
    with graph.compile(isolation=isolation) as compiled:
        assert compiled.invoke({"x": 0}) == {"x": 1, "y": 2, "nested": {"replaced": True}}


def test_invoke_does_not_mutate_the_callers_state():
    graph = StateGraph()
    graph.add_node("a", lambda s: s["items"].append(4))
    graph.set_entry_point("a")
    state = {"items": [1, 2, 3]}
    with graph.compile() as compiled:
        assert compiled.invoke(state) == {"items": [1, 2, 3, 4]}
    assert state == {"items": [1, 2, 3]}


def test_parallel_results_follow_declaration_order_not_completion_order(isolation, tmp_path):
    go = tmp_path / "go"  # a file: branches in worker processes see it too
    waits = isolation != "inline"  # inline runs branches one after another, in order

    def slow(state):  # finishes once the caller has seen both others finish
        deadline = time.monotonic() + 60
        while waits and not go.exists():
            assert time.monotonic() < deadline, "the other branches never finished"
            time.sleep(0.01)  # polling for the file the caller writes
        return {"who": "slow"}

    graph = fan_out(("slow", slow), ("fast", lambda s: {"who": "fast"}),
                    ("mid", lambda s: {"who": "mid"}))
    finished = []
    with graph.compile(isolation=isolation, max_workers=3) as compiled:
        for event in compiled.stream({}):
            if event["type"] == "branch":  # branch events come in completion order
                finished.append(event["branch"])
                if set(finished) == {"fast", "mid"}:
                    go.touch()
            elif event["type"] == "final":
                results = event["state"]["results"]
    if waits:  # the first-declared branch did finish last
        assert sorted(finished[:2]) == ["fast", "mid"] and finished[2:] == ["slow"]
    else:
        assert finished == ["slow", "fast", "mid"]
    assert [r.branch for r in results] == ["slow", "fast", "mid"]
    assert [r.state["who"] for r in results] == ["slow", "fast", "mid"]
    assert all(isinstance(r, ParallelFlowResult) and r.isolation == isolation for r in results)


def test_fan_in_sees_pre_fan_out_state_and_only_its_return_reaches_main(isolation):
    graph = fan_out(
        ("a", lambda s: {"a": 1, "shared": "from a"}),
        fan_in=lambda state, results: {"seen_keys": sorted(state),
                                       "count": len(results)},
        start=lambda s: {"base": True})
    with graph.compile(isolation=isolation) as compiled:
        final = compiled.invoke({"input": 1})
    assert final == {"input": 1, "base": True, "seen_keys": ["base", "input"], "count": 1}


def test_failed_branch_is_recorded_and_siblings_finish(isolation):
    def boom(state):
        state["partial"] = "written before the failure"
        raise ValueError("bad value")

    graph = fan_out(("ok", lambda s: {"ok": True}), ("boom", boom))
    with graph.compile(isolation=isolation) as compiled:
        ok, failed = compiled.invoke({})["results"]
    assert ok.success and ok.state["ok"] is True
    assert not failed.success and failed.error_type == "ValueError"
    assert "node 'boom'" in failed.error and "branch 'boom'" in failed.error
    assert "bad value" in failed.error
    assert failed.state["partial"] == "written before the failure"
    assert failed.node == "boom"


def test_fail_fast_raises_naming_branch_and_cause(isolation, tmp_path):
    release = threading.Event()
    started = threading.Event()

    def waits(state):
        started.set()
        release.wait(10)
        return {"late": True}

    def sleeps(state):  # a worker process cannot share an Event; close() ends it
        time.sleep(60)

    failed_at = tmp_path / "failed_at"

    def boom(state):
        # CLOCK_MONOTONIC is one clock for every process of the machine.
        failed_at.write_text(repr(time.monotonic()))
        return 1 / 0

    crosses_processes = isolation in ("process", "dask")
    graph = fan_out(("boom", boom), ("other", sleeps if crosses_processes else waits))
    compiled = graph.compile(isolation=isolation, fail_fast=True, max_workers=2)
    try:
        with pytest.raises(GraphExecutionError) as info:
            compiled.invoke({})
        # Raised without waiting for the sibling still running (60 s, 10 s on
        # threads); counted from the failure, not from the start of the pool
        # (a whole local cluster on dask).
        assert time.monotonic() - float(failed_at.read_text()) < 5
    finally:
        release.set()
        compiled.close()
    error = info.value
    assert error.branch == "boom" and error.node == "boom"
    assert error.error_type == "ZeroDivisionError"
    assert "fail_fast" in str(error) and "division by zero" in str(error)
    assert [r.branch for r in error.results] == ["boom", "other"]
    assert error.results[1].error_type == "Cancelled"
    if isolation == "inline":
        assert not started.is_set(), "inline must not start a branch after a failure"


def test_fail_fast_stops_a_running_lua_sibling():
    spinning: dict = {}
    entered = threading.Event()

    def enter(state):  # the sibling's first node: says which thread the Lua loop runs on
        spinning["thread"] = threading.current_thread()
        spinning["clock"] = time.pthread_getcpuclockid(threading.get_ident())
        entered.set()

    def boom(state):  # fails once that thread has spent 50 ms of CPU time in the loop
        assert entered.wait(30)
        begin, deadline = time.clock_gettime(spinning["clock"]), time.monotonic() + 30
        while time.clock_gettime(spinning["clock"]) - begin < 0.05:
            assert time.monotonic() < deadline, "the Lua loop never ran"
            time.sleep(0.005)  # polling the other thread's CPU clock
        return 1 / 0

    graph = fan_out(("boom", boom), ("sibling", enter))
    graph.add_node("spin", LuaNode("spin", "while true do end"))
    graph.add_edge("sibling", "spin").add_edge("spin", "join")
    with graph.compile(isolation="thread", fail_fast=True, max_workers=2, lua_timeout=600) as compiled, \
            pytest.raises(GraphExecutionError, match="boom") as info:
        compiled.invoke({})
    assert info.value.results[1].branch == "sibling" and not info.value.results[1].success
    # The pool's threads end with close(): one still inside the Lua loop could not.
    spinning["thread"].join(10)
    assert not spinning["thread"].is_alive(), "the Lua sibling kept running after fail_fast"


def test_branch_timeout_stops_a_lua_loop_and_marks_timed_out(isolation, caplog):
    graph = fan_out(("spin", LuaNode("spin", "while true do end")),
                    ("quick", lambda s: {"quick": True}))
    with graph.compile(isolation=isolation, branch_timeout=0.3) as compiled:
        compiled.invoke({})  # starts the pool (a whole local cluster on dask): not timed
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="isobranch"):
            start = time.monotonic()
            spin, quick = compiled.invoke({})["results"]
            elapsed = time.monotonic() - start
    assert spin.timed_out and not spin.success
    assert "timed out" in spin.error and "'spin'" in spin.error
    assert quick.success and not quick.timed_out
    assert elapsed < 5, "the timeout must stop the loop, not wait for it"
    if isolation != "process":  # there Lua runs without a hook: the watchdog kills it
        # The branch's own Lua hook stopped the loop; no backend had to give up
        # on the branch (the thread backend, a Dask client do so, warning).
        gave_up = [r.getMessage() for r in caplog.records
                   if r.name.startswith("isobranch") and r.levelno >= logging.WARNING]
        assert not gave_up, gave_up


def test_branch_timeout_between_python_nodes(isolation):
    graph = StateGraph()
    graph.add_node("start", lambda s: None)
    graph.add_node("slow", lambda s: time.sleep(0.4))
    graph.add_node("never", lambda s: {"reached": True})
    graph.add_fan_in_node("join", lambda s, r: {"r": r})
    graph.add_parallel_edge("start", "slow", fan_in="join")
    graph.add_edge("slow", "never").add_edge("never", "join")
    graph.set_entry_point("start")
    with graph.compile(isolation=isolation, branch_timeout=0.2) as compiled:
        (result,) = compiled.invoke({})["r"]
    assert result.timed_out and "reached" not in result.state


def test_a_branch_whose_last_node_overruns_branch_timeout_is_timed_out(isolation):
    # The last node returns after the deadline but before any backend's grace
    # would give up on it: the branch still ran too long.
    graph = fan_out(("late", lambda s: time.sleep(0.5) or {"late": True}))
    with graph.compile(isolation=isolation, branch_timeout=0.3) as compiled:
        (result,) = compiled.invoke({})["results"]
    assert result.timed_out and not result.success
    assert result.error_type == "BranchTimeout" and result.node == "late"


def test_thread_backend_abandons_a_python_node_stuck_past_its_timeout():
    release = threading.Event()
    graph = fan_out(("stuck", lambda s: release.wait(30)), ("ok", lambda s: {"ok": 1}))
    compiled = graph.compile(isolation="thread", branch_timeout=0.2)
    try:
        start = time.monotonic()
        stuck, ok = compiled.invoke({})["results"]
        assert time.monotonic() - start < 5
        assert stuck.timed_out and stuck.node == "stuck" and ok.success
    finally:
        release.set()
        compiled.close()


class Interrupted(BaseException):
    """Stands in for KeyboardInterrupt (a BaseException too) without touching pytest's own."""


def test_an_interrupted_thread_fan_out_does_not_make_close_wait_for_a_stuck_branch():
    import signal

    entered, release = threading.Event(), threading.Event()

    def stuck(state):
        entered.set()
        release.wait(60)

    def interrupt(signum, frame):
        raise Interrupted

    def signal_once_entered():
        if entered.wait(30):
            os.kill(os.getpid(), signal.SIGINT)

    # One pool thread: the quick branch starts it, so the stuck one is only
    # queued by submit() and the interrupt lands while the fan-out waits.
    graph = fan_out(("quick", lambda s: None), ("stuck", stuck))
    compiled = graph.compile(isolation="thread", max_workers=1)
    previous = signal.signal(signal.SIGINT, interrupt)
    helper = threading.Thread(target=signal_once_entered)
    try:
        helper.start()
        with pytest.raises(Interrupted):
            compiled.invoke({})
        begin = time.monotonic()
        compiled.close()
        assert time.monotonic() - begin < 2, "close() must not wait for the abandoned branch"
    finally:
        signal.signal(signal.SIGINT, previous)
        release.set()
        helper.join(30)


def test_nested_fan_out_inside_a_branch(isolation):
    graph = StateGraph()
    graph.add_node("start", lambda s: {"depth": 0})
    graph.add_node("outer_a", lambda s: {"tag": "a"})
    graph.add_node("inner_x", LuaNode("inner_x", "leak = 1 return {x = state.tag}"))
    graph.add_node("inner_y", LuaNode("inner_y", "return {y = leak == nil}"))
    graph.add_fan_in_node("inner_join", lambda s, r: {"inner": [x.state for x in r]})
    graph.add_node("outer_b", lambda s: {"tag": "b"})
    graph.add_fan_in_node("outer_join", lambda s, r: {"outer": {x.branch: x.state for x in r}})
    graph.add_parallel_edge("start", "outer_a", fan_in="outer_join")
    graph.add_parallel_edge("start", "outer_b", fan_in="outer_join")
    graph.add_parallel_edge("outer_a", "inner_x", fan_in="inner_join")
    graph.add_parallel_edge("outer_a", "inner_y", fan_in="inner_join")
    graph.add_edge("inner_join", "outer_join").add_edge("outer_b", "outer_join")
    graph.set_entry_point("start")
    with graph.compile(isolation=isolation) as compiled:
        outer = compiled.invoke({})["outer"]
    assert outer["outer_b"] == {"depth": 0, "tag": "b"}
    inner = outer["outer_a"]["inner"]
    assert inner[0]["x"] == "a" and inner[1]["y"] is True


def test_conditional_edges_with_router_and_mapping(isolation):
    graph = StateGraph()
    graph.add_node("check", lambda s: None)
    graph.add_node("high", lambda s: {"route": "high"})
    graph.add_node("low", lambda s: {"route": "low"})
    graph.add_conditional_edges("check", lambda s: s["n"] > 5, {True: "high", False: "low"})
    graph.set_entry_point("check")
    with graph.compile(isolation=isolation) as compiled:
        assert compiled.invoke({"n": 9})["route"] == "high"
        assert compiled.invoke({"n": 1})["route"] == "low"


def test_router_value_outside_mapping_names_the_node():
    graph = StateGraph()
    graph.add_node("check", lambda s: None)
    graph.add_node("a", lambda s: None)
    graph.add_conditional_edges("check", lambda s: "zzz", {"x": "a"})
    graph.set_entry_point("check")
    with graph.compile() as compiled, pytest.raises(GraphExecutionError, match=r"'check'.*'zzz'"):
        compiled.invoke({})


def test_a_router_whose_value_matches_no_edge_fails_naming_the_node():
    graph = StateGraph()
    graph.add_node("check", lambda s: {"checked": True})
    graph.add_node("a", lambda s: None)
    graph.add_conditional_edges("check", lambda s: None, {"x": "a"})
    graph.set_entry_point("check")
    with graph.compile() as compiled, pytest.raises(GraphExecutionError) as info:
        compiled.invoke({})
    assert info.value.node == "check" and "router returned None" in str(info.value)
    assert info.value.state == {"checked": True}


def test_conditions_none_of_which_holds_without_a_fallback_fail_naming_the_node():
    graph = StateGraph()
    graph.add_node("check", lambda s: None)
    graph.add_node("high", lambda s: {"went": "high"})
    graph.add_node("low", lambda s: {"went": "low"})
    graph.add_edge("check", "high", when=lambda s: s["v"] > 5)
    graph.add_edge("check", "low", when="state['v'] < 0")
    graph.set_entry_point("check")
    with graph.compile() as compiled:
        assert compiled.invoke({"v": 9})["went"] == "high"
        with pytest.raises(GraphExecutionError, match="node 'check': no outgoing edge condition "
                                                      "held and there is no unconditional edge"
                           ) as info:
            compiled.invoke({"v": 3})
    assert info.value.node == "check" and info.value.state == {"v": 3}


def test_when_conditions_are_tried_in_order_with_default(isolation):
    graph = StateGraph()
    graph.add_node("n", lambda s: None)
    for name in ("first", "second", "fallback"):
        graph.add_node(name, lambda s, name=name: {"went": name})
    graph.add_edge("n", "first", when=lambda s: s["v"] == 1)
    graph.add_edge("n", "second", when="state['v'] == 2")
    graph.add_edge("n", "fallback")
    graph.set_entry_point("n")
    with graph.compile(isolation=isolation) as compiled:
        assert [compiled.invoke({"v": v})["went"] for v in (1, 2, 3)] == [
            "first", "second", "fallback"]


def test_loops_are_bounded_by_max_steps():
    graph = StateGraph()
    graph.add_node("spin", lambda s: {"n": s.get("n", 0) + 1})
    graph.add_edge("spin", "spin")
    graph.set_entry_point("spin")
    with graph.compile(max_steps=50) as compiled, pytest.raises(GraphExecutionError) as info:
        compiled.invoke({})
    assert info.value.node == "spin" and "max_steps" in str(info.value)
    assert info.value.state["n"] == 50


def test_node_returning_a_non_dict_is_an_error_naming_the_node():
    graph = StateGraph()
    graph.add_node("bad", lambda s: [1, 2])
    graph.set_entry_point("bad")
    with graph.compile() as compiled, pytest.raises(GraphExecutionError) as info:
        compiled.invoke({})
    assert info.value.node == "bad" and "returned list" in str(info.value)


def test_unpicklable_and_uncopyable_state_names_the_key_path(isolation):
    lock = threading.Lock()
    graph = fan_out(("a", lambda s: None), start=lambda s: {"deep": {"list": [1, 2, lock]}})
    with graph.compile(isolation=isolation) as compiled, pytest.raises(GraphExecutionError) as e:
        compiled.invoke({})
    assert "state['deep']['list'][2]" in str(e.value) and "lock" in str(e.value)
    assert e.value.node == "start"


def test_input_state_that_cannot_be_copied_is_a_graph_error():
    graph = StateGraph()
    graph.add_node("a", lambda s: None)
    graph.set_entry_point("a")
    with graph.compile() as compiled, pytest.raises(GraphError, match=r"state\['gen'\]"):
        compiled.invoke({"gen": (i for i in range(3))})


@pytest.mark.parametrize(("build", "message"), [
    (lambda g: g.add_edge("a", "missing"), "unknown node 'missing'"),
    (lambda g: g.add_parallel_edge("a", "b", fan_in="nope"), "fan-in node 'nope' does not exist"),
    (lambda g: (g.add_node("j1", lambda s, r: None), g.add_node("j2", lambda s, r: None),
                g.add_parallel_edge("a", "b", fan_in="j1"),
                g.add_parallel_edge("a", "c", fan_in="j2")), "one fan-out has one fan-in"),
    (lambda g: (g.add_node("j", lambda s, r: None), g.add_parallel_edge("a", "b", fan_in="j")),
     "not declared as one"),
    (lambda g: (g.add_edge("a", "b"), g.add_edge("a", "c")), "2 unconditional edges"),
])
def test_invalid_graphs_name_the_problem(build, message):
    graph = StateGraph()
    for name in "abc":
        graph.add_node(name, lambda s: None)
    graph.set_entry_point("a")
    build(graph)
    with pytest.raises(GraphError, match=message):
        graph.compile()


def test_every_problem_is_reported_at_once():
    graph = StateGraph()
    graph.add_node("a", lambda s: None)
    graph.add_edge("a", "x").add_edge("y", "a")
    with pytest.raises(GraphError) as info:
        graph.compile(isolation="no-such-backend")
    assert len(info.value.problems) == 4  # no entry, two unknown nodes, unknown backend


def test_duplicate_and_reserved_node_names_are_rejected():
    graph = StateGraph()
    graph.add_node("a", lambda s: None)
    with pytest.raises(GraphError, match="defined twice"):
        graph.add_node("a", lambda s: None)
    with pytest.raises(GraphError, match="reserved"):
        graph.add_node(END, lambda s: None)


def test_stream_yields_node_parallel_and_final_events(isolation):
    graph = fan_out(("a", lambda s: {"a": 1}), ("b", lambda s: {"b": 2}),
                    fan_in=lambda s, r: {"n": len(r)})
    with graph.compile(isolation=isolation) as compiled:
        events = list(compiled.stream({"x": 0}))
    assert [e["type"] for e in events] == ["node", "branch", "branch", "parallel", "node", "final"]
    assert sorted(e["branch"] for e in events[1:3]) == ["a", "b"]
    events = [e for e in events if e["type"] != "branch"]
    assert events[0] == {"type": "node", "node": "start", "state": {"x": 0}}
    assert events[1]["fan_in"] == "join"
    assert [r.branch for r in events[1]["branches"]] == ["a", "b"]
    assert events[2] == {"type": "node", "node": "join", "state": {"x": 0, "n": 2}}
    assert events[3] == {"type": "final", "state": {"x": 0, "n": 2}}


def test_config_overrides_isolation_and_rejects_unknown_keys():
    graph = fan_out(("a", lambda s: None))
    with graph.compile(isolation="thread") as compiled:
        (result,) = compiled.invoke({}, config={"isolation": "inline"})["results"]
        assert result.isolation == "inline"
        with pytest.raises(GraphError, match="unknown key"):
            compiled.invoke({}, config={"isolaton": "inline"})
        with pytest.raises(GraphError, match="unknown isolation backend"):
            compiled.invoke({}, config={"isolation": "nope"})


def test_parallel_flow_result_reads_like_a_dict_and_pickles():
    result = ParallelFlowResult(branch="b", state={"k": 1}, success=False, error="node 'x' failed",
                                error_type="ValueError", worker="t-1")
    assert result["state"] == {"k": 1} and result.get("branch") == "b"
    assert result.get("missing", 7) == 7 and "error" in result
    assert dict(result)["error_type"] == "ValueError"
    with pytest.raises(KeyError):
        result["nope"]
    assert pickle.loads(pickle.dumps(result)) == result


def test_graph_execution_error_pickles_with_its_attributes():
    error = GraphExecutionError("boom", node="n", branch="b", error_type="X", state={"a": 1})
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.node, copy.branch, copy.error_type, copy.state) == (
        "boom", "n", "b", "X", {"a": 1})


def test_close_releases_pool_threads_and_blocks_further_use(no_thread_leak):
    graph = fan_out(("a", lambda s: None), ("b", lambda s: None))
    compiled = graph.compile(isolation="thread")
    compiled.invoke({})
    compiled.close()
    compiled.close()
    with pytest.raises(GraphExecutionError, match="closed"):
        compiled.invoke({})


def test_a_graph_that_is_garbage_collected_releases_its_pool_threads():
    import gc
    import weakref

    before = set(threading.enumerate())
    compiled = fan_out(("a", lambda s: None), ("b", lambda s: None)).compile(
        isolation="thread", max_workers=2)
    compiled.invoke({})
    started = set(threading.enumerate()) - before
    assert started, "the fan-out ran on pool threads"
    collected = weakref.ref(compiled)
    del compiled  # never closed: only garbage collection can release the pool
    gc.collect()
    assert collected() is None
    for thread in started:
        thread.join(10)
    assert [t.name for t in started if t.is_alive()] == [], "pool threads outlived their graph"


def test_concurrent_invocations_in_tests_surface_a_failure():
    # The helper the concurrency tests use must not swallow what a thread raised.
    calls, lock = [], threading.Lock()

    def fails_once(state):
        with lock:
            calls.append(1)
            number = len(calls)
        if number == 2:
            raise ValueError("the second call fails")

    graph = fan_out(("a", lambda s: None), fan_in=lambda s, r: fails_once(s))
    with graph.compile(isolation="thread") as compiled, \
            pytest.raises(GraphExecutionError, match="the second call fails"):
        invoke_concurrently(compiled, times=3)
    assert len(calls) == 3, "every invocation ran to its end first"


def test_context_manager_closes_pools(no_thread_leak):
    graph = fan_out(("a", lambda s: None), ("b", lambda s: None))
    with graph.compile(isolation="thread", max_workers=2) as compiled:
        for _ in range(3):
            compiled.invoke({})
