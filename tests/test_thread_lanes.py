"""The thread backend's lanes: pool calls that run a fan-out's branches in a row.

A lane builds the next task itself and reports results through one queue, so
what used to happen per branch in the consumer (submitting, a future, a done
callback) now happens in the lane; these tests pin what must stay true there.
"""

from __future__ import annotations

import threading

import pytest

from isobranch import END, START, GraphExecutionError, StateGraph
from isobranch.isolation.thread import SUBMIT_AHEAD_PER_THREAD
from isobranch.nodes import Node


def _map_app(body, *, max_workers: int = 2, items: list | None = None, **options):
    graph = StateGraph()
    # Items made by a node, not given as input, may hold what cannot be copied.
    graph.add_node("start", lambda state: None if items is None else {"items": items})
    graph.add_node("body", body)
    graph.add_fan_in_node("join", lambda state, results: {"results": results})
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "body", over="items", fan_in="join")
    graph.add_edge("body", "join")
    graph.add_edge("join", END)
    return graph.compile(isolation="thread", max_workers=max_workers, **options)


def test_a_branch_stuck_in_a_call_is_given_up_and_the_rest_of_the_map_still_runs():
    release = threading.Event()
    lock = threading.Lock()
    running = [0]
    most = [0]

    def body(state):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            if state["item"] == 3:
                release.wait(60)  # stuck in one call, far past branch_timeout
            return {"v": state["item"] * 2}
        finally:
            with lock:
                running[0] -= 1

    app = _map_app(body, branch_timeout=0.3)
    try:
        results = app.invoke({"items": list(range(60))})["results"]
    finally:
        release.set()
        app.close()
    assert [r.branch for r in results] == [f"body[{i}]" for i in range(60)]
    stuck = results[3]
    assert stuck.timed_out and not stuck.success and stuck.node == "body"
    assert all(r.success and r.state["v"] == r.index * 2 for r in results if r.index != 3)
    assert most[0] <= 2, "never more branches at once than threads"


def test_an_item_that_cannot_be_copied_is_named_when_a_lane_builds_its_task():
    # Far past the branches taken up front (2 threads + 2 * ahead), so the
    # lane, not the caller, builds this task.
    bad = 2 + 2 * SUBMIT_AHEAD_PER_THREAD + 20
    items: list = list(range(bad + 10))
    items[bad] = threading.Lock()
    app = _map_app(lambda state: {"v": 1}, items=items)
    with app, pytest.raises(GraphExecutionError) as info:
        app.invoke({})
    assert info.value.error_type == "StateCopyError", str(info.value)
    assert f"state['items'][{bad}]" in str(info.value)


class _SourceFailed(Exception):
    """Raised by a task source in place of its next task."""


def test_a_task_source_failing_after_its_last_task_still_fails_the_stream():
    """A lane that asks for the next task gets the source's error after it handed
    back the last result; the stream must raise that error, not end as if the
    tasks had simply run out. The slow source leaves the consumer time to take
    the last result first, the order that used to lose the error."""
    import time

    from isobranch.branch import BranchLimits, BranchTask
    from isobranch.fanout_run import drive
    from isobranch.isolation.thread import ThreadBackend
    from isobranch.statecopy import StateSnapshot

    app = _map_app(lambda state: {"v": state["item"]})
    snapshot = StateSnapshot({})

    def tasks(bad):
        for index in range(bad):
            yield BranchTask(graph=app, name=f"body[{index}]", start="body", fan_in="join", snapshot=snapshot,
                             limits=BranchLimits(), isolation="thread", index=index,
                             overlay=StateSnapshot({"item": index, "index": index}))
        time.sleep(0.002)  # building a task can take a while (a big state copy)
        raise _SourceFailed(bad)

    backend = ThreadBackend(max_workers=2)
    try:
        with app:
            for attempt in range(20):
                bad = 2 + 2 * SUBMIT_AHEAD_PER_THREAD + 1 + attempt % 5  # built by a lane
                handed = []
                with pytest.raises(_SourceFailed):
                    for position, _ in drive(backend, tasks(bad), max_concurrency=2):
                        handed.append(position)
                assert len(handed) <= bad
    finally:
        backend.close()


class _Escape(BaseException):
    """Not an Exception: run_branch does not turn it into a failed result."""


def test_a_base_exception_in_a_branch_reaches_the_caller_and_the_backend_still_works():
    def body(state):
        if state["item"] == 30:
            raise _Escape("out")
        return {"v": state["item"]}

    app = _map_app(body)
    with app:
        with pytest.raises(_Escape):
            app.invoke({"items": list(range(50))})
        results = app.invoke({"items": list(range(29))})["results"]
    assert [r.state["v"] for r in results] == list(range(29))


def test_every_branch_gets_its_own_state_copy_and_context_on_a_reused_lane():
    contexts = []
    lock = threading.Lock()

    class Probe(Node):
        name = "body"

        def run(self, state, context, parallel_results=None):
            with lock:
                contexts.append(context)
            state["scratch"].append(state["item"])  # must not leak into a sibling
            return {"seen": list(state["scratch"])}

    graph = StateGraph()
    graph.add_node("start", lambda state: None)
    graph.add_node("body", Probe())
    graph.add_fan_in_node("join", lambda state, results: {"results": results})
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "body", over="items", fan_in="join")
    graph.add_edge("body", "join")
    graph.add_edge("join", END)
    with graph.compile(isolation="thread", max_workers=2) as app:
        results = app.invoke({"items": list(range(200)), "scratch": []})["results"]
    assert [r.state["seen"] for r in results] == [[i] for i in range(200)]
    # All still alive, so distinct ids mean distinct contexts.
    assert len({id(c) for c in contexts}) == len(contexts) == 200
    assert {c.branch_name for c in contexts} == {f"body[{i}]" for i in range(200)}


class _NoRuns:
    """A fan-out source with nothing to run."""

    max_concurrency = None

    def take(self):
        return None

    def ready(self):
        return False

    def next_due(self):
        return None


class _Graph:
    def run_branch(self, task, monitor):
        raise AssertionError("no branch runs")


def test_a_closed_fan_out_lets_go_of_its_graph_while_a_pool_thread_still_holds_its_lane():
    # A pool thread keeps its lane (and through it the fan-out) for a moment after
    # the lane's last report; a graph dropped unclosed in that moment must still be
    # collectable, or its pool threads outlive it.
    import gc
    import weakref

    from isobranch.isolation.thread import ThreadBackend, _Lane

    backend = ThreadBackend(max_workers=1)
    graph = _Graph()
    lanes = backend.open(_NoRuns(), graph)
    held_by_pool_thread = _Lane(lanes)
    lanes.close(cancelled=False)
    collected = weakref.ref(graph)
    del graph, lanes
    gc.collect()
    assert collected() is None, "the fan-out's lane still reaches the graph after close"
    assert held_by_pool_thread.run() is None, "a lane of a closed fan-out takes nothing"
    backend.close()
