"""The backend protocol and registry."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from isobranch import (
    GraphError,
    IsolationBackend,
    StateGraph,
    available_backends,
    register_backend,
    unregister_backend,
)
from isobranch.isolation import run_branch
from isobranch.isolation.base import create_backend


class RecordingBackend:
    """A user backend: runs branches in reverse order, returns them in task order."""

    name = "recording"
    instances: list[RecordingBackend] = []

    def __init__(self, max_workers=None, label="default"):
        self.label = label
        self.seen: list[str] = []
        self.closed = False
        RecordingBackend.instances.append(self)

    def run_branches(self, tasks):
        results = {}
        for task in reversed(tasks):
            self.seen.append(task.branch)
            results[task.branch] = run_branch(task)
        return [results[task.branch] for task in tasks]

    def close(self):
        self.closed = True


BUILT_IN = ["dask", "inline", "thread", "process"]


def test_a_fresh_interpreter_has_exactly_the_built_in_backends():
    # A fresh interpreter: in this one, other tests register backends of their own.
    listed = subprocess.run(
        [sys.executable, "-c", "import isobranch; print(isobranch.available_backends())"],
        capture_output=True, text=True, timeout=120, check=True).stdout
    assert ast.literal_eval(listed) == sorted(BUILT_IN)


@pytest.mark.parametrize("name", BUILT_IN)
def test_each_built_in_name_creates_its_own_backend(name):
    assert name in available_backends()
    backend = create_backend(name, max_workers=1)  # no pool, worker or cluster starts yet
    try:
        assert isinstance(backend, IsolationBackend) and backend.name == name
    finally:
        backend.close()


def test_every_builtin_backend_declares_whether_it_crosses_processes():
    from isobranch.isolation import dask, inline, process, thread
    from isobranch.isolation.base import crosses_processes

    declared = {cls.name: cls.crosses_processes for cls in (
        inline.InlineBackend, thread.ThreadBackend, process.ProcessBackend, dask.DaskBackend)}
    assert declared == {"inline": False, "thread": False, "process": True, "dask": True}
    assert crosses_processes(RecordingBackend()) is False, "undeclared: runs in this process"


def test_registered_backend_runs_branches_and_is_closed_with_the_graph(test_backend):
    test_backend("recording", RecordingBackend)
    assert "recording" in available_backends()
    graph = StateGraph()
    graph.add_node("start", lambda s: None)
    graph.add_node("a", lambda s: {"v": "a"})
    graph.add_node("b", lambda s: {"v": "b"})
    graph.add_fan_in_node("join", lambda s, r: {"order": [x.state["v"] for x in r]})
    graph.add_parallel_edge("start", "a", fan_in="join")
    graph.add_parallel_edge("start", "b", fan_in="join")
    graph.set_entry_point("start")
    with graph.compile(isolation="recording", backend_options={"label": "x"}) as compiled:
        assert compiled.invoke({})["order"] == ["a", "b"]
        backend = RecordingBackend.instances[-1]
        assert backend.seen == ["b", "a"] and backend.label == "x"
    assert backend.closed


def test_registering_a_name_twice_needs_replace(test_backend):
    test_backend("twice", RecordingBackend)
    with pytest.raises(ValueError, match="already registered"):
        register_backend("twice", lambda **kw: RecordingBackend())


def test_an_unregistered_backend_is_unknown_again():
    register_backend("passing-through", RecordingBackend)
    assert "passing-through" in available_backends()
    unregister_backend("passing-through")
    assert "passing-through" not in available_backends()
    graph = StateGraph()
    graph.add_node("a", lambda s: None)
    graph.set_entry_point("a")
    with pytest.raises(GraphError, match="unknown isolation backend 'passing-through'"):
        graph.compile(isolation="passing-through")
    with pytest.raises(ValueError, match="no isolation backend 'passing-through'"):
        unregister_backend("passing-through")


def test_built_in_backends_cannot_be_unregistered():
    with pytest.raises(ValueError, match="built in"):
        unregister_backend("thread")
    assert "thread" in available_backends()


def test_unknown_backend_option_is_a_graph_error():
    graph = StateGraph()
    graph.add_node("a", lambda s: None)
    graph.set_entry_point("a")
    with pytest.raises(GraphError, match="no_such_option"):
        graph.compile(isolation="thread", backend_options={"no_such_option": 1})


def test_invalid_max_workers_is_a_graph_error():
    graph = StateGraph()
    graph.add_node("a", lambda s: None)
    graph.set_entry_point("a")
    with pytest.raises(GraphError, match="max_workers"):
        graph.compile(isolation="thread", max_workers=0)


def test_what_a_backend_author_needs_is_public_at_isobranch_isolation():
    import isobranch.branch
    import isobranch.branch_run
    import isobranch.isolation

    assert run_branch is isobranch.branch_run.run_branch
    assert isobranch.isolation.BranchTask is isobranch.branch.BranchTask
    assert isobranch.isolation.IsolationBackend is IsolationBackend
    assert {"BranchTask", "IsolationBackend", "run_branch"} <= set(isobranch.isolation.__all__)
    assert not hasattr(isobranch.branch, "run_branch"), "no shim for the old import path"
