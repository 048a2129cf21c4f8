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
from isobranch.isolation import create_backend, run_branch


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
            self.seen.append(task.start)
            results[task.start] = run_branch(task)
        return [results[task.start] for task in tasks]

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
    from isobranch.isolation import dask, inline, thread
    from isobranch.isolation.adapters import adapt
    from isobranch.isolation.process.backend import ProcessBackend

    declared = {cls.name: cls.crosses_processes for cls in (
        inline.InlineBackend, thread.ThreadBackend, ProcessBackend, dask.DaskBackend)}
    assert declared == {"inline": False, "thread": False, "process": True, "dask": True}
    assert adapt(RecordingBackend()).crosses_processes is False, \
        "undeclared: runs in this process"


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


# -- backends of the first protocols, written as docs/backends.md shows -------------------


class DocListsBackend:
    """The first protocol: ``run_branches(tasks)`` returns one result per task, in order."""

    name = "doc-lists"

    def __init__(self, max_workers=None):
        self.max_workers = max_workers
        self.chunks: list[list[str]] = []

    def run_branches(self, tasks):
        from isobranch.isolation import run_branch

        self.chunks.append([task.name for task in tasks])
        return [run_branch(task) for task in tasks]

    def close(self):
        pass


class DocStreamingBackend:
    """The streaming protocol: ``stream_branches`` pulls tasks lazily and yields
    ``(position, result)`` as each finishes (here: each pair in reverse order)."""

    name = "doc-streams"

    def __init__(self, max_workers=None):
        self.max_workers = max_workers

    def stream_branches(self, tasks, *, max_concurrency):
        from isobranch.isolation import BranchTask, run_branch

        pending: list[tuple[int, BranchTask]] = []
        for position, task in enumerate(tasks):
            assert isinstance(task, BranchTask)
            pending.append((position, task))
            if len(pending) == 2:
                for done in reversed(pending):
                    yield done[0], run_branch(done[1])
                pending = []
        for position, task in pending:
            yield position, run_branch(task)

    def run_branches(self, tasks):
        raise AssertionError("a streaming backend is driven through stream_branches")

    def close(self):
        pass


def _map_of_five() -> StateGraph:
    def body(state):
        if state["item"] == 3:
            raise ValueError("three is bad")
        return {"v": state["item"] * 10}

    graph = StateGraph()
    graph.add_node("start", lambda s: None)
    graph.add_node("body", body)
    graph.add_fan_in_node("join", lambda s, results: {"results": results})
    graph.add_map_edge("start", "body", over="items", fan_in="join")
    graph.add_edge("body", "join")
    graph.set_entry_point("start")
    return graph


@pytest.mark.parametrize("backend", [DocListsBackend, DocStreamingBackend])
def test_a_backend_of_the_first_protocols_keeps_working(backend, test_backend):
    from isobranch.isolation import IsolationBackend, create_backend

    test_backend(backend.name, backend)
    created = create_backend(backend.name, max_workers=2)
    assert isinstance(created, IsolationBackend), "wrapped once, when it is created"
    assert created.name == backend.name and created.max_workers == 2
    created.close()
    with _map_of_five().compile(isolation=backend.name, max_concurrency=2) as app:
        events = list(app.stream({"items": list(range(5))}))
    results = events[-1]["state"]["results"]
    assert [r.branch for r in results] == [f"body[{i}]" for i in range(5)]
    assert [r.state.get("v") for r in results] == [0, 10, 20, None, 40]
    assert [r.success for r in results] == [True, True, True, False, True]
    assert results[3].error_type == "ValueError" and results[3].isolation == backend.name
    finished = [e["branch"] for e in events if e["type"] == "branch"]
    if backend is DocStreamingBackend:  # reported as they finish
        assert finished == ["body[1]", "body[0]", "body[3]", "body[2]", "body[4]"]
    else:
        assert finished == [f"body[{i}]" for i in range(5)]


def test_the_lists_backend_is_handed_chunks_of_max_concurrency(test_backend):
    made: list[DocListsBackend] = []

    def factory(max_workers=None):
        made.append(DocListsBackend(max_workers))
        return made[-1]

    test_backend("doc-lists", factory)
    with _map_of_five().compile(isolation="doc-lists", max_concurrency=2) as app:
        app.invoke({"items": list(range(5))})
    assert made[-1].chunks == [["body[0]", "body[1]"], ["body[2]", "body[3]"], ["body[4]"]]


def test_built_in_backends_are_listed_without_importing_them():
    import json
    import subprocess
    import sys

    probe = ("import json, sys, isobranch; "
             "names = isobranch.available_backends(); "
             "print(json.dumps([names, sorted(sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    names, modules = json.loads(out)
    assert names == ["dask", "inline", "process", "thread"]
    for module in ("inline", "thread", "process", "dask"):
        assert f"isobranch.isolation.{module}" not in modules
