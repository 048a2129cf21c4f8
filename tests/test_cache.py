"""The node cache: CachePolicy on nodes, SqliteCache on the compiled graph (docs/cache.md)."""

from __future__ import annotations

import pickle
import sqlite3
import uuid

import pytest

from conftest import BACKENDS
from isobranch import (
    END,
    START,
    CachePolicy,
    GraphError,
    GraphExecutionError,
    SqliteCache,
    SqliteCheckpointer,
    StateGraph,
    StreamMode,
    YAMLEngine,
    cache_store,
)
from isobranch.cache import parse_duration


def _token(state):
    """A node whose every run returns something new: a repeated token means a cache hit."""
    return {"token": uuid.uuid4().hex, "double": state["x"] * 2}


def _one_node(fn=_token, **policy) -> StateGraph:
    graph = StateGraph()
    graph.add_node("work", fn, cache=CachePolicy(**policy))
    graph.add_edge(START, "work").add_edge("work", END)
    return graph


def _node_events(app, state, mode=StreamMode.EVENTS):
    return [event for event in app.stream(state, mode=mode) if event["type"] == "node"]


def test_a_hit_returns_the_stored_update_without_running_the_node(tmp_path):
    calls = []

    def work(state):
        calls.append(state["x"])
        return {"double": state["x"] * 2}

    with _one_node(work).compile(cache=SqliteCache(tmp_path / "cache.db")) as app:
        first = _node_events(app, {"x": 2})
        second = _node_events(app, {"x": 2})
        assert app.invoke({"x": 3})["double"] == 6
    assert calls == [2, 3], "the second run on x=2 was served by the cache"
    assert "cached" not in first[0]
    assert second[0]["cached"] is True and second[0]["state"]["double"] == 4


def test_the_cached_flag_is_on_updates_mode_events_too(tmp_path):
    with _one_node().compile(cache=SqliteCache(tmp_path / "cache.db")) as app:
        first = _node_events(app, {"x": 1}, StreamMode.UPDATES)
        second = _node_events(app, {"x": 1}, StreamMode.UPDATES)
    assert second[0]["update"] == first[0]["update"] and second[0]["cached"] is True


def test_without_a_cache_a_cached_node_simply_runs(tmp_path):
    with _one_node().compile() as app:
        tokens = {app.invoke({"x": 1})["token"] for _ in range(2)}
    assert len(tokens) == 2


def test_keys_limit_the_input_the_entry_is_keyed_by(tmp_path):
    with _one_node(keys=["x"]).compile(cache=SqliteCache(tmp_path / "cache.db")) as app:
        a = app.invoke({"x": 1, "noise": 1})["token"]
        b = app.invoke({"x": 1, "noise": 2})["token"]
        c = app.invoke({"x": 2, "noise": 1})["token"]
        d = app.invoke({"noise": 1, "x": 1})["token"]
    assert a == b == d, "other keys (and key order) do not matter"
    assert c != a


def test_the_whole_state_is_the_key_by_default_in_any_key_order(tmp_path):
    with _one_node().compile(cache=SqliteCache(tmp_path / "cache.db")) as app:
        a = app.invoke({"x": 1, "tags": {"b", "a", "c"}, "noise": 1})["token"]
        b = app.invoke({"noise": 1, "tags": {"c", "a", "b"}, "x": 1})["token"]
        c = app.invoke({"x": 1, "tags": {"b", "a", "c"}, "noise": 2})["token"]
    assert a == b != c


def test_changing_the_node_code_misses(tmp_path):
    def document(factor: int) -> dict:
        return {"settings": {"cache": {"path": "cache.db"}}, "nodes": [
            {"name": "work", "cache": True,
             "run": f"import uuid\nreturn {{'token': uuid.uuid4().hex, 'y': state['x'] * {factor}}}"}]}

    engine = YAMLEngine()
    with engine.load_from_dict(document(2), base_dir=tmp_path) as app:
        before = app.invoke({"x": 1})["token"]
        assert app.invoke({"x": 1})["token"] == before
    with engine.load_from_dict(document(3), base_dir=tmp_path) as app:
        assert app.invoke({"x": 1})["token"] != before
    with engine.load_from_dict(document(2), base_dir=tmp_path) as app:
        assert app.invoke({"x": 1})["token"] == before, "the same code finds its entry again"


