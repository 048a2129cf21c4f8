"""One run of a compiled graph (run.py) and what the graph hands it: its backend, its fingerprint."""

from __future__ import annotations

import json

import pytest

from isobranch import END, START, GraphError, StateGraph
from isobranch.checkpoint import SqliteCheckpointer
from isobranch.isolation.inline import InlineBackend
from isobranch.run import resolve_config


class CountedInline(InlineBackend):
    """The inline backend, counting the instances made and closed."""

    name = "counted-inline"
    made: list[CountedInline] = []

    def __init__(self, max_workers: int | None = None) -> None:
        super().__init__(max_workers)
        self.closed = False
        CountedInline.made.append(self)

    def close(self) -> None:
        self.closed = True


def _two_steps() -> StateGraph:
    graph = StateGraph()
    graph.add_node("a", lambda state: {"n": state.get("n", 0) + 1})
    graph.add_node("b", lambda state: {"n": state["n"] * 10})
    graph.add_edge(START, "a")
    graph.add_edge("a", "b")
    graph.add_edge("b", END)
    return graph


def test_runs_use_the_backend_compile_made_and_close_releases_it(test_backend):
    test_backend(CountedInline.name, CountedInline)
    CountedInline.made.clear()
    compiled = _two_steps().compile(isolation=CountedInline.name)
    assert len(CountedInline.made) == 1  # compile() makes it, so bad options fail there
    assert compiled.invoke({}) == {"n": 10}
    assert [event["type"] for event in compiled.stream({})] == ["node", "node", "final"]
    assert len(CountedInline.made) == 1, "a run made a second backend instead of compile()'s"
    compiled.close()
    assert CountedInline.made[0].closed


def test_a_config_naming_another_max_workers_gets_a_backend_of_its_own(test_backend):
    test_backend(CountedInline.name, CountedInline)
    CountedInline.made.clear()
    with _two_steps().compile(isolation=CountedInline.name) as compiled:
        compiled.invoke({}, {"max_workers": 3})
        compiled.invoke({}, {"max_workers": 3})
        assert [backend.max_workers for backend in CountedInline.made] == [None, 3]
    assert all(backend.closed for backend in CountedInline.made)


def test_the_fingerprint_is_what_a_checkpointed_run_records(tmp_path):
    store = SqliteCheckpointer(tmp_path / "runs.db")
    with _two_steps().compile(isolation="inline", checkpointer=store) as compiled:
        parts = compiled.fingerprint()
        assert set(parts) == {"entry point", "node 'a'", "node 'b'", "edge a->b", "edge b->__end__"}
        parts["node 'a'"] = "changed by the caller"
        assert compiled.fingerprint()["node 'a'"] != "changed by the caller", "not a copy"
        compiled.invoke({}, {"run_id": "r1"})
        row = store.load_run("r1")
        assert row is not None and json.loads(row.fingerprint) == compiled.fingerprint()
    store.close()


def test_a_config_is_checked_against_the_graphs_own_settings():
    with _two_steps().compile(isolation="inline", branch_timeout=5) as compiled:
        settings = resolve_config(compiled, {"fail_fast": False})
        assert settings["branch_timeout"] == 5 and settings["fail_fast"] is False
        assert settings["isolation"] == "inline"
        with pytest.raises(GraphError, match=r"unknown key\(s\) 'retries'.*allowed: isolation"):
            resolve_config(compiled, {"retries": 2})
        with pytest.raises(GraphError, match=r"max_workers must be a positive number, got 0; "
                                             r"unknown isolation backend 'nope'"):
            resolve_config(compiled, {"max_workers": 0, "isolation": "nope"})


def test_a_stream_does_nothing_before_its_first_event_is_asked_for(tmp_path):
    store = SqliteCheckpointer(tmp_path / "runs.db")
    with _two_steps().compile(isolation="inline", checkpointer=store) as compiled:
        events = compiled.stream({}, {"run_id": "lazy"})
        assert store.load_run("lazy") is None
        assert next(events) == {"type": "run", "run_id": "lazy"}
        assert store.load_run("lazy") is not None
        events.close()
    store.close()