def test_failures_are_never_cached(tmp_path):
    attempts = []

    def flaky(state):
        attempts.append(1)
        if len(attempts) == 1:
            raise ValueError("first call fails")
        return {"ok": len(attempts)}

    with _one_node(flaky).compile(cache=SqliteCache(tmp_path / "cache.db")) as app:
        with pytest.raises(GraphExecutionError, match="first call fails"):
            app.invoke({"x": 1})
        assert app.invoke({"x": 1})["ok"] == 2
        assert app.invoke({"x": 1})["ok"] == 2
    assert len(attempts) == 2


def test_ttl_expires_entries(tmp_path, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(cache_store, "_clock", lambda: now[0])
    with _one_node(ttl="1h").compile(cache=SqliteCache(tmp_path / "cache.db")) as app:
        first = app.invoke({"x": 1})["token"]
        now[0] += 3599
        assert app.invoke({"x": 1})["token"] == first
        now[0] += 2
        renewed = app.invoke({"x": 1})["token"]
        assert renewed != first, "an hour and a second later the entry has expired"
        assert app.invoke({"x": 1})["token"] == renewed


def test_a_state_the_codec_cannot_write_runs_uncached(tmp_path, caplog):
    caplog.set_level("DEBUG", logger="isobranch.node_memo")
    with _one_node().compile(cache=SqliteCache(tmp_path / "cache.db")) as app:
        state = {"x": 1, "thing": object()}
        tokens = {app.invoke(state)["token"] for _ in range(2)}
    assert len(tokens) == 2
    assert "runs uncached" in caplog.text and "thing" in caplog.text


@pytest.mark.parametrize("isolation", BACKENDS)
def test_map_branches_share_the_cache_on_every_backend(isolation, tmp_path):
    graph = StateGraph()
    graph.add_node("split", lambda state: None)
    graph.add_node("work", lambda state: {"token": uuid.uuid4().hex, "item": state["item"]},
                   cache=CachePolicy(keys=["item"]))
    graph.add_fan_in_node("join", lambda state, results: {
        "tokens": [r.state["token"] for r in results]})
    graph.add_edge(START, "split")
    graph.add_map_edge("split", "work", over="items", item_key="item", fan_in="join")
    graph.add_edge("work", "join").add_edge("join", END)
    with graph.compile(isolation=isolation, max_workers=2,
                       cache=SqliteCache(tmp_path / "cache.db")) as app:
        first = app.invoke({"items": [1, 2, 1, 3]})["tokens"]
        second = app.invoke({"items": [3, 2, 1]})["tokens"]
    assert second[:2] == [first[3], first[1]]
    # Item 1 is in the first map twice: when both copies miss the cache and run at
    # once, either one's result may be the one kept, never a third.
    assert second[2] in (first[0], first[2])
    assert len(set(first)) in (3, 4), "item 1 may run twice in one fan-out (both missed)"


def test_a_cached_subgraph_node_is_keyed_by_its_inner_graph(tmp_path):
    def outer(inner_factor: int) -> StateGraph:
        inner = StateGraph()
        inner.add_node("mul", lambda state: {"y": state["x"] * inner_factor,
                                             "token": uuid.uuid4().hex})
        inner.add_edge(START, "mul").add_edge("mul", END)
        graph = StateGraph()
        graph.add_node("sub", inner, cache=True)
        graph.add_edge(START, "sub").add_edge("sub", END)
        return graph

    cache = SqliteCache(tmp_path / "cache.db")
    with outer(2).compile(cache=cache) as app:
        events = _node_events(app, {"x": 1})
        again = _node_events(app, {"x": 1})
    assert [e["node"] for e in events] == ["sub/mul", "sub"]
    assert [e["node"] for e in again] == ["sub"] and again[0]["cached"] is True
    assert again[0]["state"]["token"] == events[-1]["state"]["token"]


def test_a_cached_node_inside_a_subgraph_uses_the_outer_graphs_cache(tmp_path):
    inner = _one_node(keys=["x"])
    graph = StateGraph()
    graph.add_node("sub", inner)
    graph.add_edge(START, "sub").add_edge("sub", END)
    with graph.compile(cache=SqliteCache(tmp_path / "cache.db")) as app:
        _node_events(app, {"x": 1})
        again = _node_events(app, {"x": 1})
    assert again[0]["node"] == "sub/work" and again[0]["cached"] is True


def test_a_fan_in_node_cannot_be_cached(tmp_path):
    graph = StateGraph()
    graph.add_node("a", lambda state: None)
    graph.add_node("b", lambda state: None)
    graph.add_fan_in_node("join", lambda state, results: None, cache=True)
    graph.add_edge(START, "a").add_parallel_edge("a", "b", fan_in="join")
    graph.add_edge("b", "join").add_edge("join", END)
    with pytest.raises(GraphError, match="node 'join': cache: a fan-in node cannot be cached"):
        graph.compile(cache=SqliteCache(tmp_path / "cache.db"))


@pytest.mark.parametrize("value, seconds", [(30, 30.0), (1.5, 1.5), ("30s", 30.0), ("5m", 300.0),
                                            ("1h", 3600.0), ("2d", 172800.0), ("0.5h", 1800.0)])
def test_durations(value, seconds):
    assert parse_duration(value) == seconds
    assert CachePolicy(ttl=value).ttl == seconds


@pytest.mark.parametrize("value", ["5x", "h", "", -1, 0, True, "1 hour", [1]])
def test_a_bad_ttl_is_refused(value):
    with pytest.raises(ValueError):
        parse_duration(value)


def test_a_bad_yaml_cache_names_the_node_and_the_value(tmp_path):
    for cache, expected in [({"ttl": "5x"}, "node 'work': cache: ttl: .*'5x'"),
                            ({"keys": []}, "node 'work': cache: keys must be a non-empty list"),
                            ({"tll": 3}, "node 'work': cache: unknown key.*'tll'"),
                            ("yes", "node 'work': cache: expected true")]:
        document = {"nodes": [{"name": "work", "run": "return {}", "cache": cache}]}
        with pytest.raises(GraphError, match=expected):
            YAMLEngine().load_from_dict(document)
    with pytest.raises(GraphError, match=r"settings\.cache: needs 'path'"):
        YAMLEngine().load_from_dict({"settings": {"cache": {}}, "nodes": [
            {"name": "work", "run": "return {}"}]})


def test_settings_cache_is_relative_to_the_yaml_file(tmp_path):
    (tmp_path / "agent.yaml").write_text(
        "settings:\n  cache: {path: data/cache.db}\n"
        "nodes:\n  - name: work\n    cache: true\n    run: 'return {\"y\": 1}'\n")
    (tmp_path / "data").mkdir()
    with YAMLEngine().load_from_file(tmp_path / "agent.yaml") as app:
        app.invoke({})
    assert len(SqliteCache(tmp_path / "data" / "cache.db")) == 1


def test_a_cache_pickles_as_its_path(tmp_path):
    cache = SqliteCache(tmp_path / "cache.db")
    cache.put("k", "node", '{"a":1}', None)
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.path == cache.path and copy.get("k") == '{"a":1}'
    cache.close()
    copy.close()


def test_a_corrupt_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "cache.db"
    path.write_bytes(b"this is not a database, but long enough to look at " * 40)
    with (_one_node().compile(cache=SqliteCache(path)) as app,
          pytest.raises(GraphError, match=f"node cache '{path}' is not usable")):
        app.invoke({"x": 1})


def test_a_foreign_database_is_an_error_naming_it(tmp_path):
    path = tmp_path / "runs.db"
    SqliteCheckpointer(path).list_runs()  # another kind of isobranch database
    with pytest.raises(GraphError, match=f"node cache '{path}' is not an isobranch node cache"):
        SqliteCache(path).get("k")
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE meta (key TEXT, value TEXT)")
        connection.execute("CREATE TABLE entries (key TEXT)")
    with pytest.raises(GraphError, match="not an isobranch node cache"):
        SqliteCache(other).get("k")
